"""An on-disk label store: one SQLite row per (structure, level), committed as each
calculation finishes.

Why SQLite: every result is one transaction, so a process killed at any moment leaves
either the whole row or nothing (the journal rolls a half-written transaction back); several
processes may read while one writes; it ships with Python. Structures are keyed by a hash
of (atomic numbers, positions rounded to 1e-8 Å, cell, pbc, charge, multiplicity); the
geometry itself is stored too, so the store reads back as a multi-fidelity data set.

Labels of one (structure, level) merge: an energy-only result never erases stored forces.
Several processes may label into one store at once: before computing, a run *claims* the
structures in a ``claims`` table (created on the first claim, never by a reader); another run
skips what is claimed, waits for it, and takes a claim over when its owner process is gone or
has not renewed it for :data:`CLAIM_TIMEOUT` seconds. Readers open the file read-only and
never change it; rows are checked as they are read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.errors import DataError

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
COLUMNS = ("key", "level", "status", "energy", "forces", "reason", "seconds", "numbers", "positions", "cell", "pbc",
           "charge", "multiplicity", "created")

CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    key TEXT NOT NULL,
    level TEXT NOT NULL,
    host TEXT NOT NULL,            -- host name and PID namespace of the owner
    pid INTEGER NOT NULL,
    token TEXT NOT NULL,           -- random per open LabelStore: two stores of one process differ
    heartbeat REAL NOT NULL,       -- time.time() of the owner's last renewal
    PRIMARY KEY (key, level)
)
"""
#: seconds after which a claim nobody renewed is taken over (its owner renews every few seconds)
CLAIM_TIMEOUT = 60.0

_OK_SQL = (
    f"INSERT INTO labels ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT(key, level) DO UPDATE SET status = 'ok', energy = excluded.energy, forces = excluded.forces, "
    # an energy-only result keeps the note that forces were tried and failed
    "reason = CASE WHEN labels.status = 'ok' AND excluded.forces IS NULL THEN labels.reason END, "
    "seconds = excluded.seconds, created = excluded.created "
    # an energy-only result never replaces a row with forces (that row's energy came with them)
    "WHERE excluded.forces IS NOT NULL OR labels.forces IS NULL"
)
_FAILED_SQL = (
    f"INSERT INTO labels ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    # a failure never replaces a finished result (e.g. a failed retry asking for forces)
    "ON CONFLICT(key, level) DO UPDATE SET "
    "status = CASE WHEN labels.status = 'ok' THEN 'ok' ELSE excluded.status END, "
    "reason = excluded.reason, seconds = excluded.seconds, created = excluded.created"
)


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


def _is_done(status: str, has_forces: bool, reason: str | None, forces: bool) -> bool:
    """Whether a row needs no calculation for a run that wants `forces`: failures are not retried
    unless the user removes them; an energy-only result whose forces are now asked for is
    recomputed, unless forces were tried once and failed (the energy stays)."""
    if status == "ok" and reason is not None and forces:
        return True
    return status == "failed" or bool(has_forces) or not forces


def _host() -> str:
    """This machine as claims name it: host name plus PID namespace (pids of another container
    on the same host are not ours to look up)."""
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        host += "/" + os.readlink("/proc/self/ns/pid")
    return host


