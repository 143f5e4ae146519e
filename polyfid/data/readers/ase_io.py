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
                raw = np.asarray(val)
                if raw.dtype.kind not in "iuf" and raw.dtype.kind not in "USO":
                    raise TypeError  # bool, complex, dates: not a number, even though numpy would convert them
                val = raw.astype(np.float64) * factors[kind]
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


def _integer(value: Any, key: str, where: str) -> int:
    """``atoms.info[key]`` as a whole number; DataError naming the frame otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{where or 'structure'}: {key} is {value!r}, expected a whole number")
    if not np.isfinite(value) or float(value) != int(value):
        raise DataError(f"{where or 'structure'}: {key} is {value!r}, expected a whole number")
    return int(value)


def _atoms_frame(atoms, labels: Labels, fidelity: str, source: str) -> Frame:
    cell = None if atoms.cell.rank == 0 else np.array(atoms.cell[:])
    info = atoms.info
    kwargs: dict[str, Any] = {}
    for name, keys in (("charge", ("charge", "total_charge")), ("multiplicity", ("multiplicity", "spin_multiplicity"))):
        for k in keys:
            if k in info and np.ndim(info[k]) == 0:
                kwargs[name] = _integer(info[k], k, source)
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


#: ASE formats read by the extended-XYZ parser: their frames are located by :func:`_scan_xyz` first
_XYZ_FORMATS = ("extxyz", "xyz")


def _ase_format(path: Path, ase_format: str | None) -> str:
    """The ASE format of `path` (given, or guessed by ASE from name and content); DataError for an
    empty file or a format neither polyfid nor ASE knows."""
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    fmt = ase_format
    if fmt is None:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        try:
            fmt = filetype(str(path))
        except UnknownFileTypeError as err:
            fmt = str(err)
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot guess the file format ({type(err).__name__}: {err})") from None
    if fmt not in ioformats:
        from polyfid.data.readers import READERS  # the registry imports this module

        raise DataError(
            f"{path}: unknown file format (suffix {path.suffix or 'none'!r}); name it: polyfid formats "
            f"{sorted(READERS)} (format=..., --format), or any ASE format name (ase_format=...), e.g. extxyz"
        )
    return fmt


def _open_text(path: Path):
    """The file as UTF-8 text, decompressed as ASE would (.gz, .bz2, .xz)."""
    import io

    from ase.io.formats import open_with_compression

    return io.TextIOWrapper(open_with_compression(str(path), "rb"), encoding="utf-8")


def _scan_xyz(path: Path) -> int:
    """Number of frames of an (extended) XYZ file, walking the frame headers as ASE does (atom count,
    comment line, that many atom lines, up to three ``VEC`` lines), so that a damaged frame is named
    by its own index and line: ASE scans the whole file before yielding the first frame and would
    blame frame 0. Also refuses a blank line between frames (ASE stops there, silently dropping the
    rest). Reads only the lines, parses nothing else."""
    n_frames = n_atoms = header = 0
    line_no = 0
    count_inside: int | None = None
    try:
        with _open_text(path) as fh:
            lines = iter(fh)
            n_vec = 0
            for line in lines:
                line_no += 1
                if n_frames and n_vec < 3 and line.lstrip().startswith("VEC"):
                    n_vec += 1  # a cell vector of the frame before (plain XYZ)
                    continue
                if not line.strip():
                    rest = sum(1 for ln in lines if ln.strip())
                    if rest:
                        raise DataError(
                            f"{path}: frame {n_frames}: cannot parse: line {line_no} is blank where the atom count "
                            f"belongs ({rest} non-blank line(s) follow, which ASE would silently drop)"
                        )
                    break
                try:
                    n_atoms = int(line)
                except ValueError:
                    if count_inside is not None:  # the frame before swallowed this frame's header
                        raise DataError(
                            f"{path}: frame {n_frames - 1}: cannot parse: the header at line {header} says "
                            f"{n_atoms} atoms, but line {count_inside} among them is an atom count: is the count "
                            "too large?"
                        ) from None
                    if n_frames and len(line.split()) >= 4 and line.split()[0].isalpha():
                        raise DataError(
                            f"{path}: frame {n_frames - 1}: cannot parse: the header at line {header} says "
                            f"{n_atoms} atoms, but line {line_no} after them looks like one more atom: is the count "
                            "too small?"
                        ) from None
                    raise DataError(
                        f"{path}: frame {n_frames}: cannot parse: line {line_no}: expected the atom count, got "
                        f"{line.strip()[:60]!r}"
                    ) from None
                if n_atoms < 0:
                    raise DataError(f"{path}: frame {n_frames}: cannot parse: line {line_no}: atom count {n_atoms}")
                header = line_no
                got = -1  # the comment line, then the atom lines
                count_inside = None  # an atom line that reads as an atom count
                for _ in range(n_atoms + 1):
                    atom_line = next(lines, None)
                    if atom_line is None:
                        break
                    got += 1
                    line_no += 1
                    if got > 0 and count_inside is None and atom_line.strip().isdigit():
                        count_inside = line_no
                if got < n_atoms:
                    raise DataError(
                        f"{path}: frame {n_frames}: cannot parse: truncated: the header at line {header} says "
                        f"{n_atoms} atoms but the file ends after {max(got, 0)} atom line(s)"
                    )
                n_frames += 1
                n_vec = 0
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text file (byte {err.start} is not UTF-8); is the format right?") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    return n_frames


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
    _check_file(path)
    e_fac, f_fac, r_fac, s_fac = _factors(path, energy_unit, force_unit, length_unit, stress_unit)
    name = fidelity or "default"
    keys = {"energy": energy_key or "energy", "forces": forces_key or "forces", "stress": stress_key or "stress"}
    required = {kind for kind, k in (("energy", energy_key), ("forces", forces_key), ("stress", stress_key)) if k}
    factors = {"energy": e_fac, "forces": f_fac, "stress": s_fac}
    fmt = _ase_format(path, ase_format)
    numbering: list[int] | None = None  # file index of the k-th frame read, where known
    if fmt in _XYZ_FORMATS:
        n_frames = _scan_xyz(path)
        if n_frames == 0:
            raise DataError(f"{path}: the file holds no frames (blank)")
        numbering = _file_indices(path, index, n_frames)

    frames: list[Frame] = []
    iterator = ase.io.iread(path, index=index, format=fmt)
    while True:
        k = len(frames)
        i = numbering[k] if numbering is not None and k < len(numbering) else k
        try:
            atoms = next(iterator)
        except StopIteration:
            break
        # A deliberate catch-all, and the only code inside it is ASE's parser: its format modules
        # raise whatever their parsing meets on malformed input (ValueError, IndexError, KeyError,
        # AssertionError, AttributeError, struct.error, XYZError, ...). The type is named, the chain
        # kept for --debug.
        except Exception as err:
            what = "frame" if numbering is not None else "frame (in reading order)"
            raise DataError(f"{path}: {what} {i}: cannot parse: {type(err).__name__}: {err}") from err
        where = f"{path}:{i}"
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


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: a folder, expected a file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _file_indices(path: Path, index: str | int | slice, n_frames: int) -> list[int]:
    """File indices of the frames `index` selects from a file of `n_frames` frames."""
    from ase.io.formats import string2index

    try:
        idx = string2index(index) if isinstance(index, str) else index
        return [range(n_frames)[idx]] if isinstance(idx, int) else list(range(n_frames)[idx])
    except (ValueError, TypeError, IndexError) as err:
        raise DataError(f"{path}: index {index!r} does not select frames of its {n_frames}: {err}") from None


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _open_ase_db(path: Path):
    """An ASE database at `path`, opened so that reading never changes the file: ase.db.connect
    would create its tables in an SQLite file without them (a foreign file, an empty file).
    An SQLite file is checked for ASE's ``systems`` table and opened read-only (``mode=ro``);
    other files go to ase.db.connect when their suffix names an ASE database type (.json)."""
    import sqlite3

    import ase.db
    from ase.db.sqlite import SQLite3Database

    with open(path, "rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if not head:
        raise DataError(f"{path}: the file is empty")
    if head != _SQLITE_MAGIC:
        if path.suffix.lower() == ".json":
            return ase.db.connect(str(path), type="json")
        raise DataError(f"{path}: not an ASE database (not an SQLite file)")
    uri = f"{path.absolute().as_uri()}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise DataError(f"{path}: not an ASE database ({err})") from None
    if "systems" not in tables:
        hint = "; it looks like a polyfid label store: read it with format='labels'" if "labels" in tables else ""
        raise DataError(f"{path}: an SQLite file without ASE's tables (it has {sorted(tables)}), not an ASE "
                        f"database{hint}")

    class ReadOnly(SQLite3Database):
        def _connect(self):
            return sqlite3.connect(uri, uri=True, timeout=20)

    return ReadOnly(str(path), create_indices=False)


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
    An SQLite database is opened read-only; one without ASE's tables is refused, untouched.
    """
    path = Path(path)
    _check_file(path)
    e_fac, f_fac, r_fac, s_fac = _factors(path, energy_unit, force_unit, length_unit, stress_unit)
    name = fidelity or "default"
    keys = {"energy": energy_key or "energy", "forces": forces_key or "forces", "stress": stress_key or "stress"}
    required = {kind for kind, k in (("energy", energy_key), ("forces", forces_key), ("stress", stress_key)) if k}
    factors = {"energy": e_fac, "forces": f_fac, "stress": s_fac}
    # A deliberate catch-all around ASE's database code only: on a damaged file sqlite3, json and
    # ASE's row decoding raise whatever they meet (DatabaseError, ValueError, KeyError, TypeError,
    # struct.error, ...). The type is named, the chain kept for --debug.
    try:
        db = _open_ase_db(path)
        rows = list(db.select(selection))
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read as an ASE database: {type(err).__name__}: {err}") from err
    frames = []
    for k, row in enumerate(rows):
        where = f"{path}:{k}"
        try:  # ASE's decoding of one row, as above
            atoms = row.toatoms()
            results = dict(atoms.calc.results) if atoms.calc is not None else {}
            data = dict(row.data) if row.get("data") is not None else {}
            kvp = dict(row.key_value_pairs)
        except Exception as err:
            raise DataError(f"{where}: row id {row.get('id')}: cannot decode: {type(err).__name__}: {err}") from err
        sources = {kind: ([results, data, kvp] if keys[kind] == kind else [data, kvp, results]) for kind in keys}
        if r_fac != 1.0:
            atoms.positions *= r_fac
            atoms.cell *= r_fac
        try:
            labels = _labels(sources, keys, required, where, factors)
            frames.append(_atoms_frame(atoms, labels, name, where))
        except DataError as err:
            raise DataError(f"{err} (row id {row.id})") from None
    if not frames:
        raise DataError(f"{path}: no rows selected (selection {selection!r})")
    return Dataset(frames, name=path.stem)
