"""Readers for anything ASE reads (extended xyz and the other ``ase.io`` formats) and ASE databases.

Sources: the Atomic Simulation Environment, https://wiki.fysik.dtu.dk/ase/ (``ase.io`` file formats,
extended XYZ as specified at https://github.com/libAtoms/extxyz, and ``ase.db``). Example data in
this layout: the BOTNet/MACE benchmark sets (3BPA, acetylacetone, ethanol),
https://github.com/davkovacs/BOTNet-datasets.

Labels are looked up per frame by key. With the default keys (``energy``, ``forces``, ``stress``)
a label that is absent is simply missing; a key the user names must be present in every frame.
ASE itself moves the standard keys of an extxyz file into a SinglePointCalculator, so the
calculator's results are searched as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.units import energy_factor, force_factor, length_factor
from polyfid.errors import DataError

_DEFAULT_KEYS = {"energy": "energy", "forces": "forces", "stress": "stress"}


def _stress_factor(unit: str) -> float:
    """Factor taking a stress in `unit` (eV/Å^3, GPa, kbar, bar) to eV/Å³."""
    from ase import units

    key = unit.strip().lower().replace("å", "a").replace("**", "^").replace(" ", "")
    table = {
        "ev/a^3": 1.0,
        "ev/a3": 1.0,
        "ev/angstrom^3": 1.0,
        "gpa": units.GPa,
        "kbar": units.GPa / 10,
        "bar": units.bar,
    }
    if key not in table:
        raise DataError(f"unknown stress unit {unit!r}; expected one of {sorted(table)}")
    return table[key]


def _factors(path: Path, energy_unit: str, force_unit: str | None, length_unit: str, stress_unit: str):
    try:
        e = energy_factor(energy_unit)
        r = length_factor(length_unit)
        f = force_factor(force_unit) if force_unit else e / r
        s = _stress_factor(stress_unit)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    return e, f, r, s


def _lookup(key: str, sources: list[dict[str, Any]]) -> Any:
    for src in sources:
        if key in src and src[key] is not None:
            return src[key]
    return None


def _labels(
    kind_sources: dict[str, list[dict[str, Any]]],
    keys: dict[str, str],
    required: set[str],
    where: str,
    factors: dict[str, float],
) -> Labels:
    values: dict[str, Any] = {}
    for kind, key in keys.items():
        val = _lookup(key, kind_sources[kind])
        if val is None and kind in required:
            present = sorted({k for src in kind_sources[kind] for k in src})
            raise DataError(f"{where}: {kind} key {key!r} not found; keys present: {present}")
        if val is not None:
            try:
                val = np.asarray(val, dtype=np.float64) * factors[kind]
            except (TypeError, ValueError):
                raise DataError(f"{where}: {kind} key {key!r} holds a non-numeric value {val!r}") from None
            if kind == "energy":
                if val.size != 1:
                    raise DataError(f"{where}: energy key {key!r} holds shape {val.shape}, expected one number")
                val = float(val.reshape(()))
            elif kind == "stress" and val.size == 9:
                val = val.reshape(3, 3)
        values[kind] = val
    return Labels(**values)


def frame_from_atoms(atoms, source: str = "") -> Frame:
    """The structure of ASE `atoms` as a Frame without labels (charge and multiplicity from
    ``atoms.info``), e.g. to label it."""
    fr = _atoms_frame(atoms, Labels(), "_", source)
    fr.labels = {}
    return fr


def _atoms_frame(atoms, labels: Labels, fidelity: str, source: str) -> Frame:
    cell = None if atoms.cell.rank == 0 else np.array(atoms.cell[:])
    info = atoms.info
    kwargs: dict[str, Any] = {}
    for k in ("charge", "total_charge"):
        if k in info and np.ndim(info[k]) == 0:
            kwargs["charge"] = int(info[k])
            break
    for k in ("multiplicity", "spin_multiplicity"):
        if k in info and np.ndim(info[k]) == 0:
            kwargs["multiplicity"] = int(info[k])
            break
    return Frame(
        numbers=atoms.numbers,
        positions=atoms.positions,
        cell=cell,
        pbc=atoms.pbc,
        labels={fidelity: labels},
        source=source,
        **kwargs,
    )


def _frame_numbering(index: str | int | slice) -> tuple[int, int] | None:
    """(start, step) such that the k-th frame ``iread`` yields for `index` is frame ``start + step * k``
    of the file, when that is known without counting frames; else None (frames are numbered in
    reading order then)."""
    from ase.io.formats import string2index

    idx = string2index(index) if isinstance(index, str) else index
    if isinstance(idx, int):
        return (idx, 1) if idx >= 0 else None
    start, step = idx.start or 0, idx.step or 1
    return (start, step) if start >= 0 and step > 0 else None


def read_ase(
    path: str | Path,
    fidelity: str | None = None,
    *,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    energy_unit: str = "eV",
    force_unit: str | None = None,
    length_unit: str = "A",
    stress_unit: str = "eV/A^3",
    index: str | int | slice = ":",
    ase_format: str | None = None,
) -> Dataset:
    """Read any file ``ase.io.iread`` understands (extxyz, xyz, traj, OUTCAR, ...); source in the module
    docstring.

    Parameters
    ----------
    path: the file.
    fidelity: fidelity name for the labels (default ``"default"``).
    energy_key, forces_key, stress_key: names of the labels: energy and stress in ``atoms.info``,
        forces in ``atoms.arrays``, any of them in the calculator results. Default ``"energy"``,
        ``"forces"``, ``"stress"``, optional; a key given here must be present in every frame.
    energy_unit: stored energy unit (default eV); force_unit default ``energy_unit/length_unit``.
    length_unit: unit of positions and cell (default Å); stress_unit: eV/Å^3 (default), GPa, kbar, bar.
        Stress is taken in ASE's sign convention.
    index: ASE index string, int or slice of the frames to read (default all, ``":"``).
    ase_format: ASE format name if ASE cannot guess it from the file name.

    Returns a Dataset: positions (n, 3) Å, cell (3, 3) Å (None when the file has none), energy eV,
    forces (n, 3) eV/Å, stress (3, 3) eV/Å³; ``source = f"{path}:{index in file}"``.
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    e_fac, f_fac, r_fac, s_fac = _factors(path, energy_unit, force_unit, length_unit, stress_unit)
    name = fidelity or "default"
    keys = {"energy": energy_key or "energy", "forces": forces_key or "forces", "stress": stress_key or "stress"}
    required = {kind for kind, k in (("energy", energy_key), ("forces", forces_key), ("stress", stress_key)) if k}
    factors = {"energy": e_fac, "forces": f_fac, "stress": s_fac}
    start, step = _frame_numbering(index) or (0, 1)

    frames: list[Frame] = []
    iterator = ase.io.iread(path, index=index, format=ase_format)
    while True:
        k = len(frames)
        try:
            atoms = next(iterator)
        except StopIteration:
            break
        except Exception as err:  # ASE parsers raise many types on malformed input
            raise DataError(f"{path}: frame {k}: cannot parse: {type(err).__name__}: {err}") from None
        where = f"{path}:{start + step * k}"
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        sources = {
            "energy": [results, atoms.info] if keys["energy"] == "energy" else [atoms.info, results],
            "forces": [results, atoms.arrays] if keys["forces"] == "forces" else [atoms.arrays, results],
            "stress": [results, atoms.info] if keys["stress"] == "stress" else [atoms.info, results],
        }
        if r_fac != 1.0:
            atoms.positions *= r_fac
            atoms.cell *= r_fac
        labels = _labels(sources, keys, required, where, factors)
        frames.append(_atoms_frame(atoms, labels, name, where))
    if not frames:
        raise DataError(f"{path}: no frames read (index {index!r})")
    return Dataset(frames, name=path.stem)


