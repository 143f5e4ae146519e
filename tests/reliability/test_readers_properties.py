"""Property tests of every reader against damaged input: a small valid file of each format is
written, a drawn corruption applied (truncation, byte flips, random spans, changed shapes and
dtypes, NaN/inf in labels and positions, malformed rows and lines), and `polyfid.read` must either
raise a polyfid error or return frames that pass the value checks (finite positions of shape
(n, 3), atomic numbers in 1..118, finite labels of the right shapes): never another exception,
never a hang. Readers of SQLite files (label store, ASE database) must also leave the file as it
was."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ase.db
import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyfid.data.frame import Dataset, Frame
from polyfid.data.readers import read
from polyfid.errors import PolyfidError
from polyfid.label.store import LabelStore

#: examples per property; POLYFID_PROPERTY_EXAMPLES=2000 for a deeper (still derandomized) run
MAX_EXAMPLES = int(os.environ.get("POLYFID_PROPERTY_EXAMPLES", "50"))
SETTINGS = settings(derandomize=True, max_examples=MAX_EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: seconds one read may take before it counts as a hang
TIME_LIMIT = 20

WATER = np.array([[0.0, 0.0, 0.119], [0.0, 0.763, -0.477], [0.0, -0.763, -0.477]])
METHANE = np.array([[0.0, 0.0, 0.0], [0.629, 0.629, 0.629], [-0.629, -0.629, 0.629], [-0.629, 0.629, -0.629],
                    [0.629, -0.629, -0.629]])
N_FRAMES = 3


# ---- the property -------------------------------------------------------------------------------
class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang(f"read took over {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def assert_sane(ds: Dataset) -> None:
    """The value checks every frame a reader returns must pass."""
    assert isinstance(ds, Dataset) and len(ds) > 0
    for fr in ds:
        assert isinstance(fr, Frame)
        n = fr.numbers.shape[0]
        assert fr.numbers.ndim == 1 and n > 0 and fr.numbers.dtype == np.int64
        assert np.all((fr.numbers >= 1) & (fr.numbers <= 118))
        assert fr.positions.shape == (n, 3) and fr.positions.dtype == np.float64
        assert np.all(np.isfinite(fr.positions))
        assert fr.cell is None or (fr.cell.shape == (3, 3) and np.all(np.isfinite(fr.cell)))
        for lab in fr.labels.values():
            assert lab.energy is None or (isinstance(lab.energy, float) and np.isfinite(lab.energy))
            if lab.forces is not None:
                assert lab.forces.shape == (n, 3) and np.all(np.isfinite(lab.forces))
            if lab.stress is not None:
                assert lab.stress.shape == (3, 3) and np.all(np.isfinite(lab.stress))


def check_read(path: Path, **options) -> Dataset | None:
    """`polyfid.read(path)`: a polyfid error (None) or sane frames; anything else fails the test."""
    with time_limit(TIME_LIMIT):
        try:
            ds = read(path, **options)
        except PolyfidError as err:
            assert str(path) in str(err) or str(path.parent) in str(err), f"the message names no file: {err}"
            return None
    assert_sane(ds)
    return ds


def scratch() -> tempfile.TemporaryDirectory:
    """A folder per example (hypothesis runs many examples per test; tmp_path is one folder)."""
    return tempfile.TemporaryDirectory(prefix="polyfid-prop-")


# ---- drawn corruptions --------------------------------------------------------------------------
@st.composite
def byte_damage(draw) -> Callable[[bytes], bytes]:
    """Truncation at a random byte, flipped bytes (anywhere, or in the data after the first
    quarter), or a random span overwritten."""
    kind = draw(st.sampled_from(["truncate", "flip", "flip-data", "span"]))
    a = draw(st.floats(0, 1, allow_nan=False))
    k = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))

    def damage(data: bytes) -> bytes:
        rng = np.random.default_rng(seed)
        n = len(data)
        if kind == "truncate":
            return data[: int(a * (n - 1))]
        b = bytearray(data)
        if kind == "span":
            i = int(a * (n - 1))
            b[i : i + 16 * k] = rng.bytes(len(b[i : i + 16 * k]))
            return bytes(b)
        lo = 0 if kind == "flip" else n // 4
        for i in rng.integers(lo, n, size=k):
            b[i] ^= int(rng.integers(1, 256))
        return bytes(b)

    return damage


BAD_VALUES = [np.nan, np.inf, -np.inf, 1e308]


@st.composite
def array_damage(draw) -> Callable[[np.ndarray], np.ndarray]:
    """A changed dtype (object, str, complex, int, bool), shape, or NaN/inf at a random place."""
    kind = draw(st.sampled_from(["object", "str", "complex", "int", "bool", "float32", "drop-row", "add-row",
                                 "flatten", "transpose", "scalar", "empty", "nonfinite"]))
    where = draw(st.floats(0, 1, allow_nan=False))
    bad = draw(st.sampled_from(BAD_VALUES))

    def damage(arr: np.ndarray) -> np.ndarray:
        arr = np.array(arr)
        if kind == "object":
            return np.array(arr.tolist() + [None], dtype=object) if arr.ndim == 1 else arr.astype(object)
        if kind == "str":
            return arr.astype(str)
        if kind == "complex":
            return arr.astype(complex) + 1j
        if kind == "int":
            return arr.astype(np.int64) if arr.dtype.kind == "f" else arr.astype(np.float64) + 0.5
        if kind == "bool":
            return arr.astype(bool)
        if kind == "float32":
            return arr.astype(np.float32)
        if kind == "drop-row":
            return arr[:-1]
        if kind == "add-row":
            return np.concatenate([arr, arr[:1]])
        if kind == "flatten":
            return arr.reshape(-1)
        if kind == "transpose":
            return arr.T
        if kind == "scalar":
            return np.asarray(arr.reshape(-1)[0])
        if kind == "empty":
            return arr[:0]
        out = arr.astype(np.float64)
        if out.size:
            out.reshape(-1)[int(where * (out.size - 1))] = bad
        return out

    return damage


def frames_data(n_frames: int = N_FRAMES) -> dict[str, np.ndarray]:
    """Water at a few geometries with made-up energies (kcal/mol) and forces."""
    rng = np.random.default_rng(0)
    coords = WATER[None] + rng.normal(scale=0.03, size=(n_frames, 3, 3))
    return {"z": np.array([8, 1, 1]), "R": coords, "E": -47000.0 + rng.normal(size=n_frames),
            "F": rng.normal(size=(n_frames, 3, 3))}


# ---- npz ----------------------------------------------------------------------------------------
def write_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@SETTINGS
@given(damage=byte_damage(), compressed=st.booleans())
def test_npz_damaged_bytes(damage, compressed) -> None:
    with scratch() as d:
        path = write_npz(Path(d) / "w.npz", frames_data(), compressed)
        path.write_bytes(damage(path.read_bytes()))
        check_read(path)


@SETTINGS
@given(key=st.sampled_from(["z", "R", "E", "F"]), damage=array_damage())
def test_npz_damaged_arrays(key, damage) -> None:
    with scratch() as d:
        arrays = frames_data()
        arrays[key] = damage(arrays[key])
        check_read(write_npz(Path(d) / "w.npz", arrays, compressed=False))


# ---- HDF5 ---------------------------------------------------------------------------------------
def write_h5(path: Path, arrays: dict[str, np.ndarray | None] | None = None, as_group: str | None = None) -> Path:
    data = frames_data()
    arrays = arrays or {"coordinates": data["R"], "species": np.array([b"O", b"H", b"H"]),
                        "energies": data["E"] / 627.5, "forces": data["F"] / 627.5}
    with h5py.File(path, "w") as f:
        g = f.create_group("water")
        for key, arr in arrays.items():
            if key == as_group:
                g.create_group(key)["x"] = np.zeros(1)
            elif arr.dtype.kind == "O":
                g.create_dataset(key, data=arr.astype(str).astype(h5py.string_dtype()))
            elif arr.dtype.kind == "U":
                g.create_dataset(key, data=arr.astype(h5py.string_dtype()))
            else:
                g[key] = arr
    return path


@SETTINGS
@given(damage=byte_damage())
def test_hdf5_damaged_bytes(damage) -> None:
    with scratch() as d:
        path = write_h5(Path(d) / "w.h5")
        path.write_bytes(damage(path.read_bytes()))
        check_read(path)


@SETTINGS
@given(key=st.sampled_from(["coordinates", "species", "energies", "forces"]), damage=array_damage(),
       as_group=st.booleans())
def test_hdf5_damaged_datasets(key, damage, as_group) -> None:
    data = frames_data()
    arrays = {"coordinates": data["R"], "species": np.array([8, 1, 1]), "energies": data["E"] / 627.5,
              "forces": data["F"] / 627.5}
    arrays[key] = damage(arrays[key])
    with scratch() as d:
        check_read(write_h5(Path(d) / "w.h5", arrays, as_group=key if as_group else None))


# ---- extended XYZ, QM-22 xyz --------------------------------------------------------------------
def write_extxyz(path: Path) -> Path:
    images = []
    data = frames_data()
    for k in range(N_FRAMES):
        a = Atoms(numbers=data["z"], positions=data["R"][k])
        a.calc = SinglePointCalculator(a, energy=float(data["E"][k]) / 23.06, forces=data["F"][k])
        images.append(a)
    ase.io.write(path, images, format="extxyz")
    return path


def write_qm22(path: Path) -> Path:
    data = frames_data()
    lines = []
    for k in range(N_FRAMES):
        lines += ["3", f"{data['E'][k] / 627.5:.10f}"]
        for sym, r, g in zip("OHH", data["R"][k], data["F"][k]):
            lines.append(f"{sym} {r[0]:.8f} {r[1]:.8f} {r[2]:.8f} {g[0]:.8f} {g[1]:.8f} {g[2]:.8f}")
    path.write_text("\n".join(lines) + "\n")
    return path


@st.composite
def line_damage(draw) -> Callable[[str], str]:
    """A line deleted, duplicated or emptied, or one whitespace-separated field replaced by a
    drawn token (NaN, inf, a word, a huge or negative count, nothing)."""
    kind = draw(st.sampled_from(["delete", "duplicate", "blank", "field"]))
    where = draw(st.floats(0, 1, allow_nan=False))
    which = draw(st.integers(0, 12))
    token = draw(st.sampled_from(["nan", "inf", "-inf", "abc", "", "1e999", "-3", "0", "99999999", "T", "X",
                                  '"', "energy=nan", "1,5", "\x00"]))

    def damage(text: str) -> str:
        lines = text.splitlines()
        i = int(where * (len(lines) - 1))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "blank":
            lines[i] = ""
        else:
            fields = lines[i].split(" ")
            fields[which % len(fields)] = token
            lines[i] = " ".join(fields)
        return "\n".join(lines) + "\n"

    return damage


TEXT_DAMAGE = st.one_of(byte_damage().map(lambda f: ("bytes", f)), line_damage().map(lambda f: ("text", f)))


@SETTINGS
@given(damage=TEXT_DAMAGE)
def test_extxyz_damaged(damage) -> None:
    kind, fn = damage
    with scratch() as d:
        path = write_extxyz(Path(d) / "w.extxyz")
        data = path.read_bytes()
        path.write_bytes(fn(data) if kind == "bytes" else fn(data.decode()).encode())
        check_read(path)


@SETTINGS
@given(damage=TEXT_DAMAGE)
def test_qm22_damaged(damage) -> None:
    kind, fn = damage
    with scratch() as d:
        path = write_qm22(Path(d) / "w.xyz")
        data = path.read_bytes()
        path.write_bytes(fn(data) if kind == "bytes" else fn(data.decode()).encode())
        check_read(path, format="qm22")


# ---- ASE database -------------------------------------------------------------------------------
def write_ase_db(path: Path, bad: float | None = None, where: str = "energy") -> Path:
    data = frames_data()
    with ase.db.connect(str(path)) as db:
        for k in range(N_FRAMES):
            pos, e, f = data["R"][k].copy(), float(data["E"][k]) / 23.06, data["F"][k].copy()
            if bad is not None and k == 1:
                if where == "energy":
                    e = bad
                elif where == "forces":
                    f[0, 0] = bad
                else:
                    pos[1, 2] = bad
            a = Atoms(numbers=data["z"], positions=pos)
            a.calc = SinglePointCalculator(a, energy=e, forces=f)
            db.write(a)
    return path


@SETTINGS
@given(damage=byte_damage(), bad=st.sampled_from([None, *BAD_VALUES]),
       where=st.sampled_from(["energy", "forces", "positions"]))
def test_ase_db_damaged(damage, bad, where) -> None:
    with scratch() as d:
        path = write_ase_db(Path(d) / "w.db", bad, where)
        path.write_bytes(damage(path.read_bytes()))
        before = path.read_bytes()
        check_read(path)
        assert path.read_bytes() == before, "reading changed the database"


# ---- PYSEQM folder ------------------------------------------------------------------------------
def write_pyseqm(folder: Path) -> Path:
    data = frames_data()
    pad = 5  # two padding atoms
    Z = np.zeros((N_FRAMES, pad), dtype=np.int64)
    Z[:, :3] = data["z"]
    R = np.zeros((N_FRAMES, pad, 3))
    R[:, :3] = data["R"]
    F = np.zeros((N_FRAMES, pad, 3))
    F[:, :3] = data["F"]
    folder.mkdir()
    for name, arr in {"Z": Z, "R": R, "Etot_PM6": data["E"] / 23.06, "F_PM6": F / 23.06,
                      "Etot_DFT": data["E"] / 23.06 + 1, "F_DFT": F / 23.06}.items():
        np.save(folder / f"{name}.npy", arr)
    return folder


@SETTINGS
@given(name=st.sampled_from(["Z", "R", "Etot_PM6", "F_DFT"]),
       damage=st.one_of(byte_damage().map(lambda f: ("bytes", f)), array_damage().map(lambda f: ("array", f))))
def test_pyseqm_damaged(name, damage) -> None:
    kind, fn = damage
    with scratch() as d:
        folder = write_pyseqm(Path(d) / "pyseqm")
        path = folder / f"{name}.npy"
        if kind == "bytes":
            path.write_bytes(fn(path.read_bytes()))
        else:
            np.save(path, fn(np.load(path)), allow_pickle=True)
        check_read(folder)


# ---- label store --------------------------------------------------------------------------------
LEVEL = "hf/sto-3g"


def write_store(path: Path) -> Path:
    data = frames_data()
    with LabelStore(path) as st_:
        for k in range(N_FRAMES):
            fr = Frame(data["z"], data["R"][k], source=f"w{k}")
            st_.put(fr, LEVEL, float(data["E"][k]) / 23.06, data["F"][k])
        fr = Frame([6, 1, 1, 1, 1], METHANE, source="m")
        st_.put(fr, LEVEL, -1100.0, np.zeros((5, 3)))
        st_.put(fr, "gfn2-xtb", -110.0)
    return path


BLOB_COLUMNS = ["forces", "numbers", "positions", "cell"]
STORE_VALUES = st.one_of(
    st.sampled_from([None, float("nan"), float("inf"), -float("inf"), 1e308, "abc", "", "[1, 0, 1]", "[true]",
                     '{"a": 1}', 0, -1, 2**62, 3.5, True]),
    st.binary(max_size=80),
    st.builds(lambda v, n: np.full(n, v).tobytes(), st.sampled_from([np.nan, np.inf, 0.0, 1.0, 200.0]),
              st.integers(0, 16)),
    st.builds(lambda v, n: np.full(n, v, dtype=np.int64).tobytes(), st.sampled_from([0, 1, 8, 119, -5]),
              st.integers(0, 6)),
)


@SETTINGS
@given(column=st.sampled_from(["key", "level", "status", "energy", "forces", "numbers", "positions", "cell", "pbc",
                               "charge", "multiplicity", "created"]),
       value=STORE_VALUES, row=st.integers(1, N_FRAMES + 2))
def test_label_store_malformed_rows(column, value, row) -> None:
    with scratch() as d:
        path = write_store(Path(d) / "s.sqlite")
        con = sqlite3.connect(path)
        # a foreign writer with the same columns but no constraints: any value can land in any column
        cols = [r[1] for r in con.execute("PRAGMA table_info(labels)")]
        con.execute("CREATE TABLE loose AS SELECT * FROM labels")
        con.execute("DROP TABLE labels")
        con.execute(f"CREATE TABLE labels ({', '.join(cols)})")
        con.execute("INSERT INTO labels SELECT * FROM loose")
        con.execute("DROP TABLE loose")
        with contextlib.suppress(sqlite3.Error):
            con.execute(f"UPDATE labels SET {column} = ? WHERE rowid = ?", (value, row))
        con.commit()
        con.execute("PRAGMA journal_mode=DELETE")
        con.close()
        before = path.read_bytes()
        check_read(path)
        assert path.read_bytes() == before, "reading changed the store"


@SETTINGS
@given(damage=byte_damage(), drop=st.sampled_from([None, "energy", "forces", "positions", "status"]))
def test_label_store_damaged_file(damage, drop) -> None:
    with scratch() as d:
        path = write_store(Path(d) / "s.sqlite")
        con = sqlite3.connect(path)
        con.execute("PRAGMA journal_mode=DELETE")
        if drop:
            con.execute(f"ALTER TABLE labels DROP COLUMN {drop}")
        con.commit()
        con.close()
        path.write_bytes(damage(path.read_bytes()))
        before = path.read_bytes()
        check_read(path)
        assert path.read_bytes() == before, "reading changed the store"
        assert sorted(p.name for p in Path(d).iterdir()) == ["s.sqlite"]  # no journal, -wal or -shm left


# ---- the valid files read ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npz", "hdf5", "extxyz", "qm22", "ase-db", "pyseqm", "labels"])
def test_the_undamaged_files_read(tmp_path, fmt) -> None:
    """The starting points of the properties are valid: the checks above are not vacuous."""
    path = {"npz": lambda: write_npz(tmp_path / "w.npz", frames_data(), True),
            "hdf5": lambda: write_h5(tmp_path / "w.h5"),
            "extxyz": lambda: write_extxyz(tmp_path / "w.extxyz"),
            "qm22": lambda: write_qm22(tmp_path / "w.xyz"),
            "ase-db": lambda: write_ase_db(tmp_path / "w.db"),
            "pyseqm": lambda: write_pyseqm(tmp_path / "pyseqm"),
            "labels": lambda: write_store(tmp_path / "s.sqlite")}[fmt]()
    ds = check_read(path)
    assert ds is not None and len(ds) == (N_FRAMES + 1 if fmt == "labels" else N_FRAMES)
    assert json.dumps(ds.fidelities)
