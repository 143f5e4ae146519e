"""polyfid data summary FILE [FILE ...]"""

from __future__ import annotations

import json


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
    s.add_argument("--merge-tolerance", type=float, default=None,
                   help="Å; positions this close are the same geometry (default: data.merge_tolerance's, 1e-6)")
    s.add_argument("--format", help="reader name (detected if omitted)")
    s.add_argument("--min-distance", type=float, default=None, metavar="A",
                   help="Å; refuse frames with atoms closer than this (default: data.min_distance's, 0.1)")
    s.add_argument("--max-extent", type=float, default=None, metavar="A",
                   help="Å; refuse frames whose atoms span more than this (default: data.max_extent's, 1000)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=run_summary)


def run_summary(args) -> int:
    from polyfid.data.readers import read
    from polyfid.data.summary import format_summary, summarize
    from polyfid.train.config import DataConfig, check_number, option_range

    # the same ranges as the data options these flags stand for
    defaults = DataConfig()
    tol = check_number(defaults.merge_tolerance if args.merge_tolerance is None else args.merge_tolerance,
                       "--merge-tolerance", option_range(DataConfig, "merge_tolerance"))
    min_d, max_e = (check_number(getattr(defaults, k) if v is None else v, f"--{k.replace('_', '-')}",
                                 option_range(DataConfig, k))
                    for k, v in (("min_distance", args.min_distance), ("max_extent", args.max_extent)))
    data = read(args.path, format=args.format, fidelity=args.fidelity, merge_tolerance=tol)
    summary = summarize(data, min_d, max_e)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