def read_ase_db(
    path: str | Path,
    fidelity: str | None = None,
    *,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    energy_unit: str = "eV",
    force_unit: str | None = None,
    length_unit: str = "A",
    stress_unit: str = "eV/A^3",
    selection: str | None = None,
) -> Dataset:
    """Read an ASE database (``ase.db.connect``; source in the module docstring).

    Labels are looked up by key in ``row.data``, then ``row.key_value_pairs``, then the stored
    calculator results (for the default keys the calculator results come first). Options as in
    :func:`read_ase`; ``selection`` is an ``ase.db`` query string (default all rows). Frame ``k``
    (k-th selected row) has ``source = f"{path}:{k}"`` and error messages also give the row id.
    """
    import ase.db

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    e_fac, f_fac, r_fac, s_fac = _factors(path, energy_unit, force_unit, length_unit, stress_unit)
    name = fidelity or "default"
    keys = {"energy": energy_key or "energy", "forces": forces_key or "forces", "stress": stress_key or "stress"}
    required = {kind for kind, k in (("energy", energy_key), ("forces", forces_key), ("stress", stress_key)) if k}
    factors = {"energy": e_fac, "forces": f_fac, "stress": s_fac}
    try:
        db = ase.db.connect(str(path))
        rows = list(db.select(selection))
    except Exception as err:  # ase.db raises many types on bad files
        raise DataError(f"{path}: cannot read as an ASE database: {type(err).__name__}: {err}") from None
    frames = []
    for k, row in enumerate(rows):
        where = f"{path}:{k}"
        atoms = row.toatoms()
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        data = dict(row.data) if row.get("data") is not None else {}
        kvp = dict(row.key_value_pairs)
        sources = {kind: ([results, data, kvp] if keys[kind] == kind else [data, kvp, results]) for kind in keys}
        if r_fac != 1.0:
            atoms.positions *= r_fac
            atoms.cell *= r_fac
        try:
            labels = _labels(sources, keys, required, where, factors)
        except DataError as err:
            raise DataError(f"{err} (row id {row.id})") from None
        frames.append(_atoms_frame(atoms, labels, name, where))
    if not frames:
        raise DataError(f"{path}: no rows selected (selection {selection!r})")
    return Dataset(frames, name=path.stem)
