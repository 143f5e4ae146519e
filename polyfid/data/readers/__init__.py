"""Data readers: every supported format into a :class:`~polyfid.data.frame.Dataset` in eV and Å.

``read(path, format=None, fidelity=None, **options)`` picks the reader from ``format`` or from the
file name and content:

==========  ==============================================  ==========================================
format      what                                            detected from
==========  ==============================================  ==========================================
ase         anything ``ase.io`` reads (extxyz, traj, ...)   any suffix not claimed below
extxyz      alias of ``ase``
ase-db      ASE database (``ase.db``)                       ``.db``
npz         sGDML / MD17 / revised MD17                     ``.npz``
hdf5        ANI-style HDF5 (COMP6, ANI-1x)                  ``.h5``, ``.hdf5``
pyseqm      PYSEQM folder of ``.npy`` files                 a folder holding ``Z.npy`` and ``R.npy``
labels      polyfid label store (``polyfid label``)         ``.sqlite``
qm22        QM-22 xyz (energy line, gradient columns)       ``.xyz`` whose second line is one number
==========  ==============================================  ==========================================
"""

from __future__ import annotations

import sqlite3
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from polyfid.data.frame import Dataset
from polyfid.data.merge import MERGE_TOLERANCE
from polyfid.data.readers.ase_io import read_ase, read_ase_db
from polyfid.data.readers.hdf5 import read_hdf5
from polyfid.data.readers.label_store import read_label_store
from polyfid.data.readers.npz import read_npz
from polyfid.data.readers.pyseqm import read_pyseqm
from polyfid.data.readers.qm22 import read_qm22
from polyfid.errors import DataError, PolyfidError

#: what numpy, zipfile, zlib, h5py, sqlite3 and ASE raise on malformed input (see `read`)
INPUT_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, UnicodeError, zipfile.BadZipFile, zlib.error,
                struct.error, sqlite3.DatabaseError)

#: format name -> reader ``f(path, fidelity=None, **options) -> Dataset``
READERS: dict[str, Callable[..., Dataset]] = {
    "ase": read_ase,
    "extxyz": read_ase,
    "ase-db": read_ase_db,
    "npz": read_npz,
    "hdf5": read_hdf5,
    "pyseqm": read_pyseqm,
    "qm22": read_qm22,
    "labels": read_label_store,
}

_SUFFIXES = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".db": "ase-db", ".sqlite": "labels"}


def _looks_like_qm22(path: Path) -> bool:
    """True if the first frame reads: atom count / one number / ``El x y z gx gy gz`` lines."""
    try:
        with open(path) as fh:
            head = [fh.readline() for _ in range(3)]
    except (OSError, UnicodeDecodeError):
        return False
    try:
        int(head[0])
        float(head[1])
    except ValueError:
        return False
    return len(head[2].split()) == 7


def detect_format(path: str | Path) -> str:
    """Name of the reader for `path` (see the table in the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / "Z.npy").is_file() and (path / "R.npy").is_file():
            return "pyseqm"
        if path.suffix.lower() in _SUFFIXES:
            raise DataError(f"{path}: a folder, expected a file ({_SUFFIXES[path.suffix.lower()]} format)")
        raise DataError(f"{path}: a folder, but not a PYSEQM folder (no Z.npy and R.npy); give a file")
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    if suffix == ".xyz" and _looks_like_qm22(path):
        return "qm22"
    return "ase"


def read(
    path: str | Path | Sequence[str | Path],
    format: str | None = None,
    fidelity: str | Sequence[str | None] | None = None,
    merge_tolerance: float | None = MERGE_TOLERANCE,
    **options: Any,
) -> Dataset:
    """Read `path` into a Dataset (eV, Å), with the reader for `format` or the detected one.

    `fidelity` names the level of theory of single-level files (default ``"default"``); for
    multi-level files (rMD17, PYSEQM) it selects levels by name. `options` go to the reader (see
    each reader's docstring: units, key names, index, levels). Raises DataError for a missing path,
    an unknown format, or malformed data.

    A list of two or more paths reads each with the same options and merges them
    (`Dataset.merge`): the same geometry in two files, within `merge_tolerance` Å, becomes one
    frame with the label sets of both (None: concatenate); one file is read as it is. `fidelity`
    is then one name for all files (or a list of one) or a list with one per file; a single-level
    file whose labels get no name takes its file's stem (pbe.extxyz: "pbe"), so that one file per
    level merges into one frame per geometry with a label set per level.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise DataError("read: an empty list of paths")
        names = list(fidelity) if isinstance(fidelity, (list, tuple)) else [fidelity]
        names = names * len(path) if len(names) == 1 else names
        if len(names) != len(path):
            raise DataError(f"read: {len(names)} fidelity names for {len(path)} files; give one, or one per file")
        if len(path) == 1:
            return read(path[0], format=format, fidelity=names[0], **options)
        parts = []
        for p, name in zip(path, names):
            ds = read(p, format=format, fidelity=name, **options)
            if name is None and ds.fidelities == ["default"]:
                ds.rename_fidelity("default", Path(p).stem)
            parts.append(ds)
        return Dataset.merge(parts, tolerance=merge_tolerance)
    if isinstance(fidelity, (list, tuple)):
        if len(fidelity) != 1:
            raise DataError(f"read: {len(fidelity)} fidelity names for one file ({path}); give one")
        fidelity = fidelity[0]
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = format.lower() if format else detect_format(path)
    if fmt not in READERS:
        raise DataError(f"{path}: unknown format {format!r}; known formats: {sorted(READERS)}")
    try:
        ds = READERS[fmt](path, fidelity=fidelity, **options)
    except PolyfidError:
        raise
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise DataError(f"{path}: option not understood by the {fmt!r} reader: {err}") from None
        raise
    # The one boundary where library errors on malformed input are caught wholesale. Every reader
    # turns what it anticipates into a DataError naming file, frame and key; what a library raises
    # on bytes nobody anticipated (a damaged archive member, an unreadable page, a truncated
    # stream) still says the file is unreadable, not that polyfid has a bug. Only the types that
    # libraries raise for bad input are caught, with the original type named and chained for
    # --debug; TypeError, AttributeError and the like are left alone: they signal bugs in polyfid.
    except INPUT_ERRORS as err:
        raise DataError(f"{path}: cannot read as {fmt!r} data ({type(err).__name__}: {err})") from err
    if len(ds) == 0:
        raise DataError(f"{path}: no frames (an empty file, or options that select none)")
    return ds


def load_dataset(spec: Mapping[str, Any]) -> Dataset:
    """Read a data set described by a dict (e.g. from a YAML config)::

        {"path": "../shared/data/rmd17/rmd17_ethanol_train_01.npz", "format": "npz",
         "fidelity": "pbe_def2svp", "options": {"index": [0, 1, 2]}}

    Only ``path`` is required. Unknown top-level keys raise DataError.
    """
    allowed = {"path", "format", "fidelity", "options"}
    unknown = set(spec) - allowed
    if unknown:
        raise DataError(f"data set spec: unknown key(s) {sorted(unknown)}; expected {sorted(allowed)}")
    if "path" not in spec:
        raise DataError(f"data set spec: no 'path' in {dict(spec)}")
    options = dict(spec.get("options") or {})
    return read(spec["path"], format=spec.get("format"), fidelity=spec.get("fidelity"), **options)


__all__ = [
    "READERS",
    "detect_format",
    "load_dataset",
    "read",
    "read_ase",
    "read_ase_db",
    "read_hdf5",
    "read_npz",
    "read_pyseqm",
    "read_label_store",
    "read_qm22",
]
