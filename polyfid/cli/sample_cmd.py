"""polyfid sample SOURCE... -o OUT [--temperatures ...] [--md-frames N] [--normal-modes N] [--select K]"""

from __future__ import annotations

from polyfid.cli.args import int_at_least, number_at_least, positive_number


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample structures (xTB MD, normal modes) from files, ASE names or SMILES; select a diverse subset",
        description="Starting structures from files (anything ase.io reads), ASE molecule names (CH3CH2OH) or SMILES "
        "(CCO, through RDKit); Langevin MD with GFN-xTB (tblite) at each temperature and/or normal-mode "
        "displacements; near-duplicates removed; optionally a farthest-point subset for expensive labels. "
        "Writes extxyz with the xTB energy and forces of each sample. With --md-frames 0 and no normal modes, "
        "the structures themselves are de-duplicated and selected from.",
    )
    p.add_argument("sources", nargs="+", help="structure files, ASE molecule names or SMILES strings")
    p.add_argument("-o", "--out", required=True, help="extxyz file for all sampled structures")
    p.add_argument("--temperatures", type=positive_number(), nargs="+", default=[300.0, 600.0, 1000.0],
                   help="temperatures in K (default 300 600 1000)")
    p.add_argument("--md-frames", type=int_at_least(0), default=100,
                   help="MD frames per temperature and structure (default 100)")
    p.add_argument("--stride", type=int_at_least(1), default=10, help="MD steps between saved frames (default 10)")
    p.add_argument("--equilibration", type=int_at_least(0), default=200,
                   help="MD steps before the first frame (default 200)")
    p.add_argument("--timestep", type=positive_number(), default=0.5, help="MD time step in fs (default 0.5)")
    p.add_argument("--normal-modes", type=int_at_least(0), default=0,
                   help="normal-mode displaced structures per temperature and structure (default 0)")
    p.add_argument("--method", default="gfn2-xtb", choices=["gfn1-xtb", "gfn2-xtb"], help="sampling level")
    p.add_argument("--charge", type=int, help="charge of every starting structure (default: from the file, else 0)")
    p.add_argument("--multiplicity", type=int_at_least(1), help="spin multiplicity (default: from the file, else 1)")
    p.add_argument("--dedup", type=number_at_least(0.0), default=1e-3,
                   help="RMS inverse-distance difference (1/Å) below which structures are duplicates; 0 keeps all "
                   "(default 1e-3)")
    p.add_argument("--select", type=int_at_least(1), help="also pick this many by farthest-point sampling")
    p.add_argument("--selected-out", help="file for the selected subset (default: OUT with _selected)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from polyfid.sample import SampleSettings, farthest_point, load_structures, sample, write_structures

    starts = []
    for src in args.sources:
        for a in load_structures(src, seed=args.seed):
            if args.charge is not None:
                a.info["charge"] = args.charge
            if args.multiplicity is not None:
                a.info["multiplicity"] = args.multiplicity
            starts.append(a)
    settings = SampleSettings(
        temperatures_K=list(args.temperatures), md_frames=args.md_frames, stride=args.stride,
        equilibration=args.equilibration, timestep_fs=args.timestep, normal_modes=args.normal_modes,
        method=args.method, seed=args.seed, dedup_tolerance=args.dedup if args.dedup > 0 else None,
    )
    frames = sample(starts, settings)
    write_structures(args.out, frames)
    print(f"{len(starts)} starting structure(s) -> {len(frames)} sampled structures (after de-duplication): "
          f"{args.out}")
    if args.select:
        out = Path(args.selected_out or Path(args.out).with_name(Path(args.out).stem + "_selected.extxyz"))
        idx = farthest_point(frames, min(args.select, len(frames)), seed=args.seed)
        write_structures(out, [frames[i] for i in idx])
        print(f"{len(idx)} selected by farthest-point sampling: {out}")
    return 0
