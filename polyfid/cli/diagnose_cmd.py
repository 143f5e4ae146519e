"""polyfid diagnose TABLE.csv --target COLUMN [--json] | polyfid diagnose --example NAME"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="is a neural network worth it? linear/transformed/multilinear/sparse vs nonlinear regressions",
        description="Fit linear, transformed-linear, multilinear, Lasso and SISSO-like models and kernel ridge, "
        "gradient boosting and a small neural network on the same repeated cross-validation splits; learning "
        "curves, a RESET test, the selected formula and a verdict, written as a Markdown report with plots.",
    )
    p.add_argument("table", nargs="?", help="CSV file with a header row")
    p.add_argument("--target", help="the column to predict")
    p.add_argument("--features", nargs="+", help="columns used as variables (default: all others)")
    p.add_argument("--example", choices=["diabetes", "xtb-molecules"], help="a shipped example instead of a table")
    p.add_argument("--out", help="report folder (default: runs/diagnose/<name>)")
    p.add_argument("--quick", action="store_true", help="one repeat, three training sizes, smaller grids")
    p.add_argument("--repeats", type=int, help="repeats of the 5-fold cross-validation (default 3; quick 1)")
    p.add_argument("--min-gain", type=float, default=0.10,
                   help="relative error reduction a nonlinear model must show (default 0.10)")
    p.add_argument("--jobs", type=int, default=1, help="parallel fits (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from polyfid.data.errors import DataError
    from polyfid.diagnose import diagnose, example, read_table, write_report

    if args.example:
        X, y, names, target, unit = example(args.example)
        label = args.example
    else:
        if not args.table or not args.target:
            raise DataError("give TABLE.csv and --target COLUMN, or --example NAME")
        X, y, names = read_table(args.table, args.target, args.features)
        target, unit, label = args.target, "", Path(args.table).stem
    d = diagnose(X, y, names, target=target, quick=args.quick, n_repeats=args.repeats, min_gain=args.min_gain,
                 n_jobs=args.jobs, seed=args.seed)
    out = Path(args.out or Path("runs") / "diagnose" / label)
    report = write_report(d, out, title=label, unit=unit)
    if args.json:
        print(json.dumps(d.to_dict() | {"report": str(report)}, indent=2))
    else:
        print(f"verdict: {d.verdict}")
        for e in d.evidence:
            print(f"  - {e}")
        print(f"  formula: {d.formula}")
        print(f"report: {report}")
    return 0
