"""An on-disk label store: one SQLite row per (structure, level), committed as each
calculation finishes.

Why SQLite: every result is one transaction, so a process killed at any moment leaves
either the whole row or nothing (the journal rolls a half-written transaction back); several
processes may read while one writes; it ships with Python. Structures are keyed by a hash
of (atomic numbers, positions rounded to 1e-8 Å, cell, pbc, charge, multiplicity); the
geometry itself is stored too, so the store reads back as a multi-fidelity data set.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from polyfid.data.errors import DataError
from polyfid.data.frame import Dataset, Frame, Labels

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    key TEXT NOT NULL,
    level TEXT NOT NULL,
    status TEXT NOT NULL,          -- 'ok' or 'failed'
    energy REAL,                   -- eV
    forces BLOB,                   -- float64 (N, 3) eV/Å, or NULL
    reason TEXT,                   -- why a calculation failed
    seconds REAL,
    numbers BLOB NOT NULL,         -- int64 (N,)
    positions BLOB NOT NULL,       -- float64 (N, 3) Å
    cell BLOB,                     -- float64 (3, 3) Å, or NULL
    pbc TEXT,
    charge INTEGER NOT NULL,
    multiplicity INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (key, level)
);
"""


def structure_key(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: Iterable[bool] | None = None,
    charge: int = 0,
    multiplicity: int = 1,
) -> str:
    """Hash of a structure: positions rounded to 1e-8 Å, so that the same geometry read
    back from different files gets the same key."""
    h = hashlib.sha256()
    h.update(np.asarray(numbers, dtype=np.int64).tobytes())
    # +0.0 turns −0.0 into 0.0: equal geometries must hash equally
    h.update((np.round(np.asarray(positions, dtype=np.float64), 8) + 0.0).tobytes())
    if cell is not None:
        h.update((np.round(np.asarray(cell, dtype=np.float64), 8) + 0.0).tobytes())
        h.update(json.dumps([bool(p) for p in (pbc if pbc is not None else [True] * 3)]).encode())
    h.update(f"{int(charge)},{int(multiplicity)}".encode())
    return h.hexdigest()


def frame_key(frame: Frame) -> str:
    return structure_key(frame.numbers, frame.positions, frame.cell, frame.pbc, frame.charge, frame.multiplicity)


