"""Reader for ANI-style HDF5 files (COMP6, ANI-1 family).

Source: COMP6 benchmark, Smith et al., "Less is more: sampling chemical space with active learning",
J. Chem. Phys. 148, 241733 (2018), https://doi.org/10.1063/1.5023802, data at
https://github.com/isayev/COMP6 (the ANI HDF5 layout is also used by ANI-1 / ANI-1x / ANI-1ccx).

Layout: groups, possibly nested, each holding the conformers of one molecule:

* ``coordinates`` (F, n, 3) Å;
* ``species`` (n,) element symbols (bytes or str) or atomic numbers;
* ``energies`` (F,) total energies in Hartree;
* optionally ``forces`` (F, n, 3) in Hartree/Å.

Sign of ``forces``: COMP6 stores the GRADIENT dE/dx under the name ``forces``
(https://github.com/isayev/COMP6/issues/2; checked on S66x8: the stored vectors summed over one
monomer equal +dE/d(separation) along the dissociation scan, and are anti-parallel to GFN2-xTB forces).
The reader therefore negates them by default (``forces_are_gradients=True``); pass False for files
that store true forces.

Groups are visited in h5py's (alphabetical) order; frames are numbered consecutively over groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.readers.npz import atomic_numbers_of, numeric
from polyfid.data.units import energy_factor, force_factor, length_factor
from polyfid.errors import DataError

#: what h5py raises on a damaged file, an unreadable dataset or a dataset of a type numpy has no
#: equivalent for (h5py raises TypeError there, and also for indexing a group like a dataset)
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)


def _keys(grp) -> list[str]:
    """The member names of `grp`, for messages (a damaged file may hold names that are not UTF-8)."""
    try:
        return sorted(k if isinstance(k, str) else repr(k) for k in grp.keys())
    except H5_ERRORS as err:
        return [f"<unreadable: {err}>"]


def _read(grp, key: str, where: str) -> np.ndarray:
    """Dataset `key` of group `grp` as an array; DataError naming `where` and `key` if it is
    missing, a group, or cannot be read."""
    import h5py

    try:
        obj = grp.get(key)
        if obj is None:
            raise DataError(f"{where}: no {key!r} dataset; the group has {_keys(grp)}")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(f"{where}: {key!r} is a {type(obj).__name__.lower()}, expected a dataset (an array)")
        return np.asarray(obj[()])
    except DataError:
        raise
    except MemoryError:  # a damaged dataspace declaring a huge shape
        raise DataError(f"{where}: cannot read {key!r}: it declares an array too large for memory "
                        "(a damaged file?)") from None
    except H5_ERRORS as err:
        raise DataError(f"{where}: cannot read {key!r} ({type(err).__name__}: {err})") from err


def _species_to_numbers(species: np.ndarray, where: str, key: str = "species") -> np.ndarray:
    from ase.data import atomic_numbers

    species = np.asarray(species).reshape(-1)
    if species.dtype.kind not in "SUO":
        return atomic_numbers_of(species, where, key)
    out = []
    for s in species.tolist():
        if not isinstance(s, (bytes, str)):
            raise DataError(f"{where}: {key!r} holds {s!r}, expected element symbols or atomic numbers")
        sym = s.decode(errors="replace") if isinstance(s, bytes) else s
        sym = sym.strip()
        if sym not in atomic_numbers:
            raise DataError(f"{where}: unknown element symbol {sym!r} in species")
        out.append(atomic_numbers[sym])
    return np.array(out, dtype=np.int64)


def read_hdf5(
    path: str | Path,
    fidelity: str | Sequence[str] | None = None,
    *,
    levels: Mapping[str, tuple[str | None, str | None]] | None = None,
    coordinates_key: str = "coordinates",
    species_key: str = "species",
    energy_key: str = "energies",
    forces_key: str | None = "forces",
    energy_unit: str = "hartree",
    force_unit: str = "hartree/A",
    length_unit: str = "A",
    forces_are_gradients: bool = True,
    nan_as_missing: bool = False,
    groups: Sequence[str] | None = None,
) -> Dataset:
    """Read an ANI-style HDF5 file (source and sign convention in the module docstring).

    Parameters
    ----------
    path: the ``.h5`` / ``.hdf5`` file.
    fidelity: the fidelity name of the single level (default ``"default"``); with ``levels``, a level
        name or list of names to load.
    levels: fidelity name -> (energy key, forces key) for files with several levels per group (e.g.
        ANI-1x ``{"wb97x_dz": ("wb97x_dz.energy", "wb97x_dz.forces"), "ccsd_t": ("ccsd(t)_cbs.energy",
        None)}``). Replaces ``energy_key`` / ``forces_key``.
    coordinates_key, species_key, energy_key, forces_key: dataset names inside each group. A group is
        a molecule if it holds ``coordinates_key``. ``forces_key`` may be absent from a group (no forces
        then) unless given in ``levels``.
    energy_unit, force_unit, length_unit: stored units (default Hartree, Hartree/Å, Å).
    forces_are_gradients: the stored vectors are dE/dx and get negated (default True, as in COMP6).
    nan_as_missing: treat NaN energies / forces as missing labels (ANI-1x convention) instead of an error.
    groups: only read these group paths (default all).

    Returns a Dataset of frames with positions (n, 3) Å, energies eV, forces (n, 3) eV/Å and
    ``source = f"{path}:{index}"`` with ``index`` counting frames over all groups.
    """
    import h5py

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, expected an HDF5 file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        e_fac = energy_factor(energy_unit)
        f_fac = force_factor(force_unit) * (-1.0 if forces_are_gradients else 1.0)
        r_fac = length_factor(length_unit)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None

    explicit = levels is not None
    if levels is None:
        levels = {fidelity if isinstance(fidelity, str) else "default": (energy_key, forces_key)}
    elif fidelity is not None:
        wanted = [fidelity] if isinstance(fidelity, str) else list(fidelity)
        unknown = [f for f in wanted if f not in levels]
        if unknown:
            raise DataError(f"{path}: unknown level(s) {unknown}; levels given are {sorted(levels)}")
        levels = {f: levels[f] for f in wanted}

    try:
        h5 = h5py.File(path, "r")
    except H5_ERRORS as err:
        raise DataError(f"{path}: cannot open as HDF5: {err}") from None
    frames: list[Frame] = []
    with h5:
        names: list[str] = []
        try:
            if groups is None:
                if coordinates_key in h5:
                    names.append("/")
                h5.visititems(
                    lambda name, obj: names.append(name) if isinstance(obj, h5py.Group) and coordinates_key in obj
                    else None
                )
            else:
                for g in groups:
                    if g not in h5 or not isinstance(h5[g], h5py.Group) or coordinates_key not in h5[g]:
                        raise DataError(f"{path}: group {g!r} not found or holds no {coordinates_key!r}")
                names = list(groups)
        except DataError:
            raise
        except H5_ERRORS as err:
            raise DataError(f"{path}: cannot list the groups, the file is damaged ({type(err).__name__}: {err})"
                            ) from err
        if not names:
            raise DataError(f"{path}: no group holds a {coordinates_key!r} dataset; is this an ANI-style HDF5 file?")

        for gname in names:
            where = f"{path}: group {gname!r}"
            try:
                grp = h5[gname]
            except H5_ERRORS as err:
                raise DataError(f"{where}: cannot open ({type(err).__name__}: {err})") from err
            numbers = _species_to_numbers(_read(grp, species_key, where), where, species_key)
            coords = numeric(_read(grp, coordinates_key, where), where, coordinates_key)
            n = numbers.shape[0]
            if coords.ndim == 2:
                coords = coords[None]
            if coords.ndim != 3 or coords.shape[1:] != (n, 3):
                raise DataError(f"{where}: {coordinates_key!r} has shape {coords.shape}, expected (frames, {n}, 3)")
            n_frames = coords.shape[0]
            table = {}
            for fid, (e_key, f_key) in levels.items():
                energies = forces = None
                if e_key is not None:
                    if e_key not in grp:
                        raise DataError(f"{where}: level {fid!r}: no energy dataset {e_key!r}; the group has "
                                        f"{_keys(grp)}")
                    energies = numeric(_read(grp, e_key, where), where, e_key)
                    if energies.size != n_frames:
                        raise DataError(
                            f"{where}: {e_key!r} has shape {energies.shape}: {energies.size} energies for "
                            f"{n_frames} frames"
                        )
                    energies = energies.reshape(n_frames) * e_fac
                if f_key is not None and (f_key in grp or explicit):
                    if f_key not in grp:
                        raise DataError(f"{where}: level {fid!r}: no forces dataset {f_key!r}; the group has "
                                        f"{_keys(grp)}")
                    forces = numeric(_read(grp, f_key, where), where, f_key)
                    if forces.shape != (n_frames, n, 3):
                        raise DataError(f"{where}: {f_key!r} has shape {forces.shape}, expected ({n_frames}, {n}, 3)")
                    forces = forces * f_fac
                table[fid] = (energies, forces)
            positions = coords * r_fac
            for i in range(n_frames):
                labels = {}
                for fid, (energies, forces) in table.items():
                    e = None if energies is None else float(energies[i])
                    f = None if forces is None else forces[i]
                    if nan_as_missing:
                        e = None if e is not None and np.isnan(e) else e
                        f = None if f is not None and np.isnan(f).any() else f
                    labels[fid] = Labels(energy=e, forces=f)
                source = f"{path}:{len(frames)}"
                try:
                    frames.append(Frame(numbers=numbers, positions=positions[i], labels=labels, source=source))
                except DataError as err:
                    raise DataError(f"{err} (group {gname!r}, conformer {i})") from None
    return Dataset(frames, name=path.stem)