HOST = _host()
#: tokens of the stores open in this process: a claim with our pid but none of these is left over
_OPEN_TOKENS: set[str] = set()


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists and is not a zombie (an unreaped dead process)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it: rely on the heartbeat
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that never changes the file (no journal-mode switch, no schema)."""
    uri = path.absolute().as_uri()
    con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60.0, isolation_level=None)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return con
    except sqlite3.OperationalError as e:
        con.close()
        # A WAL store in a folder we cannot write: SQLite cannot create the -shm index a read-only
        # reader needs. With no -wal file and no way for anyone to create one, nothing can change
        # the file while we read, so it may be opened as immutable.
        if Path(f"{path}-wal").exists() or os.access(path.parent, os.W_OK):
            raise DataError(f"{path}: cannot open the label store read-only ({e})") from None
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=60.0, isolation_level=None)
    except sqlite3.DatabaseError as e:
        con.close()
        raise DataError(f"{path}: not a polyfid label store ({e})") from None


class LabelStore:
    """Labels per (structure, level) in an SQLite file; safe to kill at any moment.

    With ``create=False`` the file is opened read-only (``mode=ro``) and is never modified;
    writing through such a store raises DataError.
    """

    def __init__(self, path: str | Path, create: bool = True) -> None:
        """Open (or with `create`, create) the store at `path`; DataError if the file is not a
        polyfid label store (it is then left untouched)."""
        self.path = Path(path)
        self.readonly = not create
        #: this store's claims carry it; released on close
        self.token = secrets.token_hex(8)
        self._claims_ready = False
        if create:
            if self.path.exists() and not self.path.is_file():
                raise DataError(f"{self.path}: not a file; expected a label store (SQLite)")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            except (OSError, sqlite3.Error) as e:
                raise DataError(f"{self.path}: cannot open the label store for writing ({e})") from None
        else:
            if not self.path.is_file():
                raise DataError(f"{self.path}: no label store there")
            self._con = _connect_readonly(self.path)
        try:
            tables = self._check_schema(create)
            if create:
                self._con.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                if "labels" not in tables:
                    self._con.executescript(SCHEMA)
                self._claims_ready = "claims" in tables
        except sqlite3.Error as e:
            self._con.close()
            raise DataError(f"{self.path}: cannot prepare the label store ({e})") from None
        except BaseException:
            self._con.close()
            raise
        _OPEN_TOKENS.add(self.token)

    def _check_schema(self, create: bool) -> set[str]:
        """The tables of the file; DataError unless it holds polyfid's ``labels`` table (or, to
        be created, is empty). Reads only."""
        try:
            tables = {n for (n,) in self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a polyfid label store ({e})") from None
        if "labels" not in tables:
            if create and not tables:
                return tables
            what = (f"an SQLite database with tables {sorted(tables)} but no 'labels' table" if tables
                    else "an SQLite database without tables")
            raise DataError(f"{self.path}: not a polyfid label store ({what})")
        cols = {row[1] for row in self._con.execute("PRAGMA table_info(labels)")}
        missing = [c for c in COLUMNS if c not in cols]
        if missing:
            raise DataError(f"{self.path}: not a polyfid label store (its 'labels' table lacks columns {missing})")
        return tables

    def close(self) -> None:
        """Release this store's claims and close the file."""
        try:
            if not self.readonly:
                with contextlib.suppress(sqlite3.Error, DataError):
                    self.release()
        finally:
            _OPEN_TOKENS.discard(self.token)
            self._con.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its start (BEGIN IMMEDIATE): a
        claim's check and its insert see the same state."""
        if self.readonly:
            raise DataError(f"{self.path}: the label store was opened read-only; it cannot be written")
        self._con.execute("BEGIN IMMEDIATE")
        try:
            yield self._con
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._con.execute("ROLLBACK")
            raise
        self._con.execute("COMMIT")

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
        """Record one result (energy eV, forces (N, 3) eV/Å or None) or, with `reason`, one
        failure, in its own transaction, and release this store's claim on it.

        Results merge with what is stored: an energy-only result never erases stored forces; a
        failure never replaces a finished result. A non-finite energy or forces of the wrong
        shape is recorded as a failure, never as a label.
        """
        n = len(frame.numbers)
        if reason is None:
            reason = _bad_result(energy, forces, n)
        if reason is not None:
            energy, forces = None, None
        f = None if forces is None else np.ascontiguousarray(forces, dtype=np.float64).tobytes()
        cell = None if frame.cell is None else np.asarray(frame.cell, dtype=np.float64).tobytes()
        pbc = json.dumps([bool(p) for p in frame.pbc])
        key = frame_key(frame)
        row = (key, level, "failed" if reason is not None else "ok", None if energy is None else float(energy), f,
               reason, seconds, np.asarray(frame.numbers, dtype=np.int64).tobytes(),
               np.asarray(frame.positions, dtype=np.float64).tobytes(), cell, pbc, int(frame.charge),
               int(frame.multiplicity), time.time())
        with self._transaction() as con:
            con.execute(_FAILED_SQL if reason is not None else _OK_SQL, row)
            if self._claims_ready:
                con.execute("DELETE FROM claims WHERE key = ? AND level = ? AND token = ?", (key, level, self.token))

    # ---- claims: several processes labelling one store ------------------------------------
    def claim(self, keys: Sequence[str], level: str, forces: bool = False) -> tuple[list[str], list[str], list[str]]:
        """Take the calculation of `keys` at `level` (with forces if asked) for this store, in one
        transaction: (claimed: ours to compute, done: nothing to compute, busy: another live run
        holds the claim). A claim whose owner process is gone, or that was not renewed for
        CLAIM_TIMEOUT s, is taken over. :meth:`put` releases a claim; :meth:`release` all of them."""
        now = time.time()
        claimed: list[str] = []
        done: list[str] = []
        busy: list[str] = []
        with self._transaction() as con:
            if not self._claims_ready:
                con.execute(CLAIMS_SCHEMA)  # created by the first writer that claims, never by a reader
            for k in keys:
                row = con.execute("SELECT status, forces IS NOT NULL, reason FROM labels WHERE key = ? AND level = ?",
                                  (k, level)).fetchone()
                if row is not None and _is_done(*row, forces):
                    done.append(k)
                    continue
                owner = con.execute("SELECT host, pid, token, heartbeat FROM claims WHERE key = ? AND level = ?",
                                    (k, level)).fetchone()
                if owner is not None and owner[2] != self.token and _claim_alive(*owner, now):
                    busy.append(k)
                    continue
                con.execute("INSERT OR REPLACE INTO claims (key, level, host, pid, token, heartbeat) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (k, level, HOST, os.getpid(), self.token, now))
                claimed.append(k)
        self._claims_ready = True
        return claimed, done, busy

    def renew(self) -> None:
        """Tell other runs that this store's claims are still being worked on."""
        if self._claims_ready:
            with self._transaction() as con:
                con.execute("UPDATE claims SET heartbeat = ? WHERE token = ?", (time.time(), self.token))

    def release(self) -> None:
        """Give up every claim of this store (its calculations were abandoned)."""
        if self._claims_ready:
            with self._transaction() as con:
                con.execute("DELETE FROM claims WHERE token = ?", (self.token,))

    def claims(self, level: str | None = None) -> list[tuple[str, str, str, int, float]]:
        """(key, level, host, pid, heartbeat) of the claims held now, by any process."""
        tables = {n for (n,) in self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "claims" not in tables:
            return []
        q, args = "SELECT key, level, host, pid, heartbeat FROM claims", ()
        if level is not None:
            q, args = q + " WHERE level = ?", (level,)
        return list(self._con.execute(q, args))

    # ---- reading ----------------------------------------------------------------------
    def done(self, level: str, forces: bool = False) -> set[str]:
        """Keys with a finished result at `level` (with forces if asked), failures included:
        a failure is not retried unless the user removes it; an energy-only result whose
        forces are now asked for is recomputed (and kept if that attempt fails)."""
        q = "SELECT key, status, forces IS NOT NULL, reason FROM labels WHERE level = ?"
        return {k for k, st, has_f, reason in self._con.execute(q, (level,)) if _is_done(st, has_f, reason, forces)}

    def get(self, frame: Frame, level: str) -> tuple[float, np.ndarray | None] | None:
        """(energy eV, forces (N, 3) eV/Å or None) of a finished calculation; None if absent or
        failed; DataError if the stored row is damaged."""
        key = frame_key(frame)
        row = self._con.execute(
            "SELECT rowid, status, energy, forces, numbers FROM labels WHERE key = ? AND level = ?", (key, level)
        ).fetchone()
        if row is None or row[1] != "ok":
            return None
        rowid, _, e, f, z = row
        where = self._where(rowid, key, level)
        n = len(_array(z, np.int64, "atomic numbers", where))
        labels = _labels(e, f, n, where)
        return labels.energy, labels.forces

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

    def _where(self, rowid: int, key: str, level: str) -> str:
        return f"{self.path}: row {rowid} (level {level!r}, structure {str(key)[:16]})"

    def dataset(self, levels: Iterable[str] | None = None) -> Dataset:
        """Every structure with at least one successful label, one Frame each, labels per
        level (fidelity name = level); failures never enter.

        Every row read is checked (finite energy, finite forces of shape (n_atoms, 3), whole
        arrays); a damaged row is refused with a DataError naming the file, the row, its level
        and structure: a data set never silently loses a label or gains a NaN.
        """
        q = "SELECT rowid, key, level, energy, forces, numbers, positions, cell, pbc, charge, multiplicity " \
            "FROM labels WHERE status = 'ok' ORDER BY created"
        want = None if levels is None else set(levels)
        frames: dict[str, Frame] = {}
        for rowid, key, level, e, f, z, r, cell, pbc, charge, mult in self._con.execute(q):
            if want is not None and level not in want:
                continue
            where = self._where(rowid, key, level)
            if not isinstance(key, str) or not isinstance(level, str):
                raise DataError(f"{where}: key {key!r} and level {level!r} must be text{_FIX}")
            fr = frames.get(key)
            if fr is None:
                fr = frames[key] = _frame(z, r, cell, pbc, charge, mult, f"{self.path}:{str(key)[:12]}", where)
            elif _array(z, np.int64, "atomic numbers", where).tolist() != fr.numbers.tolist():
                raise DataError(f"{where}: atomic numbers differ from another row of the same structure")
            fr.labels[level] = _labels(e, f, fr.n_atoms, where)
        if not frames:
            raise DataError(f"{self.path}: no successful labels" + (f" at levels {sorted(want)}" if want else ""))
        return Dataset(list(frames.values()))


def _claim_alive(host: str, pid: int, token: str, heartbeat: float, now: float) -> bool:
    """Whether a claim's owner may still be computing it."""
    if not isinstance(heartbeat, (int, float)) or now - heartbeat > CLAIM_TIMEOUT:
        return False
    if host == HOST:
        if pid == os.getpid():
            return token in _OPEN_TOKENS
        return _pid_alive(int(pid))
    return True


def _bad_result(energy: float | None, forces: np.ndarray | None, n_atoms: int) -> str | None:
    """Why a computed result cannot be stored as a label, or None."""
    if energy is None:
        return "the engine returned no energy"
    if not math.isfinite(float(energy)):
        return f"the engine returned a non-finite energy ({energy})"
    if forces is not None:
        f = np.asarray(forces, dtype=np.float64)
        if f.shape != (n_atoms, 3):
            return f"the engine returned forces of shape {f.shape}, expected ({n_atoms}, 3)"
        if not np.all(np.isfinite(f)):
            return "the engine returned non-finite forces"
    return None


_FIX = "; remove the row (DELETE FROM labels WHERE rowid = N) and label again"


def _array(blob, dtype, what: str, where: str) -> np.ndarray:
    """A stored array, checked to decode as whole values of `dtype`."""
    if not isinstance(blob, bytes):
        raise DataError(f"{where}: {what} is stored as {type(blob).__name__}, expected a binary array{_FIX}")
    size = np.dtype(dtype).itemsize
    if len(blob) % size:
        raise DataError(f"{where}: {what} hold {len(blob)} bytes, not a whole number of {np.dtype(dtype).name} "
                        f"values{_FIX}")
    return np.frombuffer(blob, dtype=dtype).copy()


def _frame(z, r, cell, pbc, charge, mult, source: str, where: str) -> Frame:
    """The geometry of one row, checked."""
    numbers = _array(z, np.int64, "atomic numbers", where)
    n = len(numbers)
    positions = _array(r, np.float64, "positions", where)
    if n == 0 or positions.size != n * 3:
        raise DataError(f"{where}: {positions.size} position values for {n} atoms, expected {n * 3}{_FIX}")
    if cell is not None:
        cell = _array(cell, np.float64, "cell", where)
        if cell.size != 9:
            raise DataError(f"{where}: the cell holds {cell.size} values, expected 9{_FIX}")
        cell = cell.reshape(3, 3)
    try:
        pbc_arr = np.zeros(3, dtype=bool) if pbc is None else np.array(json.loads(pbc), dtype=bool).reshape(3)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: pbc {pbc!r} is not a JSON list of 3 booleans ({e}){_FIX}") from None
    if not isinstance(charge, int) or not isinstance(mult, int):
        raise DataError(f"{where}: charge {charge!r} and multiplicity {mult!r} must be integers{_FIX}")
    try:
        return Frame(numbers=numbers, positions=positions.reshape(n, 3), cell=cell, pbc=pbc_arr, source=source,
                     charge=charge, multiplicity=mult)
    except DataError as e:
        raise DataError(f"{where}: {e}{_FIX}") from None


def _labels(e, f, n_atoms: int, where: str) -> Labels:
    """The energy (eV) and forces ((n_atoms, 3) eV/Å or None) of one row, checked."""
    if e is None:
        # SQLite stores a NaN as NULL
        raise DataError(f"{where}: a finished row without an energy (NULL or NaN){_FIX}")
    if not isinstance(e, (int, float)) or not math.isfinite(e):
        raise DataError(f"{where}: energy is {e!r}, expected a finite number (eV){_FIX}")
    forces = None
    if f is not None:
        forces = _array(f, np.float64, "forces", where)
        if forces.size != n_atoms * 3:
            raise DataError(f"{where}: forces hold {forces.size} values, expected {n_atoms * 3} "
                            f"({n_atoms} atoms x 3){_FIX}")
        if not np.all(np.isfinite(forces)):
            raise DataError(f"{where}: forces contain NaN or inf{_FIX}")
        forces = forces.reshape(n_atoms, 3)
    return Labels(energy=float(e), forces=forces)