class LabelStore:
    """Labels per (structure, level) in an SQLite file; safe to kill at any moment."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        """Open (or with `create`, create) the store at `path`."""
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DataError(f"{self.path}: no label store there")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(self.path, timeout=60.0)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.executescript(SCHEMA)
        self._con.commit()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing ----------------------------------------------------------------------
    def put(
        self,
        frame: Frame,
        level: str,
        energy: float | None,
        forces: np.ndarray | None = None,
        seconds: float = 0.0,
        reason: str | None = None,
    ) -> None:
        """Record one result (or, with `reason`, one failure) in its own transaction."""
        status = "failed" if reason is not None else "ok"
        f = None if forces is None else np.ascontiguousarray(forces, dtype=np.float64).tobytes()
        cell = None if frame.cell is None else np.asarray(frame.cell, dtype=np.float64).tobytes()
        pbc = json.dumps([bool(p) for p in frame.pbc])
        # a failure never replaces a finished result (e.g. a failed retry asking for forces)
        sql = "INSERT OR REPLACE INTO labels VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        if reason is not None:
            sql = (
                "INSERT INTO labels VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key, level) DO UPDATE SET "
                "status = CASE WHEN labels.status = 'ok' THEN 'ok' ELSE excluded.status END, "
                "reason = excluded.reason, seconds = excluded.seconds, created = excluded.created"
            )
        with self._con:
            self._con.execute(
                sql,
                (frame_key(frame), level, status, energy, f, reason, seconds,
                 np.asarray(frame.numbers, dtype=np.int64).tobytes(),
                 np.asarray(frame.positions, dtype=np.float64).tobytes(),
                 cell, pbc, int(frame.charge), int(frame.multiplicity), time.time()),
            )

    # ---- reading ----------------------------------------------------------------------
    def done(self, level: str, forces: bool = False) -> set[str]:
        """Keys with a finished result at `level` (with forces if asked), failures included:
        a failure is not retried unless the user removes it; an energy-only result whose
        forces are now asked for is recomputed (and kept if that attempt fails)."""
        q = "SELECT key, status, forces IS NOT NULL, reason FROM labels WHERE level = ?"
        out = set()
        for k, st, has_f, reason in self._con.execute(q, (level,)):
            if st == "ok" and reason is not None and forces:
                out.add(k)  # forces were tried once and failed: the energy stays, no retry
            elif st == "failed" or has_f or not forces:
                out.add(k)
        return out

    def get(self, frame: Frame, level: str) -> tuple[float, np.ndarray | None] | None:
        """(energy eV, forces eV/Å or None) of a finished calculation; None if absent or failed."""
        row = self._con.execute(
            "SELECT status, energy, forces FROM labels WHERE key = ? AND level = ?", (frame_key(frame), level)
        ).fetchone()
        if row is None or row[0] != "ok":
            return None
        f = None if row[2] is None else np.frombuffer(row[2], dtype=np.float64).reshape(-1, 3).copy()
        return float(row[1]), f

    def timings(self, level: str, forces: bool = False) -> list[tuple[int, float]]:
        """(n_atoms, seconds) of the successful calculations at `level`, with forces if asked,
        else those without (or, when there are none, all)."""
        q = "SELECT length(numbers) / 8, seconds FROM labels WHERE level = ? AND status = 'ok' AND seconds > 0"
        rows = list(self._con.execute(q + f" AND forces IS {'NOT ' if forces else ''}NULL", (level,)))
        if not rows and not forces:
            rows = list(self._con.execute(q, (level,)))
        return [(int(n), float(t)) for n, t in rows]

    def failures(self, level: str | None = None) -> list[tuple[str, str, str]]:
        """(key, level, reason) of every failed calculation."""
        q, args = "SELECT key, level, reason FROM labels WHERE status = 'failed'", ()
        if level is not None:
            q, args = q + " AND level = ?", (level,)
        return list(self._con.execute(q, args))

    def counts(self) -> dict[str, dict[str, int]]:
        """{level: {'ok': n, 'failed': m}}."""
        out: dict[str, dict[str, int]] = {}
        for level, st, n in self._con.execute("SELECT level, status, COUNT(*) FROM labels GROUP BY level, status"):
            out.setdefault(level, {"ok": 0, "failed": 0})[st] = n
        return out

    def dataset(self, levels: Iterable[str] | None = None) -> Dataset:
        """Every structure with at least one successful label, one Frame each, labels per
        level (fidelity name = level); failures never enter."""
        q = "SELECT key, level, energy, forces, numbers, positions, cell, pbc, charge, multiplicity " \
            "FROM labels WHERE status = 'ok' ORDER BY created"
        want = None if levels is None else set(levels)
        frames: dict[str, Frame] = {}
        for key, level, e, f, z, r, cell, pbc, charge, mult in self._con.execute(q):
            if want is not None and level not in want:
                continue
            fr = frames.get(key)
            if fr is None:
                numbers = np.frombuffer(z, dtype=np.int64).copy()
                fr = frames[key] = Frame(
                    numbers=numbers,
                    positions=np.frombuffer(r, dtype=np.float64).reshape(-1, 3).copy(),
                    cell=None if cell is None else np.frombuffer(cell, dtype=np.float64).reshape(3, 3).copy(),
                    pbc=np.zeros(3, dtype=bool) if pbc is None else np.array(json.loads(pbc), dtype=bool),
                    source=f"{self.path}:{key[:12]}",
                    charge=int(charge),
                    multiplicity=int(mult),
                )
            forces = None if f is None else np.frombuffer(f, dtype=np.float64).reshape(-1, 3).copy()
            fr.labels[level] = Labels(energy=e, forces=forces)
        if not frames:
            raise DataError(f"{self.path}: no successful labels" + (f" at levels {sorted(want)}" if want else ""))
        return Dataset(list(frames.values()))
