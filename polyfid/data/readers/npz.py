"""Reader for sGDML / MD17 / revised-MD17 ``.npz`` files.

Two layouts are recognised from the keys in the archive:

* revised MD17 (Christensen & von Lilienfeld 2020, https://doi.org/10.6084/m9.figshare.12672038,
  paper https://doi.org/10.1088/2632-2153/abba6f): ``nuclear_charges`` (n,), ``coords`` (F, n, 3) Å,
  ``energies`` (F,) kcal/mol, ``forces`` (F, n, 3) kcal/mol/Å (PBE/def2-SVP, ORCA), and
  ``old_energies`` / ``old_forces`` (the original MD17 labels, PBE+vdW-TS, FHI-aims) on the same
  geometries. The two label sets become two fidelities of the same frames: ``"pbe_def2svp"`` and
  ``"md17_pbe_ts"``.
* sGDML (Chmiela et al., http://sgdml.org, https://github.com/stefanch/sGDML; also the original MD17
  files and mbGDML data sets): ``z`` (n,), ``R`` (F, n, 3), ``E`` (F,) or (F, 1), ``F`` (F, n, 3),
  optionally ``e_unit`` / ``r_unit`` strings. Default units kcal/mol and Å. One fidelity,
  ``"default"`` unless named.

Everything is converted to eV and Å on reading.
"""

from __future__ import annotations

import tokenize
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.units import energy_factor, force_factor, length_factor
from polyfid.errors import DataError

#: default levels of a revised-MD17 file: fidelity name -> (energy key, forces key)
RMD17_LEVELS: dict[str, tuple[str | None, str | None]] = {
    "pbe_def2svp": ("energies", "forces"),
    "md17_pbe_ts": ("old_energies", "old_forces"),
}
#: default level of an sGDML file (the name is replaced by ``fidelity`` when given)
SGDML_LEVELS: dict[str, tuple[str | None, str | None]] = {"default": ("E", "F")}

# unit spellings used by sGDML files that polyfid.data.units does not know
_UNIT_ALIASES = {"ang": "angstrom", "angstroms": "angstrom", "au": "hartree", "a.u.": "hartree", "kcal": "kcal/mol"}


def _unit(kind: str, unit: str, path: Path) -> float:
    u = _UNIT_ALIASES.get(unit.strip().lower(), unit)
    try:
        return {"energy": energy_factor, "length": length_factor, "force": force_factor}[kind](u)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


#: what numpy and zipfile raise on a damaged archive or member (bad CRC, bad deflate stream,
#: truncated member, a pickled object array refused with allow_pickle=False, and a damaged .npy
#: header, which numpy parses with tokenize and ast)
LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, SyntaxError,
               tokenize.TokenError)


