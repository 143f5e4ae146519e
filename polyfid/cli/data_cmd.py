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
    from polyfid.data.merge import MERGE_TOLERANCE
    from polyfid.data.readers import read
    from polyfid.data.summary import format_summary, summarize

    tol = MERGE_TOLERANCE if args.merge_tolerance is None else args.merge_tolerance
    from polyfid.neighbors.checks import MAX_EXTENT, MIN_DISTANCE

    data = read(args.path, format=args.format, fidelity=args.fidelity, merge_tolerance=tol)
    summary = summarize(data, MIN_DISTANCE if args.min_distance is None else args.min_distance,
                        MAX_EXTENT if args.max_extent is None else args.max_extent)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
