"""polyfid data summary FILE [FILE ...]"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="inspect data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("summary", help="frames, elements, labels per fidelity, energy and force statistics")
    s.add_argument("path", nargs="+", help="data files or folders; several are merged (the same geometry in "
                   "two files is one frame with both files' label sets)")
    s.add_argument("--fidelity", action="append", default=None, metavar="NAME",
                   help="level-of-theory name of a single-level file's labels; once for all files, or once per "
                   "file in order (default: the reader's names; with several files, a file whose labels have no "
                   "level name takes its file name's stem)")
    s.add_argument("--merge-tolerance", type=float, default=1e-6,
                   help="Å; positions this close are the same geometry (default 1e-6)")
    s.add_argument("--format", help="reader name (detected if omitted)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=run_summary)


def run_summary(args) -> int:
    from polyfid.data.errors import DataError
    from polyfid.data.frame import Dataset
    from polyfid.data.readers import read
    from polyfid.data.summary import format_summary, summarize

    names = args.fidelity or [None]
    if len(names) not in (1, len(args.path)):
        raise DataError(f"--fidelity given {len(names)} times for {len(args.path)} files: give it once, or once "
                         "per file")
    names = names * len(args.path) if len(names) == 1 else names
    parts = [read(p, format=args.format, fidelity=n) for p, n in zip(args.path, names)]
    if len(parts) > 1:
        for ds, p, n in zip(parts, args.path, names):
            if n is None and ds.fidelities == ["default"]:
                ds.rename_fidelity("default", Path(p).stem)
    data = parts[0] if len(parts) == 1 else Dataset.merge(parts, tolerance=args.merge_tolerance)
    summary = summarize(data)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
