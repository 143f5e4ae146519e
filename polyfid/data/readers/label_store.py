"""Reader for polyfid's label store (``polyfid label`` writes it): an SQLite file with one
row per (structure, level of theory), energies in eV and forces in eV/Å already.

Every structure with at least one successful label becomes one frame; its labels are keyed
by fidelity name = level name with ``/`` replaced by ``_`` (``mp2/cc-pvdz`` → ``mp2_cc-pvdz``,
so that names also work in file names). Failed calculations never enter.

The file is opened read-only and never modified (a store in a read-only folder reads too). An
SQLite file without polyfid's ``labels`` table is refused; so is a damaged row (non-finite
energy, NaN or wrongly sized forces, undecodable arrays), with a DataError naming the file and
the row, rather than entering a data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from polyfid.data.frame import Dataset
from polyfid.errors import DataError


def fidelity_name(level: str) -> str:
    """The fidelity name of a label-store level (``mp2/cc-pvdz`` → ``mp2_cc-pvdz``)."""
    return str(level).replace("/", "_")


def read_label_store(path: str | Path, fidelity: str | Sequence[str] | None = None) -> Dataset:
    """Read a label store; `fidelity`: level(s) to load, by level or fidelity name (default all)."""
    import sqlite3

    from polyfid.label.store import LabelStore

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, expected a label store (an SQLite file)")
    try:
        with LabelStore(path, create=False) as st:
            present = list(st.counts())
            if fidelity is None:
                levels = present
            else:
                wanted = [fidelity] if isinstance(fidelity, str) else list(fidelity)
                by_name = {fidelity_name(lv): lv for lv in present} | {lv: lv for lv in present}
                missing = [w for w in wanted if w not in by_name]
                if missing:
                    raise DataError(f"{path}: level(s) {missing} not in the label store; it holds {present}")
                levels = [by_name[w] for w in wanted]
            ds = st.dataset(levels)
    except sqlite3.DatabaseError as e:  # a damaged file: the header read, a page did not
        raise DataError(f"{path}: cannot read the label store, the file is damaged ({e})") from e
    except UnicodeDecodeError as e:  # sqlite3 decodes TEXT values as UTF-8 when it fetches them
        raise DataError(f"{path}: cannot read the label store: a text field is not UTF-8, the file is damaged "
                        f"({e})") from e
    for lv in levels:
        if fidelity_name(lv) != lv:
            ds = ds.rename_fidelity(lv, fidelity_name(lv))
    return ds
