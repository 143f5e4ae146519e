"""polyfid data summary FILE"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="inspect data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("summary", help="frames, elements, labels per fidelity, energy and force statistics")
    s.add_argument("path", help="data file or folder")
    s.add_argument("--format", help="reader name (detected if omitted)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=run_summary)


def run_summary(args) -> int:
    from polyfid.data.readers import read
    from polyfid.data.summary import format_summary, summarize

    summary = summarize(read(args.path, format=args.format))
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
