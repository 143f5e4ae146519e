"""Damaged and malformed input, case by case: every reader answers with a DataError that names the
file, the frame (0-based) or key, and what was expected; never a traceback from numpy, zipfile,
h5py, sqlite3 or ASE. The command line exits 2 with that message (`data summary`, `predict`), and
`predict` reads every format through `polyfid.read`."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import ase.db
import ase.io
import h5py
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

import polyfid
from polyfid.cli.main import main
from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.readers import read
from polyfid.errors import DataError
from polyfid.label.store import LabelStore, frame_key
from polyfid.models import build_potential, save_model

ROOT = Path(__file__).resolve().parents[2]
WATER = np.array([[0.0, 0.0, 0.119], [0.0, 0.763, -0.477], [0.0, -0.763, -0.477]])
F = 3  # frames per file


def geometries(n: int = F) -> np.ndarray:
    return WATER[None] + np.random.default_rng(0).normal(scale=0.03, size=(n, 3, 3))


def sgdml(**changes) -> dict[str, np.ndarray]:
    arrays = {"z": np.array([8, 1, 1]), "R": geometries(), "E": -47000.0 + np.arange(F, dtype=float),
              "F": np.zeros((F, 3, 3))}
    arrays.update(changes)
    return arrays


def write_npz(path: Path, compressed: bool = False, **changes) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **sgdml(**changes))
    return path


def write_h5(path: Path, group: str | None = None, **changes) -> Path:
    arrays = {"coordinates": geometries(), "species": np.array([b"O", b"H", b"H"]), "energies": np.zeros(F),
              "forces": np.zeros((F, 3, 3))}
    arrays.update(changes)
    with h5py.File(path, "w") as f:
        g = f.create_group("water")
        for key, arr in arrays.items():
            if key == group:
                g.create_group(key)
            else:
                g[key] = arr
    return path


def images(n: int = 4) -> list[Atoms]:
    out = []
    for k, r in enumerate(geometries(n)):
        a = Atoms("OH2", positions=r)
        a.calc = SinglePointCalculator(a, energy=-2000.0 + k, forces=np.zeros((3, 3)))
        out.append(a)
    return out


def write_extxyz(path: Path, n: int = 4) -> Path:
    ase.io.write(path, images(n), format="extxyz")
    return path


def edit_lines(path: Path, edit: Callable[[list[str]], None]) -> Path:
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def frame_line(k: int, offset: int = 0) -> int:
    """0-based line index of `offset` within frame `k` of a water extxyz file (5 lines a frame)."""
    return 5 * k + offset


def write_qm22(path: Path, n: int = F, energy: str | None = None) -> Path:
    lines = []
    for k, r in enumerate(geometries(n)):
        lines += ["3", energy if (energy is not None and k == 1) else f"{-154.0 - k:.8f}"]
        lines += [f"{s} {x:.8f} {y:.8f} {z:.8f} 0.001 0.002 0.003" for s, (x, y, z) in zip("OHH", r)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_pyseqm(folder: Path, **changes) -> Path:
    folder.mkdir()
    arrays = {"Z": np.tile([8, 1, 1, 0], (F, 1)), "R": np.concatenate([geometries(), np.zeros((F, 1, 3))], 1),
              "Etot_PM6": np.zeros(F), "F_PM6": np.zeros((F, 4, 3)), "Etot_DFT": np.zeros(F),
              "F_DFT": np.zeros((F, 4, 3))}
    arrays.update(changes)
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr, allow_pickle=True)
    return folder


def write_db(path: Path) -> Path:
    with ase.db.connect(str(path)) as db:
        for a in images(3):
            db.write(a)
    return path


LEVEL = "hf/sto-3g"


def store_frames() -> list[Frame]:
    return [Frame([8, 1, 1], r, source=f"w{k}") for k, r in enumerate(geometries())]


def write_store(path: Path) -> Path:
    with LabelStore(path) as st:
        for k, fr in enumerate(store_frames()):
            st.put(fr, LEVEL, -2000.0 + k, np.zeros((3, 3)))
    return path


def damage_store(path: Path, sql: str, *args) -> tuple[Path, int, str]:
    """Apply `sql` (with ``?`` for the rowid) to the row of the second structure; the rowid and key."""
    write_store(path)
    key = frame_key(store_frames()[1])
    con = sqlite3.connect(path)
    rowid = con.execute("SELECT rowid FROM labels WHERE key = ?", (key,)).fetchone()[0]
    con.execute(sql, (*args, rowid))
    con.commit()
    con.close()
    return path, rowid, key


def flip_member(path: Path, member: str, offset: int) -> Path:
    """Flip bytes `offset` bytes into the stored data of archive member `member`."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    h = info.header_offset  # the local header: 30 bytes, then its own name and extra field
    start = h + 30 + int.from_bytes(data[h + 26 : h + 28], "little") + int.from_bytes(data[h + 28 : h + 30], "little")
    for i in range(start + offset, start + offset + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


# ---- damaged archives -----------------------------------------------------------------------------
def _npz_bad_crc(tmp: Path):
    path = flip_member(write_npz(tmp / "crc.npz"), "R.npy", 200)  # inside the float data: the header parses
    return path, [r"'R' cannot be read, the archive is damaged \(BadZipFile: Bad CRC-32"]


def _npz_bad_deflate(tmp: Path):
    path = flip_member(write_npz(tmp / "deflate.npz", compressed=True), "R.npy", 0)  # the first block header
    return path, [r"'R' cannot be read, the archive is damaged \(error: Error -3 while decompressing"]


def _npz_truncated(tmp: Path):
    path = write_npz(tmp / "cut.npz")
    path.write_bytes(path.read_bytes()[:300])
    return path, ["cannot read as a numpy .npz archive"]


def _npz_empty(tmp: Path):
    path = tmp / "empty.npz"
    path.write_bytes(b"")
    return path, ["cannot read as a numpy .npz archive"]


def _hdf5_truncated(tmp: Path):
    path = write_h5(tmp / "cut.h5")
    path.write_bytes(path.read_bytes()[:1500])
    return path, ["cannot open as HDF5.*truncated file"]


def _hdf5_not_hdf5(tmp: Path):
    path = tmp / "text.h5"
    path.write_text("coordinates species energies\n")
    return path, ["cannot open as HDF5.*file signature not found"]


def _extxyz_bad_count_in_frame_2(tmp: Path):
    path = edit_lines(write_extxyz(tmp / "w.extxyz"), lambda ls: ls.__setitem__(frame_line(2), "three"))
    return path, [r"frame 2: cannot parse: line 11: expected the atom count, got 'three'"]


def _extxyz_count_too_large_in_frame_1(tmp: Path):
    path = edit_lines(write_extxyz(tmp / "w.extxyz"), lambda ls: ls.__setitem__(frame_line(1), "4"))
    return path, [r"frame 1: cannot parse: the header at line 6 says 4 atoms.*too large"]


def _extxyz_truncated_frame_3(tmp: Path):
    path = edit_lines(write_extxyz(tmp / "w.extxyz"), lambda ls: ls.pop())
    return path, [r"frame 3: cannot parse: truncated: the header at line 16 says 3 atoms but the file ends after 2"]


def _extxyz_binary(tmp: Path):
    path = tmp / "garbage.extxyz"
    path.write_bytes(bytes(range(256)) * 4)
    return path, ["not a text file"]


def _extxyz_empty(tmp: Path):
    path = tmp / "empty.extxyz"
    path.write_bytes(b"")
    return path, ["the file is empty"]


def _qm22_truncated_frame_2(tmp: Path):
    path = edit_lines(write_qm22(tmp / "q.xyz"), lambda ls: ls.pop())
    return path, [r"frame 2 \(header at line 11\) is truncated"]


def _pyseqm_truncated_npy(tmp: Path):
    folder = write_pyseqm(tmp / "pyseqm")
    (folder / "R.npy").write_bytes((folder / "R.npy").read_bytes()[:100])
    return folder / "R.npy", ["cannot read as a .npy array"], folder


def _ase_db_truncated(tmp: Path):
    path = write_db(tmp / "a.db")
    path.write_bytes(path.read_bytes()[:5000])
    return path, ["database disk image is malformed"]


def _ase_db_foreign_sqlite(tmp: Path):
    path = write_store(tmp / "labels.db")
    return path, ["an SQLite file without ASE's tables.*format='labels'"]


def _label_store_garbage(tmp: Path):
    path = tmp / "junk.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    return path, ["not a polyfid label store"]


def _unknown_suffix(tmp: Path):
    path = tmp / "data.weird"
    path.write_text("hello\n")
    return path, [r"unknown file format \(suffix '.weird'\); name it: polyfid formats \['ase', 'ase-db'"]


def _folder_for_a_file(tmp: Path):
    folder = tmp / "folder.npz"
    folder.mkdir()
    return folder, [r"a folder, expected a file \(npz format\)"]


ARCHIVES = {name[1:]: fn for name, fn in list(globals().items()) if name.startswith("_") and callable(fn)
            and fn.__module__ == __name__}


class TestDamagedArchives:
    CASES = {k: ARCHIVES[k] for k in ["npz_bad_crc", "npz_bad_deflate", "npz_truncated", "npz_empty", "hdf5_truncated",
                                      "hdf5_not_hdf5", "extxyz_bad_count_in_frame_2",
                                      "extxyz_count_too_large_in_frame_1", "extxyz_truncated_frame_3",
                                      "extxyz_binary", "extxyz_empty", "qm22_truncated_frame_2",
                                      "pyseqm_truncated_npy", "ase_db_truncated", "ase_db_foreign_sqlite",
                                      "label_store_garbage", "unknown_suffix", "folder_for_a_file"]}

    @pytest.mark.parametrize("case", list(CASES))
    def test_damaged_archive_is_a_data_error_naming_file_and_frame(self, tmp_path, case) -> None:
        named, patterns, *target = self.CASES[case](tmp_path)
        target = target[0] if target else named
        before = named.read_bytes() if named.is_file() else None
        with pytest.raises(DataError) as info:
            read(target)
        msg = str(info.value)
        assert msg.startswith(str(named)), msg
        for pattern in patterns:
            assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"
        if before is not None:
            assert named.read_bytes() == before  # reading changed nothing

    @pytest.mark.parametrize("case", ["npz_bad_crc", "hdf5_truncated", "extxyz_bad_count_in_frame_2",
                                      "ase_db_truncated", "label_store_garbage", "pyseqm_truncated_npy"])
    def test_data_summary_exits_2_without_a_traceback(self, tmp_path, capsys, case) -> None:
        named, patterns, *target = self.CASES[case](tmp_path)
        assert main(["data", "summary", str(target[0] if target else named)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith(f"polyfid data: error: {named}")
        assert re.search(patterns[0], err)


# ---- bad shapes and dtypes ------------------------------------------------------------------------
def _npz_object_array(tmp: Path):
    return write_npz(tmp / "o.npz", E=np.array([1.0, "x", None], dtype=object)), \
        [r"'E' holds Python objects \(a pickled object array\), expected numbers"]


def _npz_string_energies(tmp: Path):
    return write_npz(tmp / "s.npz", E=np.array(["-1.0", "-2.0", "-3.0"])), \
        [r"'E' has dtype <U4, expected real numbers"]


def _npz_complex_positions(tmp: Path):
    return write_npz(tmp / "c.npz", R=geometries() + 0j), [r"'R' has dtype complex128, expected real numbers"]


def _npz_bool_energies(tmp: Path):
    return write_npz(tmp / "b.npz", E=np.array([True, False, True])), [r"'E' has dtype bool"]


def _npz_fractional_atomic_numbers(tmp: Path):
    return write_npz(tmp / "z.npz", z=np.array([8.0, 1.5, 1.0])), \
        [r"'z' has dtype float64 with non-whole values, expected atomic numbers"]


def _npz_coordinates_for_other_atoms(tmp: Path):
    return write_npz(tmp / "r.npz", R=geometries()[:, :2]), \
        [r"'R' has shape \(3, 2, 3\), expected \(frames, 3, 3\) for the 3 atoms in 'z'"]


def _npz_energies_short(tmp: Path):
    return write_npz(tmp / "e.npz", E=np.zeros(2)), [r"'E' has shape \(2,\): 2 energies for 3 frames"]


def _npz_forces_shape(tmp: Path):
    return write_npz(tmp / "f.npz", F=np.zeros((F, 2, 3))), [r"'F' has shape \(3, 2, 3\), expected \(3, 3, 3\)"]


def _npz_nan_forces_frame_1(tmp: Path):
    forces = np.zeros((F, 3, 3))
    forces[1, 2, 0] = np.nan
    return write_npz(tmp / "n.npz", F=forces), [r"n\.npz:1: fidelity 'default': forces contain NaN or inf"]


def _npz_inf_energy_frame_2(tmp: Path):
    return write_npz(tmp / "i.npz", E=np.array([0.0, 1.0, np.inf])), [r"i\.npz:2: fidelity 'default': energy is inf"]


def _hdf5_coordinates_group(tmp: Path):
    return write_h5(tmp / "g.h5", group="coordinates"), \
        [r"group 'water': 'coordinates' is a group, expected a dataset"]


def _hdf5_energies_group(tmp: Path):
    return write_h5(tmp / "g.h5", group="energies"), [r"group 'water': 'energies' is a group, expected a dataset"]


def _hdf5_string_energies(tmp: Path):
    return write_h5(tmp / "s.h5", energies=np.array([b"a", b"b", b"c"])), \
        [r"group 'water': 'energies' has dtype \|S1, expected real numbers"]


def _hdf5_forces_shape(tmp: Path):
    return write_h5(tmp / "f.h5", forces=np.zeros((F, 3))), \
        [r"group 'water': 'forces' has shape \(3, 3\), expected \(3, 3, 3\)"]


def _hdf5_complex_coordinates(tmp: Path):
    return write_h5(tmp / "c.h5", coordinates=geometries() * 1j), [r"'coordinates' has dtype complex128"]


def _pyseqm_string_numbers(tmp: Path):
    folder = write_pyseqm(tmp / "pyseqm", Z=np.tile(["O", "H", "H", ""], (F, 1)))
    return folder / "Z.npy", [r"'Z' has dtype <U1, expected atomic numbers"], folder


def _pyseqm_object_energies(tmp: Path):
    folder = write_pyseqm(tmp / "pyseqm", Etot_DFT=np.array([1.0, None, 2.0], dtype=object))
    return folder / "Etot_DFT.npy", ["holds Python objects"], folder


def _extxyz_nan_position_frame_2(tmp: Path):
    path = edit_lines(write_extxyz(tmp / "w.extxyz"), lambda ls: ls.__setitem__(
        frame_line(2, 3), re.sub(r"^(\S+\s+)\S+", r"\1nan", ls[frame_line(2, 3)])))
    return path, [r"w\.extxyz:2: positions contain NaN or inf"]


def _extxyz_boolean_energy_frame_1(tmp: Path):
    path = edit_lines(write_extxyz(tmp / "w.extxyz"), lambda ls: ls.__setitem__(
        frame_line(1, 1), re.sub(r"energy=\S+", "energy=T", ls[frame_line(1, 1)])))
    return path, [r"w\.extxyz:1: energy key 'energy' holds a non-numeric value True"]


def _extxyz_text_charge_frame_3(tmp: Path):
    path = edit_lines(write_extxyz(tmp / "w.extxyz"), lambda ls: ls.__setitem__(
        frame_line(3, 1), ls[frame_line(3, 1)] + " charge=plus"))
    return path, [r"w\.extxyz:3: charge is 'plus', expected a whole number"]


def _extxyz_forces_columns_frame_2(tmp: Path):
    def edit(ls: list[str]) -> None:
        ls[frame_line(2, 4)] = " ".join(ls[frame_line(2, 4)].split()[:-1])

    return edit_lines(write_extxyz(tmp / "w.extxyz"), edit), [r"frame 2: cannot parse"]


def _qm22_nan_energy_frame_1(tmp: Path):
    return write_qm22(tmp / "q.xyz", energy="nan"), [r"q\.xyz:1: fidelity 'default': energy is nan"]


SHAPES = {name[1:]: fn for name, fn in list(globals().items()) if name.startswith("_") and callable(fn)
          and fn.__module__ == __name__ and name[1:] not in ARCHIVES}


class TestBadShapesAndDtypes:
    CASES = SHAPES

    @pytest.mark.parametrize("case", list(SHAPES))
    def test_bad_shape_or_dtype_is_a_data_error_naming_file_key_and_frame(self, tmp_path, case) -> None:
        named, patterns, *target = self.CASES[case](tmp_path)
        with pytest.raises(DataError) as info:
            read(target[0] if target else named)
        msg = str(info.value)
        assert msg.startswith(str(named)), msg
        for pattern in patterns:
            assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"


# ---- label stores ---------------------------------------------------------------------------------
FIX = "remove the row"
BAD_ROWS = {
    "malformed_row_garbage_blob": ("UPDATE labels SET forces = ? WHERE rowid = ?", b"\x01garbage-blob",
                                   "forces hold 13 bytes, not a whole number of float64"),
    "inf_energy": ("UPDATE labels SET energy = ? WHERE rowid = ?", float("inf"), "energy is inf"),
    "nan_forces": ("UPDATE labels SET forces = ? WHERE rowid = ?", np.full(9, np.nan).tobytes(),
                   "forces contain NaN or inf"),
    "forces_of_wrong_length": ("UPDATE labels SET forces = ? WHERE rowid = ?", np.zeros(6).tobytes(),
                               r"forces hold 6 values, expected 9 \(3 atoms x 3\)"),
    "positions_as_text": ("UPDATE labels SET positions = ? WHERE rowid = ?", "0 0 0", "positions is stored as str"),
    "energy_as_text": ("UPDATE labels SET energy = ? WHERE rowid = ?", "low", "energy is 'low'"),
    "level_not_text": ("UPDATE labels SET level = ? WHERE rowid = ?", b"\x00\x07", "must be text"),
}


class TestLabelStores:
    @pytest.mark.parametrize("case", list(BAD_ROWS))
    def test_malformed_row_names_store_row_structure_and_field(self, tmp_path, capsys, case) -> None:
        sql, value, message = BAD_ROWS[case]
        path, rowid, key = damage_store(tmp_path / "s.sqlite", sql, value)
        before = path.read_bytes()
        with pytest.raises(DataError) as info:
            read(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: row {rowid} (level ") and f"structure {key[:16]})" in msg, msg
        assert re.search(message, msg) and FIX in msg, msg
        assert path.read_bytes() == before
        assert main(["data", "summary", str(path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"{path}: row {rowid}" in err

    def test_missing_column_is_refused(self, tmp_path) -> None:
        path = write_store(tmp_path / "s.sqlite")
        con = sqlite3.connect(path)
        con.execute("ALTER TABLE labels DROP COLUMN forces")
        con.commit()
        con.close()
        with pytest.raises(DataError, match=re.escape(f"{path}: not a polyfid label store (its 'labels' table lacks "
                                                       "columns ['forces'])")):
            read(path)

    def test_foreign_sqlite_file_is_refused_untouched(self, tmp_path) -> None:
        path = tmp_path / "other.sqlite"
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE people (name TEXT)")
        con.execute("INSERT INTO people VALUES ('ada')")
        con.commit()
        con.close()
        os.utime(path, (1_000_000_000, 1_000_000_000))
        before = (path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(tmp_path)))
        with pytest.raises(DataError, match=re.escape(f"{path}: not a polyfid label store (an SQLite database with "
                                                      "tables ['people']")):
            read(path)
        as_db = tmp_path / "other.db"  # the same file, read as an ASE database: ASE would add its tables
        shutil.copy2(path, as_db)
        os.utime(as_db, (1_000_000_000, 1_000_000_000))
        with pytest.raises(DataError, match="an SQLite file without ASE's tables"):
            read(as_db)
        assert as_db.read_bytes() == before[0] and as_db.stat().st_mtime_ns == before[1]
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before[:2]
        assert sorted(os.listdir(tmp_path)) == sorted([*before[2], "other.db"])  # no journal, -wal, -shm

    @pytest.mark.slow  # a fresh interpreter imports polyfid (and torch), twice as another user
    def test_store_in_a_read_only_folder_reads(self, tmp_path) -> None:
        top = Path(tempfile.mkdtemp(prefix="polyfid-ro-"))  # under /tmp: reachable by another user
        try:
            os.chmod(top, 0o755)
            folder = top / "labels"
            path = write_store(folder / "s.sqlite")
            os.chmod(path, 0o444)
            os.chmod(folder, 0o555)
            before = path.read_bytes()
            code = ("import sys; from polyfid import read; ds = read(sys.argv[1]); "
                    "print(len(ds), ds.count('hf_sto-3g', 'forces'))")
            cmd = [sys.executable, "-c", code, str(path)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            if os.access(folder, os.W_OK):  # root ignores permissions: read as 'nobody'
                setpriv = shutil.which("setpriv")
                probe = None if setpriv is None else subprocess.run(
                    [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                     "import polyfid"], capture_output=True, env=env, cwd="/")
                if probe is None or probe.returncode != 0:
                    pytest.skip("the folder's permissions do not bind this user and 'nobody' cannot run polyfid")
                cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
            assert out.returncode == 0, out.stderr
            assert out.stdout.split() == ["3", "3"]
            assert os.listdir(folder) == ["s.sqlite"] and path.read_bytes() == before
        finally:
            os.chmod(top / "labels", 0o755)
            shutil.rmtree(top)


# ---- predict reads through polyfid.read ---------------------------------------------------------------
TINY = {"architecture": "hipnn", "n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1,
        "cutoff": 3.0}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = build_potential(TINY, [1, 6, 8], ["lj"])
    with torch.no_grad():  # the readout starts at zero: give the model some shape
        m.readout.weight.normal_(std=0.01)
    path = tmp_path_factory.mktemp("model") / "m.pt"
    save_model(path, m, TINY)
    return path


class TestPredict:
    @pytest.mark.parametrize("case", ["empty", "binary", "bad_frame_2", "npz_bad_crc", "hdf5_coordinates_group",
                                      "folder"])
    def test_bad_input_exits_2(self, model, tmp_path, capsys, case) -> None:
        if case == "empty":
            path, expected = tmp_path / "in.extxyz", "the file is empty"
            path.write_bytes(b"")
        elif case == "binary":
            path, expected = tmp_path / "in.xyz", "not a text file"
            path.write_bytes(os.urandom(64) + b"\xff")
        elif case == "bad_frame_2":
            path, expected = _extxyz_bad_count_in_frame_2(tmp_path)[0], "frame 2: cannot parse"
        elif case == "npz_bad_crc":
            path, expected = _npz_bad_crc(tmp_path)[0], "'R' cannot be read"
        elif case == "hdf5_coordinates_group":
            path, expected = _hdf5_coordinates_group(tmp_path)[0], "'coordinates' is a group"
        else:
            path, expected = tmp_path, "a folder, but not a PYSEQM folder"
        out = tmp_path / "pred.extxyz"
        assert main(["predict", str(model), str(path), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"polyfid predict: error: {path}" in err and expected in err, err
        assert not out.exists()

    @pytest.mark.parametrize("fmt", ["npz", "hdf5", "pyseqm", "labels", "extxyz"])
    def test_every_format_predicts(self, model, tmp_path, capsys, fmt) -> None:
        path = {"npz": lambda: write_npz(tmp_path / "in.npz"), "hdf5": lambda: write_h5(tmp_path / "in.h5"),
                "pyseqm": lambda: write_pyseqm(tmp_path / "pyseqm"),
                "labels": lambda: write_store(tmp_path / "in.sqlite"),
                "extxyz": lambda: write_extxyz(tmp_path / "in.extxyz", n=F)}[fmt]()
        out = tmp_path / "pred.extxyz"
        assert main(["predict", str(model), str(path), "-o", str(out)]) == 0
        assert f"wrote {F} structures" in capsys.readouterr().out
        got = ase.io.read(out, index=":")
        expected = polyfid.predict(model, read(path))
        assert len(got) == F
        for a, e in zip(got, expected):
            assert sorted(a.numbers.tolist()) == [1, 1, 8] and np.isfinite(a.positions).all()
            assert a.get_potential_energy() == pytest.approx(e["energy"], rel=1e-6, abs=1e-6)
            np.testing.assert_allclose(a.get_forces(), e["forces"], rtol=1e-5, atol=1e-6)
            assert str(path) in a.info["source"]

    def test_api_predict_takes_a_path_a_dataset_or_atoms_and_keeps_labels(self, model, tmp_path) -> None:
        path = write_npz(tmp_path / "in.npz")
        ds = read(path)
        from_path = polyfid.predict(model, path)
        from_data = polyfid.predict(model, ds)
        from_atoms = polyfid.predict(model, [Atoms(fr.numbers, fr.positions) for fr in ds])
        for a, b, c in zip(from_path, from_data, from_atoms):
            assert a["energy"] == pytest.approx(b["energy"]) == pytest.approx(c["energy"])
        assert ds.count("default", "energy") == F  # the caller's labels are left alone
        labelled = Dataset([Frame([8, 1, 1], WATER, {"x": Labels(energy=1.0)})])
        polyfid.predict(model, labelled)
        assert labelled[0].labels["x"].energy == 1.0
