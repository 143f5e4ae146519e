"""`polyfid` command line: one small module per command; the work lives in the library."""

from __future__ import annotations

import argparse
import sys

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

COMMANDS = [train_cmd, meta_train_cmd, finetune_cmd, evaluate_cmd, scan_cmd, predict_cmd, data_cmd, sample_cmd,
            label_cmd, diagnose_cmd, invariants_cmd, config_cmd, demo_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyfid", description="Multi-fidelity machine-learning potentials.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from polyfid.data.errors import DataError
    from polyfid.label.levels import LevelError
    from polyfid.sample.structures import SourceError
    from polyfid.train.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, LevelError, SourceError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"polyfid {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
