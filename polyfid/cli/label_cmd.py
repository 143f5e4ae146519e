"""polyfid label STRUCTURES... --level LEVEL [--store S] [--forces] [--workers N | --dask ADDR]"""

from __future__ import annotations

import sys

from polyfid.cli.args import int_in


def add_parser(sub) -> None:
    p = sub.add_parser(
        "label",
        help="compute energies (and forces) at a level of theory into a resumable label store",
        description="Label structures (any file the data layer reads) at LEVEL: gfn1-xtb, gfn2-xtb (tblite) or "
        "METHOD/BASIS for PySCF (hf, mp2, ccsd, ccsd(t) or a DFT functional: pbe/def2-svp, b3lyp/6-31g*). "
        "Charge and multiplicity come from each structure's info (charge, multiplicity; default 0 and 1); "
        "--charge and --multiplicity set them for every structure. "
        "Results go to the store as each calculation finishes; run the same command again after an "
        "interruption and only what is missing is computed. Several runs may share one store at the same time: "
        "each structure is computed by one of them. The store reads back as a data set "
        "(path ending in .sqlite in a training config, or `polyfid data summary STORE`).",
    )
    p.add_argument("structures", nargs="+", help="structure files (extxyz, npz, h5, ...)")
    p.add_argument("--level", required=True, help="level of theory, e.g. gfn2-xtb, mp2/cc-pvdz, pbe/def2-svp")
    p.add_argument("--store", default="labels.sqlite", help="label store (SQLite; default labels.sqlite)")
    p.add_argument("--forces", action="store_true", help="also compute forces (analytic gradients)")
    p.add_argument("--select", help="frames to label from each file, a Python slice such as 0:100")
    p.add_argument("--charge", type=int, help="charge of every structure (default: each file's, else 0)")
    p.add_argument("--multiplicity", type=int,
                   help="spin multiplicity of every structure (default: each file's, else 1)")
    p.add_argument("--workers", type=int_in(1), default=1, help="worker processes (default 1)")
    p.add_argument("--threads", type=int_in(1), default=1, help="OpenMP threads per worker (default 1)")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="run on a Dask cluster: a scheduler address (tcp://host:8786) or 'local' for a local "
                   "cluster of --workers processes")
    p.add_argument("--sample", type=int_in(0, 10_000), default=2,
                   help="structures timed for the cost estimate before the run (0: no estimate; default 2)")
    p.add_argument("--estimate-only", action="store_true", help="print the cost estimate and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _frames(args) -> list:
    from polyfid.data.readers import read
    from polyfid.data.splits import parse_slice

    frames = []
    for path in args.structures:
        ds = read(path)
        chosen = ds.frames if not args.select else ds.frames[parse_slice(args.select, path)]
        for fr in chosen:
            # the reader cannot tell "charge 0 in the file" from "no charge given": the options win
            if args.charge is not None:
                fr.charge = args.charge
            if args.multiplicity is not None:
                fr.multiplicity = args.multiplicity
        frames += chosen
    return frames


def run(args) -> int:
    from polyfid.label import LabelStore, check_frames, estimate_cost, label_frames, parse_level
    from polyfid.label.cluster import executor_for
    from polyfid.label.runner import log_beside

    level = parse_level(args.level).name  # a LevelError ends the command with its message (cli.main)
    frames = _frames(args)
    check_frames(frames, level, args.forces)  # before the store is opened or anything is computed
    print(f"{len(frames)} structures from {', '.join(args.structures)}; level {level}"
          f"{' with forces' if args.forces else ''}; store {args.store}")
    try:
        with LabelStore(args.store) as store, executor_for(args.dask, args.workers, args.threads) as (executor, n):
            if args.sample > 0 or args.estimate_only:
                est = estimate_cost(frames, level, store, forces=args.forces, sample=max(args.sample, 1),
                                    workers=n, threads_per_worker=args.threads, executor=executor)
                print(f"estimate: {est}", flush=True)
                if args.estimate_only:
                    return 0
            report = label_frames(frames, level, store, forces=args.forces, workers=n,
                                  threads_per_worker=args.threads, executor=executor,
                                  progress=not args.no_progress)
            counts = store.counts().get(level, {"ok": 0, "failed": 0})
    except KeyboardInterrupt:
        print(f"\npolyfid label: interrupted; every finished result is in {args.store}: run the same command "
              "again to compute the rest", file=sys.stderr)
        return 130
    print(report)
    for i, reason in report.failed[:20]:
        print(f"  failed: {frames[i].source or i}: {reason}")
    if len(report.failed) > 20:
        print(f"  ... and {len(report.failed) - 20} more failures (not retried; they never enter training)")
    print(f"store {args.store}: {level}: {counts['ok']} ok, {counts['failed']} failed; engine output in "
          f"{log_beside(args.store)}")
    return 0

