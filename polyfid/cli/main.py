"""`polyfid` command line: one small module per command; the work lives in the library."""

from __future__ import annotations

import argparse
import sys
import traceback

from polyfid.cli import (
    config_cmd,
    data_cmd,
    demo_cmd,
    diagnose_cmd,
    evaluate_cmd,
    finetune_cmd,
    invariants_cmd,
    label_cmd,
    meta_train_cmd,
    predict_cmd,
    sample_cmd,
    scan_cmd,
    train_cmd,
)
from polyfid.errors import PolyfidError

COMMANDS = [train_cmd, meta_train_cmd, finetune_cmd, evaluate_cmd, scan_cmd, predict_cmd, data_cmd, sample_cmd,
            label_cmd, diagnose_cmd, invariants_cmd, config_cmd, demo_cmd]

#: exit status of a user error (bad input, option, model file; a run that cannot go on)
USER_ERROR = 2
#: exit status of a bug (anything else escaping polyfid), printed with its traceback
BUG = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyfid", description="Multi-fidelity machine-learning potentials.")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of every error, user errors included")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def _user_error(e: BaseException) -> bool:
    # an OSError with a file name is about the user's files or machine (missing, a folder,
    # unreadable, disk full, read-only file system), not about polyfid's code
    return isinstance(e, PolyfidError) or (isinstance(e, OSError) and e.filename is not None)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for a user error, 1 for a bug)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"polyfid {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        if _user_error(e):
            msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else e
            print(f"polyfid {args.command}: error: {msg}", file=sys.stderr)
            return USER_ERROR
        if not args.debug:
            traceback.print_exc()
        print(f"polyfid {args.command}: internal error ({type(e).__name__}); this is a bug in polyfid, please "
              "report it with the traceback above", file=sys.stderr)
        return BUG


if __name__ == "__main__":
    sys.exit(main())
