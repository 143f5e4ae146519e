"""polyfid predict MODEL STRUCTURES -o OUT"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict energies and forces for structures; writes extxyz")
    p.add_argument("model", help="model file")
    p.add_argument("structures", help="any data file or folder polyfid reads (extxyz and other ASE formats, npz, "
                   "hdf5, PYSEQM folder, QM-22 xyz, label store); positions are used, labels ignored")
    p.add_argument("-o", "--output", required=True, help="output extxyz file")
    p.add_argument("--fidelity", help="level of theory to predict (a head of the model)")
    p.add_argument("--format", help="reader name of STRUCTURES (detected if omitted)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from polyfid.api import predict
    from polyfid.data.readers import read
    from polyfid.errors import ConfigError

    out, src = Path(args.output), Path(args.structures)
    if out.exists() and src.exists() and out.resolve() == src.resolve():  # predictions over the reference labels
        raise ConfigError(f"-o {args.output}: that is the input file; writing there would replace its labels with "
                          "predictions: choose another output file")
    # every format polyfid reads, through its readers: damaged input is a DataError, not a traceback
    data = read(args.structures, format=args.format)
    preds = predict(args.model, data, fidelity=args.fidelity)
    images = []
    for frame, p in zip(data, preds):
        atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        atoms.info["source"] = frame.source
        if frame.charge or frame.multiplicity != 1:
            atoms.info["charge"], atoms.info["multiplicity"] = frame.charge, frame.multiplicity
        atoms.calc = SinglePointCalculator(atoms, energy=p["energy"], forces=p["forces"])
        images.append(atoms)
    ase.io.write(args.output, images, format="extxyz")
    print(f"wrote {len(images)} structures with energy (eV) and forces (eV/Å) to {args.output}")
    return 0