def _entry(data: Mapping[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    """Member `key` of the archive, decompressed and decoded; DataError naming file and key."""
    try:
        return np.asarray(data[key])  # zipfile checks the member's CRC as numpy reads it to the end
    except MemoryError:  # a damaged .npy header declaring a huge shape
        raise DataError(f"{path}: {key!r} cannot be read: its header declares an array too large for memory; "
                        "the archive is damaged or the file too big") from None
    except LOAD_ERRORS as err:
        if "allow_pickle" in str(err):
            raise DataError(f"{path}: {key!r} holds Python objects (a pickled object array), expected numbers; "
                            "polyfid does not load pickles") from None
        raise DataError(f"{path}: {key!r} cannot be read, the archive is damaged ({type(err).__name__}: {err})"
                        ) from err


def numeric(arr: np.ndarray, where: str, key: str) -> np.ndarray:
    """`arr` as float64 if it holds real numbers (floats or integers); DataError naming `where` and
    `key` for strings, objects, booleans, complex numbers, dates."""
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{where}: {key!r} has dtype {arr.dtype}, expected real numbers (float)")
    return arr.astype(np.float64, copy=False)


def atomic_numbers_of(arr: np.ndarray, where: str, key: str) -> np.ndarray:
    """`arr` as int64 atomic numbers if it holds whole numbers; DataError naming `where` and `key`."""
    if arr.dtype.kind == "f" and np.all(np.abs(arr) < 1000) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        whole = " with non-whole values" if arr.dtype.kind == "f" else ""
        raise DataError(f"{where}: {key!r} has dtype {arr.dtype}{whole}, expected atomic numbers (integers)")
    return arr.astype(np.int64)


def _str_entry(data: Mapping[str, np.ndarray], key: str, path: Path) -> str | None:
    if key not in data:
        return None
    val = _entry(data, key, path)
    val = val.item() if val.size == 1 else val
    return val.decode(errors="replace") if isinstance(val, bytes) else str(val)


def select(frames: np.ndarray, index, path: Path) -> np.ndarray:
    """``frames[index]`` as a 1-D array; DataError for an index that selects none of them."""
    if index is None:
        return frames
    try:
        return np.atleast_1d(frames[index])
    except (IndexError, TypeError, ValueError) as err:
        raise DataError(f"{path}: index {index!r} does not select frames of its {len(frames)}: {err}") from None


def read_npz(
    path: str | Path,
    fidelity: str | Sequence[str] | None = None,
    *,
    levels: Mapping[str, tuple[str | None, str | None]] | None = None,
    energy_unit: str | None = None,
    force_unit: str | None = None,
    length_unit: str | None = None,
    index: slice | Sequence[int] | np.ndarray | None = None,
) -> Dataset:
    """Read an sGDML, MD17 or revised-MD17 ``.npz`` file (sources in the module docstring).

    Parameters
    ----------
    path: the ``.npz`` file.
    fidelity: for a single-level (sGDML) file, the fidelity name (default ``"default"``). For a
        multi-level file (rMD17), a level name or list of level names to load (default: all present,
        i.e. ``"pbe_def2svp"`` from ``energies``/``forces`` and ``"md17_pbe_ts"`` from
        ``old_energies``/``old_forces``).
    levels: fidelity name -> (energy key, forces key) in the archive; either key may be None.
        Replaces the defaults (use it to rename levels, e.g. ``{"pbe": ("energies", "forces")}``).
        Keys named here must exist.
    energy_unit, force_unit, length_unit: units of the stored values; default the file's
        ``e_unit``/``r_unit`` entries when present, else kcal/mol, kcal/mol/Å, Å. The force unit
        defaults to ``energy_unit/length_unit``.
    index: a slice or integer indices selecting frames (default all).

    Returns a Dataset whose frames have positions (n, 3) in Å, energies in eV, forces (n, 3) in eV/Å,
    and ``source = f"{path}:{frame index in the file}"``.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, expected an .npz file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except LOAD_ERRORS as err:
        raise DataError(f"{path}: cannot read as a numpy .npz archive: {err}") from None
    if not hasattr(archive, "files"):
        raise DataError(f"{path}: holds a single array, not an .npz archive of named arrays")
    with archive as data:
        keys = list(data.files)
        if "nuclear_charges" in keys and "coords" in keys:
            z_key, r_key, default_levels = "nuclear_charges", "coords", RMD17_LEVELS
        elif "z" in keys and "R" in keys:
            z_key, r_key, default_levels = "z", "R", SGDML_LEVELS
        else:
            raise DataError(
                f"{path}: unknown npz layout; expected rMD17 keys (nuclear_charges, coords, energies, forces) "
                f"or sGDML keys (z, R, E, F); the file has {keys}"
            )

        explicit = levels is not None
        levels = dict(levels) if levels is not None else dict(default_levels)
        if isinstance(fidelity, str) and len(levels) == 1 and fidelity not in levels:
            levels = {fidelity: next(iter(levels.values()))}  # name the only level
            required = set(levels)
        elif fidelity is not None:
            wanted = [fidelity] if isinstance(fidelity, str) else list(fidelity)
            unknown = [f for f in wanted if f not in levels]
            if unknown:
                raise DataError(f"{path}: unknown level(s) {unknown}; this file offers {sorted(levels)}")
            levels = {f: levels[f] for f in wanted}
            required = set(wanted)
        else:
            required = set(levels) if explicit else {next(iter(levels))}

        # units: explicit options > strings in the file > kcal/mol and Å
        e_unit = energy_unit or _str_entry(data, "e_unit", path) or "kcal/mol"
        r_unit = length_unit or _str_entry(data, "r_unit", path) or "angstrom"
        e_fac = _unit("energy", e_unit, path)
        r_fac = _unit("length", r_unit, path)
        f_fac = _unit("force", force_unit, path) if force_unit else e_fac / r_fac

        numbers = atomic_numbers_of(_entry(data, z_key, path), str(path), z_key).reshape(-1)
        coords = numeric(_entry(data, r_key, path), str(path), r_key)
        n_atoms = numbers.shape[0]
        if coords.ndim == 2:
            coords = coords[None]
        if coords.ndim != 3 or coords.shape[1:] != (n_atoms, 3):
            raise DataError(
                f"{path}: {r_key!r} has shape {coords.shape}, expected (frames, {n_atoms}, 3) "
                f"for the {n_atoms} atoms in {z_key!r}"
            )
        n_frames = coords.shape[0]
        sel = select(np.arange(n_frames), index, path)

        table: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        for name, (e_key, f_key) in levels.items():
            arrays: list[np.ndarray | None] = []
            for key, kind in ((e_key, "energy"), (f_key, "forces")):
                if key is None:
                    arrays.append(None)
                    continue
                if key not in keys:
                    if name not in required:
                        arrays.append(None)  # optional default level (e.g. no old_* keys)
                        continue
                    raise DataError(f"{path}: level {name!r}: {kind} key {key!r} not in the file; keys are {keys}")
                arr = numeric(_entry(data, key, path), str(path), key)
                if kind == "energy":
                    if arr.size != n_frames:
                        raise DataError(
                            f"{path}: {key!r} has shape {arr.shape}: {arr.size} energies for {n_frames} frames"
                        )
                    arr = arr.reshape(n_frames)[sel] * e_fac
                else:
                    if arr.shape != (n_frames, n_atoms, 3):
                        raise DataError(f"{path}: {key!r} has shape {arr.shape}, expected ({n_frames}, {n_atoms}, 3)")
                    arr = arr[sel] * f_fac
                arrays.append(arr)
            if arrays[0] is not None or arrays[1] is not None:
                table[name] = (arrays[0], arrays[1])
        positions = coords[sel] * r_fac

    frames = []
    for j, i in enumerate(sel.tolist()):
        labels = {
            name: Labels(
                energy=None if energies is None else float(energies[j]),
                forces=None if forces is None else forces[j],
            )
            for name, (energies, forces) in table.items()
        }
        frames.append(Frame(numbers=numbers, positions=positions[j], labels=labels, source=f"{path}:{i}"))
    return Dataset(frames, name=path.stem)
