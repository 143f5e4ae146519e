"""Reliability of the label store and `polyfid label`: labels merge, concurrent runs share the
work, readers never write, damaged rows are refused, workers die with their parent, impossible
charge/multiplicity pairs are refused before anything is computed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from polyfid.cli.main import main
from polyfid.data.frame import Frame
from polyfid.errors import DataError
from polyfid.label import LabelStore, LevelError, check_frames, compute, estimate_cost, frame_key, label_frames
from polyfid.label.store import HOST

pytest.importorskip("tblite.interface", reason="tblite (GFN-xTB) is not installed")

ROOT = Path(__file__).resolve().parents[2]
LEVEL = "gfn2-xtb"


def water_frames(n: int, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    base = molecule("H2O").positions
    return [Frame([8, 1, 1], base + rng.normal(scale=0.04, size=base.shape), source=f"w{i}") for i in range(n)]


def write_xyz(path: Path, frames: list[Frame]) -> Path:
    ase.io.write(path, [Atoms(numbers=f.numbers, positions=f.positions) for f in frames], format="extxyz")
    return path


def env(delay: float = 0.0) -> dict[str, str]:
    """The environment of a `polyfid` subprocess: this checkout first; each calculation slowed
    by `delay` s (the runner's test hook)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e["POLYFID_LABEL_TEST_DELAY"] = str(delay)
    return e


def fill(store: Path, frames: list[Frame], forces: bool = True) -> None:
    """Labels computed in this process (quicker than a pool of workers where that is not tested)."""
    with LabelStore(store) as st:
        for fr in frames:
            st.put(fr, LEVEL, *compute(LEVEL, fr.numbers, fr.positions, forces=forces))


def label_cmd(xyz: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "polyfid.cli.main", "label", str(xyz), "--level", LEVEL, "--store", str(store),
            "--sample", "0", "--no-progress", *extra]


def ro(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{store.absolute().as_uri()}?mode=ro", uri=True, timeout=30)


def ok_rows(store: Path) -> dict[str, tuple[float, bool]]:
    """{key: (created, has forces)} of the finished rows; {} before the store exists."""
    if not store.exists():
        return {}
    con = ro(store)
    try:
        return {k: (c, bool(f)) for k, c, f in
                con.execute("SELECT key, created, forces IS NOT NULL FROM labels WHERE status = 'ok'")}
    except sqlite3.OperationalError:  # table not there yet
        return {}
    finally:
        con.close()


def computed(stdout: str) -> int:
    m = re.search(rf"{LEVEL}: (\d+) computed, (\d+) already in the store, (\d+) failed", stdout)
    assert m, stdout
    return int(m.group(1))


def wait_for(cond, seconds: float, what: str, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        assert time.monotonic() - t0 < seconds, f"not {what} after {seconds} s"
        time.sleep(0.05)


# ---- 1. labels of one (structure, level) merge ----------------------------------------------------
def test_an_energy_only_result_never_erases_forces(tmp_path) -> None:
    fr = water_frames(1)[0]
    e, f = compute(LEVEL, fr.numbers, fr.positions, forces=True)
    with LabelStore(tmp_path / "s.sqlite") as st:
        st.put(fr, LEVEL, e, f)
        st.put(fr, LEVEL, e + 1.0)  # energy only, arriving later
        e2, f2 = st.get(fr, LEVEL)
        assert e2 == e and f2 is not None  # the row stays as computed with its forces
        np.testing.assert_array_equal(f2, f)
    with LabelStore(tmp_path / "t.sqlite") as st:  # the other order: forces are added
        st.put(fr, LEVEL, e)
        st.put(fr, LEVEL, e, f)
        np.testing.assert_array_equal(st.get(fr, LEVEL)[1], f)


@pytest.mark.parametrize("first_forces", [True, False])
def test_runs_with_and_without_forces_keep_the_forces_in_either_order(tmp_path, first_forces) -> None:
    frames = water_frames(4)
    store = tmp_path / "s.sqlite"
    first = label_frames(frames, LEVEL, store, forces=first_forces, progress=False)
    second = label_frames(frames, LEVEL, store, forces=not first_forces, progress=False)
    assert first.computed == 4
    # energies asked where forces are stored: nothing to compute; forces asked: each computed once
    assert second.computed == (0 if first_forces else 4)
    assert second.cached == (4 if first_forces else 0)
    rows = ok_rows(store)
    assert len(rows) == 4 and all(has_f for _, has_f in rows.values())


class RacingExecutor(Executor):
    """Runs each calculation at once; before it, another writer stores the structure's energy and
    forces, as a concurrent `--forces` run would while ours computes the energy."""

    def __init__(self, store: Path) -> None:
        self.store = store

    def submit(self, fn, level, numbers, positions, forces, charge, mult, threads, log):  # noqa: D102
        fr = Frame(numbers, positions, charge=charge, multiplicity=mult)
        with LabelStore(self.store) as other:
            other.put(fr, level, *compute(level, numbers, positions, forces=True))
        fut: Future = Future()
        e, f = compute(level, numbers, positions, forces=forces)
        fut.set_result((e, f, 0.01, None, "racing"))
        return fut


def test_forces_stored_while_an_energy_run_computes_are_kept(tmp_path) -> None:
    frames = water_frames(3)
    store = tmp_path / "s.sqlite"
    rep = label_frames(frames, LEVEL, store, forces=False, executor=RacingExecutor(store), progress=False)
    assert rep.computed == 3
    with LabelStore(store, create=False) as st:
        assert all(st.get(fr, LEVEL)[1] is not None for fr in frames)


def test_concurrent_runs_with_and_without_forces_keep_every_force(tmp_path) -> None:
    """A real `--forces` run and a real energy-only run on one store at the same time."""
    frames = water_frames(16)
    xyz, store = write_xyz(tmp_path / "w.extxyz", frames), tmp_path / "s.sqlite"
    a = subprocess.Popen(label_cmd(xyz, store, "--forces"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env(0.4))
    try:
        wait_for(lambda: len(ok_rows(store)) >= 1, 120, "a first result", a)
        b = subprocess.run(label_cmd(xyz, store), capture_output=True, text=True, env=env(0.4), timeout=300)
        out_a = a.communicate(timeout=300)[0]
    finally:
        a.kill()
    assert a.returncode == 0 and b.returncode == 0, out_a + b.stdout + b.stderr
    rows = ok_rows(store)
    assert len(rows) == 16 and all(has_f for _, has_f in rows.values())
    assert computed(out_a) == 16  # every structure needed forces: all computed by the forces run


# ---- 2. concurrent writers share the work -------------------------------------------------------
def test_claims_are_exclusive_and_released(tmp_path) -> None:
    frames = water_frames(3)
    keys = [frame_key(f) for f in frames]
    path = tmp_path / "s.sqlite"
    with LabelStore(path) as a, LabelStore(path) as b:
        assert a.claim(keys[:2], LEVEL) == (keys[:2], [], [])
        assert b.claim(keys, LEVEL) == ([keys[2]], [], keys[:2])  # a's claims are busy for b
        e, _ = compute(LEVEL, frames[0].numbers, frames[0].positions)
        a.put(frames[0], LEVEL, e)  # stored and released in one transaction
        assert b.claim(keys[:2], LEVEL) == ([], [keys[0]], [keys[1]])
        # the stored energy does not satisfy a run that wants forces: it is claimed to be computed
        assert b.claim(keys[:1], LEVEL, forces=True) == ([keys[0]], [], [])
        a.put(frames[1], LEVEL, None, reason="SCF did not converge")  # a failure releases too
        assert b.claim(keys[1:2], LEVEL) == ([], [keys[1]], [])
        assert a.claim(keys[2:], LEVEL) == ([], [], [keys[2]])
        b.release()
        assert a.claim(keys[2:], LEVEL) == ([keys[2]], [], [])
    with LabelStore(path) as c:
        assert c.claims() == []  # closing a store releases its claims


OWNERS = {  # who holds a claim -> whether another store may take it over
    "owner process gone": True,
    "owner process a zombie": True,
    "another host, not renewed for 61 s": True,
    "this process, no open store holds the token": True,
    "another host, renewed": False,
    "a live process here": False,
}


@pytest.mark.parametrize("owner", list(OWNERS))
def test_claims_of_dead_or_silent_owners_are_taken_over(tmp_path, owner) -> None:
    key = frame_key(water_frames(1)[0])
    path = tmp_path / "s.sqlite"
    procs: list[subprocess.Popen] = []
    now = time.time()
    if owner == "owner process gone":
        procs.append(subprocess.Popen([sys.executable, "-c", "pass"]))
        procs[0].wait()  # reaped: the pid no longer exists
        holder = (HOST, procs[0].pid, now)
    elif owner == "owner process a zombie":
        procs.append(subprocess.Popen([sys.executable, "-c", "pass"]))
        wait_for(lambda: _state(procs[0].pid) == "Z", 30, "a zombie")  # exited, not reaped
        holder = (HOST, procs[0].pid, now)
    elif owner == "a live process here":
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        holder = (HOST, procs[0].pid, now)
    else:
        holder = {"another host, not renewed for 61 s": ("elsewhere", 12345, now - 61),
                  "this process, no open store holds the token": (HOST, os.getpid(), now),
                  "another host, renewed": ("elsewhere", 12345, now)}[owner]
    try:
        with LabelStore(path) as st:
            st.claim([], LEVEL)  # creates the claims table
            with sqlite3.connect(path) as con:
                con.execute("INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?)", (key, LEVEL, *holder[:2], "t", holder[2]))
            con.close()
            taken = st.claim([key], LEVEL)
            assert taken == (([key], [], []) if OWNERS[owner] else ([], [], [key]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class FailingExecutor(Executor):
    def submit(self, fn, *args):  # noqa: D102
        fut: Future = Future()
        fut.set_exception(RuntimeError("the cluster went away"))
        return fut


def test_an_aborted_run_releases_its_claims(tmp_path) -> None:
    store = tmp_path / "s.sqlite"
    with pytest.raises(RuntimeError, match="went away"):
        label_frames(water_frames(4), LEVEL, store, executor=FailingExecutor(), progress=False)
    with LabelStore(store) as st:
        assert st.claims() == []
    assert label_frames(water_frames(4), LEVEL, store, progress=False).computed == 4


def test_two_processes_compute_each_structure_once(tmp_path) -> None:
    """Two real `polyfid label` processes on the same 24 frames, the second started while the
    first computes: together they compute each structure exactly once, and the store is complete."""
    frames = water_frames(24)
    xyz, store = write_xyz(tmp_path / "w.extxyz", frames), tmp_path / "s.sqlite"
    cmd = label_cmd(xyz, store, "--forces", "--workers", "1")
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(0.4))
    try:
        wait_for(lambda: len(ok_rows(store)) >= 1, 120, "a first result", a)
        b = subprocess.run(cmd, capture_output=True, text=True, env=env(0.4), timeout=300)
        out_a = a.communicate(timeout=300)[0]
    finally:
        a.kill()
    assert a.returncode == 0 and b.returncode == 0, out_a + b.stdout + b.stderr
    assert computed(out_a) + computed(b.stdout) == 24, out_a + b.stdout
    rows = ok_rows(store)
    assert len(rows) == 24 and all(has_f for _, has_f in rows.values())
    with LabelStore(store, create=False) as st:
        assert st.claims() == []


# ---- 3. readers open stores read-only ------------------------------------------------------------
def _snapshot(path: Path) -> tuple[bytes, list, str, list[str]]:
    con = ro(path)
    try:
        tables = list(con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"))
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        con.close()
    return path.read_bytes(), tables, mode, sorted(os.listdir(path.parent))


def test_an_sqlite_file_of_another_program_is_refused_and_left_untouched(tmp_path, capsys) -> None:
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE people (name TEXT, age INTEGER)")
    con.execute("INSERT INTO people VALUES ('ada', 36)")
    con.commit()
    con.close()
    before = _snapshot(other)
    assert before[2] == "delete" and before[3] == ["other.sqlite"]
    assert main(["data", "summary", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{other}: not a polyfid label store" in err and "people" in err
    xyz = write_xyz(tmp_path / "w.extxyz", water_frames(1))
    assert main(["label", str(xyz), "--level", LEVEL, "--store", str(other), "--no-progress"]) == 2
    assert f"{other}: not a polyfid label store" in capsys.readouterr().err
    with pytest.raises(DataError, match="not a polyfid label store"):
        LabelStore(other, create=False)
    os.remove(xyz)
    assert _snapshot(other) == before  # same bytes, tables, journal mode; no -wal, -shm or -journal


def test_readers_never_write(tmp_path) -> None:
    store = tmp_path / "s.sqlite"
    fill(store, water_frames(2))
    before = _snapshot(store)
    assert [t[1] for t in before[1]] == ["labels", "sqlite_autoindex_labels_1"] and before[2] == "wal"
    with LabelStore(store, create=False) as st:
        assert len(st.dataset()) == 2
        with pytest.raises(DataError, match="opened read-only"):
            st.put(water_frames(1, seed=1)[0], LEVEL, -1.0)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            st._con.execute("CREATE TABLE x (a)")
    assert _snapshot(store)[:3] == before[:3]  # no claims table on read, same bytes, still WAL


def test_a_store_in_a_read_only_folder_reads(tmp_path) -> None:
    top = Path(tempfile.mkdtemp(prefix="polyfid-ro-"))  # under /tmp: reachable by another user
    try:
        os.chmod(top, 0o755)
        folder = top / "labels"
        store = folder / "s.sqlite"
        fill(store, water_frames(3))
        os.chmod(store, 0o444)
        os.chmod(folder, 0o555)
        assert sorted(os.listdir(folder)) == ["s.sqlite"]  # closed cleanly: no -wal, no -shm
        before = store.read_bytes()
        code = ("import os, sys; from polyfid.data.readers import read; "
                "assert not os.access(os.path.dirname(sys.argv[1]), os.W_OK), 'the folder is writable'; "
                "ds = read(sys.argv[1]); print(len(ds), ds.count('gfn2-xtb', 'forces'))")
        cmd = [sys.executable, "-c", code, str(store)]
        if os.access(folder, os.W_OK):
            # root ignores permissions: read as the unprivileged user 'nobody' instead
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("permissions are not enforced for this user and setpriv is missing")
            cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
            probe = subprocess.run([*cmd[:-3], "-c", "import polyfid.data.readers"], capture_output=True, text=True,
                                   env=env(), cwd="/")
            if probe.returncode != 0:
                pytest.skip(f"permissions are not enforced here and 'nobody' cannot run polyfid: {probe.stderr}")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd="/")
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.split() == ["3", "3"]
        assert sorted(os.listdir(folder)) == ["s.sqlite"] and store.read_bytes() == before
    finally:
        os.chmod(top / "labels", 0o755)
        subprocess.run(["rm", "-rf", str(top)], check=True)


def test_a_store_written_by_the_previous_version_reads_and_grows(tmp_path) -> None:
    """The schema and row layout of the store before claims existed, written by hand."""
    store = tmp_path / "old.sqlite"
    fr = water_frames(1)[0]
    e, f = compute(LEVEL, fr.numbers, fr.positions, forces=True)
    con = sqlite3.connect(store)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript("""CREATE TABLE IF NOT EXISTS labels (key TEXT NOT NULL, level TEXT NOT NULL,
        status TEXT NOT NULL, energy REAL, forces BLOB, reason TEXT, seconds REAL, numbers BLOB NOT NULL,
        positions BLOB NOT NULL, cell BLOB, pbc TEXT, charge INTEGER NOT NULL, multiplicity INTEGER NOT NULL,
        created REAL NOT NULL, PRIMARY KEY (key, level));""")
    con.execute("INSERT OR REPLACE INTO labels VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (frame_key(fr), LEVEL, "ok", e, f.tobytes(), None, 0.01, fr.numbers.astype(np.int64).tobytes(),
                 fr.positions.tobytes(), None, json.dumps([False] * 3), 0, 1, time.time()))
    con.commit()
    con.close()
    from polyfid.data.readers import read

    ds = read(store)
    assert len(ds) == 1 and ds.count(LEVEL, "forces") == 1
    np.testing.assert_array_equal(ds[0].labels[LEVEL].forces, f)
    rep = label_frames(water_frames(3), LEVEL, store, forces=True, progress=False)
    assert (rep.computed, rep.cached) == (2, 1)
    assert len(read(store)) == 3


# ---- 4. rows are checked when read back ----------------------------------------------------------
BAD_ROWS = {
    "inf energy": ("energy", 9e999, "energy is inf"),
    "NaN energy": ("energy", float("nan"), "without an energy"),  # SQLite stores NaN as NULL
    "text energy": ("energy", "abc", "energy is 'abc'"),
    "NaN forces": ("forces", np.full(9, np.nan).tobytes(), "forces contain NaN or inf"),
    "inf forces": ("forces", np.r_[np.zeros(8), np.inf].tobytes(), "forces contain NaN or inf"),
    "short forces": ("forces", np.zeros(8).tobytes(), "forces hold 8 values, expected 9 \\(3 atoms x 3\\)"),
    "forces not whole floats": ("forces", b"\x00" * 13, "forces hold 13 bytes"),
    "forces as text": ("forces", "0 0 0", "forces is stored as str"),
    "positions undecodable": ("positions", b"abc", "positions hold 3 bytes"),
    "positions too few": ("positions", np.zeros(6).tobytes(), "6 position values for 3 atoms"),
    "bad atomic numbers": ("numbers", np.array([8, 1, 0]).tobytes(), "atomic numbers must lie in 1..118"),
    "pbc not JSON": ("pbc", "nope", "pbc 'nope' is not a JSON list"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_damaged_rows_are_refused_naming_the_row(tmp_path, capsys, case) -> None:
    from polyfid.data.readers import read

    column, value, message = BAD_ROWS[case]
    frames = water_frames(2)
    store = tmp_path / "s.sqlite"
    fill(store, frames)
    with sqlite3.connect(store) as con:
        rowid = con.execute("SELECT rowid FROM labels WHERE key = ?", (frame_key(frames[1]),)).fetchone()[0]
        con.execute(f"UPDATE labels SET {column} = ? WHERE rowid = ?", (value, rowid))
    con.close()
    where = re.escape(f"{store}: row {rowid} (level '{LEVEL}', structure {frame_key(frames[1])[:16]})")
    with pytest.raises(DataError, match=f"{where}: .*{message}"):
        read(store)
    assert main(["data", "summary", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"{store}: row {rowid}" in err and "Traceback" not in err
    if column in ("energy", "forces"):
        with LabelStore(store, create=False) as st, pytest.raises(DataError, match=where):
            st.get(frames[1], LEVEL)


def test_non_finite_results_are_stored_as_failures(tmp_path) -> None:
    fr = water_frames(1)[0]
    with LabelStore(tmp_path / "s.sqlite") as st:
        st.put(fr, LEVEL, float("nan"))
        st.put(water_frames(1, seed=1)[0], LEVEL, -1.0, np.full((3, 3), np.inf))
        assert st.counts()[LEVEL] == {"ok": 0, "failed": 2}
        assert "non-finite energy" in st.failures()[0][2] or "non-finite energy" in st.failures()[1][2]
        assert st.get(fr, LEVEL) is None


# ---- 5. workers die with their parent ------------------------------------------------------------
# (what is killed, with which signal, workers, forces, finished results before the kill)
KILLS = [
    ("parent", "SIGKILL", 2, True, 2),
    ("parent", "SIGKILL", 1, True, 2),
    ("parent", "SIGKILL", 2, False, 2),
    ("parent", "SIGKILL", 1, False, 4),
    ("parent", "SIGKILL", 2, True, 1),  # early: the first result just in
    ("parent", "SIGKILL", 2, True, 24),  # late: most of the work done
    ("parent", "SIGTERM", 2, True, 2),  # Python's default: dies at once, no cleanup either
    ("group", "SIGKILL", 2, True, 2),  # the whole process group, as a job scheduler does
    ("group", "SIGKILL", 1, False, 2),
    ("worker", "SIGKILL", 2, True, 2),  # one worker, as the out-of-memory killer does
]


@pytest.mark.slow
@pytest.mark.parametrize("target, sig, workers, forces, after", KILLS)
def test_a_labelling_run_killed_while_computing_loses_nothing(tmp_path, target, sig, workers, forces, after) -> None:
    """A real `polyfid label` process, killed while it computes: no worker or resource tracker
    outlives it holding memory or its stdout (killing one worker instead ends the run with a
    clear error, exit 2), the store is intact, and a rerun computes only what was not finished."""
    psutil = pytest.importorskip("psutil")
    frames = water_frames(40)
    xyz, store = write_xyz(tmp_path / "w.extxyz", frames), tmp_path / "s.sqlite"
    flags = ["--workers", str(workers)] + (["--forces"] if forces else [])
    # "group": the command leads a process group of its own (as under a shell's job control), so
    # that killing the group does not kill the test
    proc = subprocess.Popen(label_cmd(xyz, store, *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env(0.3), process_group=0 if target == "group" else None)
    eof = threading.Event()
    output: list[bytes] = []

    def drain() -> None:  # read the command's output until every holder of the pipe is gone
        while chunk := proc.stdout.read(4096):
            output.append(chunk)
        eof.set()

    threading.Thread(target=drain, daemon=True).start()
    children: list = []
    try:
        wait_for(lambda: len(ok_rows(store)) >= after, 120, f"{after} results", proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= workers  # the workers (and multiprocessing's resource tracker)
        assert all(os.getpgid(c.pid) == os.getpgid(proc.pid) for c in children)  # in the caller's group
        signum = getattr(signal, sig)
        if target == "parent":
            proc.send_signal(signum)
        elif target == "group":
            os.killpg(proc.pid, signum)
        else:
            workers_only = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
            workers_only[0].send_signal(signum)
        rc = proc.wait(timeout=60)

        def gone(p) -> bool:
            try:
                return p.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: all(gone(p) for p in children), 10, "every child gone")
        assert eof.wait(10), "stdout still held open after the kill"
    finally:
        for p in [*children, psutil.Process(proc.pid) if proc.poll() is None else None]:
            if p is not None:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
    text = b"".join(output).decode(errors="replace")
    if target == "worker":
        assert rc == 2, text
        assert "a labelling worker died" in text and "w.extxyz:" in text and "Traceback" not in text
    else:
        assert rc == -getattr(signal, sig)
    before = ok_rows(store)
    assert after <= len(before) < 40, f"{len(before)} finished: the kill was not mid-run"
    con = sqlite3.connect(store)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] in (0, *range(1, 2 * workers + 1))
    con.close()
    rep = label_frames(frames, LEVEL, store, forces=forces, progress=False)
    assert (rep.computed, rep.cached) == (40 - len(before), len(before))  # claims of the dead run taken over
    done = ok_rows(store)
    assert len(done) == 40 and all(done[k] == v for k, v in before.items())  # nothing finished was redone


def test_a_run_beside_a_killed_one_finishes_its_work(tmp_path) -> None:
    """Two runs on one store; one is SIGKILLed mid-run: the other takes over its claims and
    completes the store, computing each structure not finished by the dead run exactly once."""
    frames = water_frames(24)
    xyz, store = write_xyz(tmp_path / "w.extxyz", frames), tmp_path / "s.sqlite"
    cmd = label_cmd(xyz, store, "--forces", "--workers", "1")
    a = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(0.4))
    try:
        wait_for(lambda: len(ok_rows(store)) >= 2, 120, "a first result", a)
        b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(0.4))
        wait_for(lambda: len(ok_rows(store)) >= 5, 120, "both running", b)
        a.kill()
        a.wait()
        killed_with = len(ok_rows(store))
        out_b = b.communicate(timeout=300)[0]
    finally:
        a.kill()
    assert b.returncode == 0, out_b
    rows = ok_rows(store)
    assert len(rows) == 24 and all(has_f for _, has_f in rows.values())
    assert computed(out_b) <= 24 - 2 and computed(out_b) >= 24 - killed_with


# ---- 6. charge and multiplicity must fit the electron count ---------------------------------------
def test_wrong_spin_parity_is_refused_by_the_cli_before_any_calculation(tmp_path, capsys) -> None:
    xyz = write_xyz(tmp_path / "w.extxyz", water_frames(3))
    store = tmp_path / "s.sqlite"
    assert main(["label", str(xyz), "--level", LEVEL, "--store", str(store), "--charge", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{xyz}:0: 9 electrons (charge +1) cannot have multiplicity 1" in err
    assert "even multiplicity" in err and "2 more structures" in err
    assert main(["label", str(xyz), "--level", LEVEL, "--store", str(store), "--multiplicity", "2"]) == 2
    assert f"{xyz}:0: 10 electrons (charge +0) cannot have multiplicity 2" in capsys.readouterr().err
    assert not store.exists()  # nothing computed, no store made


def test_wrong_spin_parity_is_refused_by_the_api(tmp_path) -> None:
    fr = water_frames(1)[0]
    cation = Frame(fr.numbers, fr.positions, source="cation.xyz:4", charge=1)
    store = tmp_path / "s.sqlite"
    with pytest.raises(LevelError, match="cation.xyz:4: 9 electrons"):
        label_frames([fr, cation], LEVEL, store, progress=False)
    with pytest.raises(LevelError, match="cation.xyz:4: 9 electrons"):
        estimate_cost([cation], LEVEL, store)
    with pytest.raises(LevelError, match="at most 1 unpaired"):
        check_frames([Frame([1], np.zeros((1, 3)), source="H", multiplicity=4)], LEVEL)
    with pytest.raises(LevelError, match="multiplicity must be 1 or more"):
        check_frames([Frame([1, 1], [[0, 0, 0], [0, 0, 0.74]], source="H2", multiplicity=0)], LEVEL)
    check_frames([Frame([8, 1], [[0, 0, 0], [0, 0, 0.97]], multiplicity=2), Frame(fr.numbers, fr.positions,
                  charge=1, multiplicity=2)], LEVEL)  # radicals with the right parity pass
    with LabelStore(store) as st:
        assert st.counts() == {}  # nothing was computed
