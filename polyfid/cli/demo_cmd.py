"""polyfid demo [--out DIR] [--quick]"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="generate GFN2-xTB ethanol MD data (tblite), train a HIP-NN, evaluate it, run MD with it",
        description="Generate (or reuse) GFN2-xTB Langevin MD data of ethanol with tblite, train a HIP-NN on it, "
        "print test errors, run NVE MD with the trained model and compare it against xTB. Writes data, "
        "run folder (model, plots) and summary.json into --out.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="smaller data set (3 x 60 frames) and a 45 s training budget")
    p.add_argument("--max-time", type=float, help="training budget in seconds (overrides the default)")
    p.set_defaults(func=run)


def run(args) -> int:
    from polyfid.demo.xtb_ethanol import run_demo

    run_demo(args.out, quick=args.quick, max_time_s=args.max_time)
    return 0
