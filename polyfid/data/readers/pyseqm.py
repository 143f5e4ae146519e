"""Reader for the PYSEQM folder-of-``.npy`` layout (PM6 and DFT labels on the same configurations).

Source: the PYSEQM project, Los Alamos National Laboratory (https://github.com/lanl/PYSEQM; data of
Zhou et al., "Deep learning of dynamically responsive chemical Hamiltonians with semiempirical quantum
mechanics", PNAS 2022, https://doi.org/10.1073/pnas.2120333119).

Layout (F frames, padded to a fixed atom count P, here 20):

* ``Z.npy`` (F, P) int atomic numbers, 0 marks padding (trailing);
* ``R.npy`` (F, P, 3) positions in Å;
* ``Etot_PM6.npy`` / ``Etot_DFT.npy`` (F,) total energies in eV;
* ``F_PM6.npy`` / ``F_DFT.npy`` (F, P, 3) forces (−gradient) in eV/Å.

Padding atoms are dropped per frame. The two default fidelities are ``"pm6"`` and ``"dft"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.readers.npz import LOAD_ERRORS, atomic_numbers_of, numeric, select
from polyfid.data.units import energy_factor, force_factor, length_factor
from polyfid.errors import DataError

#: default levels: fidelity name -> (energy file, forces file) inside the folder
PYSEQM_LEVELS: dict[str, tuple[str | None, str | None]] = {
    "pm6": ("Etot_PM6.npy", "F_PM6.npy"),
    "dft": ("Etot_DFT.npy", "F_DFT.npy"),
}


def _load(folder: Path, name: str) -> np.ndarray:
    fname = name if name.endswith(".npy") else name + ".npy"
    path = folder / fname
    if not path.is_file():
        have = sorted(p.name for p in folder.glob("*.npy"))
        raise DataError(f"{path}: file not found; the folder holds {have}")
    try:
        arr = np.load(path, allow_pickle=False)
    except LOAD_ERRORS as err:
        if "allow_pickle" in str(err):
            raise DataError(f"{path}: holds Python objects (a pickled object array), expected numbers; polyfid "
                            "does not load pickles") from None
        raise DataError(f"{path}: cannot read as a .npy array: {err}") from None
    if not isinstance(arr, np.ndarray):  # np.load opens an .npz archive whatever the name
        arr.close()
        raise DataError(f"{path}: an .npz archive, expected a single .npy array")
    return arr


def read_pyseqm(
    path: str | Path,
    fidelity: str | Sequence[str] | None = None,
    *,
    levels: Mapping[str, tuple[str | None, str | None]] | None = None,
    numbers_file: str = "Z.npy",
    positions_file: str = "R.npy",
    energy_unit: str = "eV",
    force_unit: str = "eV/A",
    length_unit: str = "A",
    index: slice | Sequence[int] | np.ndarray | None = None,
) -> Dataset:
    """Read a PYSEQM ``.npy`` folder (source in the module docstring) into a multi-fidelity Dataset.

    Parameters
    ----------
    path: the folder holding ``Z.npy``, ``R.npy`` and the label files.
    fidelity: a level name or list of names to load (default all levels: ``"pm6"``, ``"dft"``).
    levels: fidelity name -> (energy file, forces file), either None to skip that label; replaces
        the default ``{"pm6": ("Etot_PM6.npy", "F_PM6.npy"), "dft": ("Etot_DFT.npy", "F_DFT.npy")}``.
    numbers_file, positions_file: names of the (F, P) atomic-number and (F, P, 3) position files.
    energy_unit, force_unit, length_unit: units of the stored values (default eV, eV/Å, Å); the forces
        must be forces (−dE/dx), as in the PYSEQM files.
    index: a slice or integer indices selecting frames (default all).

    Returns a Dataset; frame ``i`` has the non-padding atoms of row ``i`` (positions (n, 3) Å, energy eV,
    forces (n, 3) eV/Å) and ``source = f"{path}:{i}"``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (PYSEQM data is a folder of .npy files)")
    try:
        e_fac, f_fac, r_fac = energy_factor(energy_unit), force_factor(force_unit), length_factor(length_unit)
    except DataError as err:
        raise DataError(f"{folder}: {err}") from None

    levels = dict(PYSEQM_LEVELS if levels is None else levels)
    if fidelity is not None:
        wanted = [fidelity] if isinstance(fidelity, str) else list(fidelity)
        unknown = [f for f in wanted if f not in levels]
        if unknown:
            raise DataError(f"{folder}: unknown level(s) {unknown}; this reader offers {sorted(levels)}")
        levels = {f: levels[f] for f in wanted}

    Z = atomic_numbers_of(_load(folder, numbers_file), str(folder / numbers_file), "Z")
    R = numeric(_load(folder, positions_file), str(folder / positions_file), "R")
    if Z.ndim != 2 or R.shape != (*Z.shape, 3):
        raise DataError(
            f"{folder}: {positions_file} has shape {R.shape} and {numbers_file} {Z.shape}; expected (F, P, 3), (F, P)"
        )
    n_frames, n_pad = Z.shape
    if np.any(Z < 0):
        bad = int(np.argwhere(Z < 0)[0][0])
        raise DataError(f"{folder / numbers_file}: frame {bad}: negative atomic number in {Z[bad].tolist()}")
    sel = select(np.arange(n_frames), index, folder)
    Z = Z[sel]
    R = R[sel] * r_fac

    table: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    for name, (e_file, f_file) in levels.items():
        energies = forces = None
        if e_file is not None:
            energies = numeric(_load(folder, e_file), str(folder / e_file), "energies")
            if energies.size != n_frames:
                raise DataError(
                    f"{folder / e_file}: shape {energies.shape}: {energies.size} energies for {n_frames} frames"
                )
            energies = energies.reshape(n_frames)[sel] * e_fac
        if f_file is not None:
            forces = numeric(_load(folder, f_file), str(folder / f_file), "forces")
            if forces.shape != (n_frames, n_pad, 3):
                raise DataError(f"{folder / f_file}: shape {forces.shape}, expected ({n_frames}, {n_pad}, 3)")
            forces = forces[sel] * f_fac
        table[name] = (energies, forces)

    real = Z > 0
    frames = []
    for j, i in enumerate(sel.tolist()):
        m = real[j]
        where = f"{folder}:{i}"
        # padding must be trailing and clean: a zero row in the middle or labels on padding is corruption
        n = int(m.sum())
        if not m[:n].all():
            raise DataError(f"{where}: padding atoms (Z == 0) are not all at the end: Z = {Z[j].tolist()}")
        if np.any(R[j, n:] != 0):
            raise DataError(f"{where}: padding atoms (Z == 0) have non-zero positions")
        labels = {}
        for name, (energies, forces) in table.items():
            if forces is not None and np.any(forces[j, n:] != 0):
                raise DataError(f"{where}: fidelity {name!r}: padding atoms (Z == 0) carry non-zero forces")
            labels[name] = Labels(
                energy=None if energies is None else float(energies[j]),
                forces=None if forces is None else forces[j, :n],
            )
        frames.append(Frame(numbers=Z[j, :n], positions=R[j, :n], labels=labels, source=where))
    return Dataset(frames, name=folder.name)
