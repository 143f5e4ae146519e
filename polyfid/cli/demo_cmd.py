"""polyfid demo [--out DIR] [--quick] [--single-level]"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the multi-fidelity story on ethanol: xTB MD, xTB forces + a few MP2 energies, four rows compared",
        description="Sample ethanol with GFN1-xTB MD, label the samples with GFN1-xTB energies and forces and a "
        "farthest-point subset with MP2/cc-pVDZ energies (PySCF), a held-out set with MP2 energies and forces; "
        "train the multi-fidelity model and an MP2-energies-only model for the same number of optimiser steps and "
        "compare them, GFN1-xTB itself and the network trained on GFN1-xTB only on the held-out set. About 4 "
        "minutes on 2 cores; --quick under one. Engine messages go to demo.log. --single-level runs the earlier "
        "demo (GFN2-xTB data, one HIP-NN, MD with it).",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (120 pool structures, 30 MP2 energies, 2000 steps)")
    p.add_argument("--single-level", action="store_true",
                   help="the single-level demo: GFN2-xTB MD data, one HIP-NN, NVE MD with the trained model")
    p.add_argument("--max-time", type=float, help="single-level demo: training budget in seconds")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.single_level:
        from polyfid.demo.xtb_ethanol import run_demo

        run_demo(args.out, quick=args.quick, max_time_s=args.max_time)
    else:
        from polyfid.demo.multifidelity import run_demo

        run_demo(args.out, quick=args.quick)
    return 0
