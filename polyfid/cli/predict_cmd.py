"""polyfid predict MODEL STRUCTURES -o OUT"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict energies and forces for structures; writes extxyz")
    p.add_argument("model", help="model file")
    p.add_argument("structures", help="any file ASE reads (positions are used, labels ignored)")
    p.add_argument("-o", "--output", required=True, help="output extxyz file")
    p.add_argument("--fidelity", help="level of theory to predict (a head of the model)")
    p.set_defaults(func=run)


def run(args) -> int:
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from polyfid.api import predict

    images = ase.io.read(args.structures, index=":")
    preds = predict(args.model, images, fidelity=args.fidelity)
    for atoms, p in zip(images, preds):
        atoms.calc = SinglePointCalculator(atoms, energy=p["energy"], forces=p["forces"])
    ase.io.write(args.output, images, format="extxyz")
    print(f"wrote {len(images)} structures with energy (eV) and forces (eV/Å) to {args.output}")
    return 0
