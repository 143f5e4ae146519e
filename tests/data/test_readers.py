"""Readers, splits and summaries on tiny files written into tmp_path, including malformed input."""

from __future__ import annotations

import re

import ase.db
import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import Bohr, GPa, Hartree, kcal, mol
from conftest import toy_molecules

from polyfid.data import DataError, Dataset, Frame, Labels, load_dataset, read, split_indices
from polyfid.data.readers import READERS, detect_format
from polyfid.data.splits import nested_subsets, random_subset
from polyfid.data.summary import format_summary, summarize

KCAL = kcal / mol
RNG = np.random.default_rng(0)


def esc(path) -> str:
    return re.escape(str(path))


# ----------------------------------------------------------------------------- npz (rMD17 / sGDML)


def write_rmd17(path, n_frames=3, n_atoms=3, old=True, **override):
    data = {
        "nuclear_charges": np.array([8, 1, 1][:n_atoms], dtype=np.uint8),
        "coords": RNG.normal(size=(n_frames, n_atoms, 3)),
        "energies": -1000.0 + RNG.normal(size=n_frames),
        "forces": RNG.normal(size=(n_frames, n_atoms, 3)),
    }
    if old:
        data["old_energies"] = -1100.0 + RNG.normal(size=n_frames)
        data["old_forces"] = RNG.normal(size=(n_frames, n_atoms, 3))
        data["old_indices"] = np.arange(n_frames)
    data.update(override)
    np.savez(path, **data)
    return data


def test_rmd17_two_fidelities_converted(tmp_path):
    path = tmp_path / "mol.npz"
    raw = write_rmd17(path)
    ds = read(path)
    assert len(ds) == 3 and ds.fidelities == ["pbe_def2svp", "md17_pbe_ts"]
    f = ds[1]
    assert f.source == f"{path}:1"
    np.testing.assert_array_equal(f.numbers, [8, 1, 1])
    np.testing.assert_allclose(f.positions, raw["coords"][1])
    assert f.labels["pbe_def2svp"].energy == pytest.approx(raw["energies"][1] * KCAL)
    np.testing.assert_allclose(f.labels["pbe_def2svp"].forces, raw["forces"][1] * KCAL)
    assert f.labels["md17_pbe_ts"].energy == pytest.approx(raw["old_energies"][1] * KCAL)
    np.testing.assert_allclose(f.labels["md17_pbe_ts"].forces, raw["old_forces"][1] * KCAL)


def test_rmd17_choose_and_rename_levels(tmp_path):
    path = tmp_path / "mol.npz"
    raw = write_rmd17(path)
    assert read(path, fidelity="md17_pbe_ts").fidelities == ["md17_pbe_ts"]
    ds = read(path, levels={"pbe": ("energies", "forces"), "ts_energy_only": ("old_energies", None)})
    assert ds.fidelities == ["pbe", "ts_energy_only"]
    assert ds[0].labels["ts_energy_only"].forces is None
    ds = read(path, index=[2, 0])
    assert [f.source for f in ds] == [f"{path}:2", f"{path}:0"]
    np.testing.assert_allclose(ds[0].positions, raw["coords"][2])
    with pytest.raises(DataError, match=rf"{esc(path)}.*unknown level.*'bogus'"):
        read(path, fidelity="bogus")


def test_rmd17_without_old_keys_has_one_level(tmp_path):
    path = tmp_path / "mol.npz"
    write_rmd17(path, old=False)
    assert read(path).fidelities == ["pbe_def2svp"]
    with pytest.raises(DataError, match=rf"{esc(path)}.*'old_energies' not in the file"):
        read(path, fidelity="md17_pbe_ts")


def test_sgdml_layout_units_from_file(tmp_path):
    path = tmp_path / "water.npz"
    R = RNG.normal(size=(2, 3, 3))
    E = np.array([[-1.0], [-2.0]])
    F = RNG.normal(size=(2, 3, 3))
    np.savez(path, z=np.array([8, 1, 1]), R=R, E=E, F=F, e_unit="Hartree", r_unit="bohr")
    ds = read(path, fidelity="mp2")
    assert ds.fidelities == ["mp2"]
    np.testing.assert_allclose(ds[1].positions, R[1] * Bohr)
    assert ds[1].labels["mp2"].energy == pytest.approx(-2.0 * Hartree)
    np.testing.assert_allclose(ds[1].labels["mp2"].forces, F[1] * Hartree / Bohr)
    # explicit options override the strings in the file
    ds = read(path, energy_unit="eV", length_unit="A")
    assert ds.fidelities == ["default"]
    assert ds[1].labels["default"].energy == -2.0
    np.testing.assert_allclose(ds[1].labels["default"].forces, F[1])


def test_sgdml_default_units_kcal_mol(tmp_path):
    path = tmp_path / "md17.npz"
    np.savez(path, z=np.array([1, 1]), R=np.zeros((1, 2, 3)) + [[0, 0, 0], [0, 0, 0.7]], E=[-5.0], F=np.ones((1, 2, 3)))
    lab = read(path)[0].labels["default"]
    assert lab.energy == pytest.approx(-5.0 * KCAL)
    np.testing.assert_allclose(lab.forces, KCAL)


def test_npz_shape_mismatches(tmp_path):
    path = tmp_path / "bad_forces.npz"
    write_rmd17(path, forces=np.zeros((3, 4, 3)))
    with pytest.raises(DataError, match=rf"{esc(path)}: 'forces' has shape \(3, 4, 3\), expected \(3, 3, 3\)"):
        read(path)
    path = tmp_path / "bad_energies.npz"
    write_rmd17(path, energies=np.zeros(2))
    with pytest.raises(DataError, match=rf"{esc(path)}: 'energies' .* 2 energies for 3 frames"):
        read(path)
    path = tmp_path / "bad_coords.npz"
    write_rmd17(path, coords=np.zeros((3, 2, 3)))
    with pytest.raises(DataError, match=rf"{esc(path)}: 'coords' has shape \(3, 2, 3\), expected \(frames, 3, 3\)"):
        read(path)


@pytest.mark.parametrize(
    "key,value,problem", [("energies", np.nan, "energy is nan"), ("forces", np.inf, "forces contain NaN or inf")]
)
def test_npz_nan_inf_labels_name_frame(tmp_path, key, value, problem):
    path = tmp_path / "nan.npz"
    data = write_rmd17(path)
    arr = data[key].copy()
    arr[2] = value
    write_rmd17(path, **{key: arr})
    with pytest.raises(DataError, match=rf"{esc(path)}:2: fidelity 'pbe_def2svp': {problem}"):
        read(path)


def test_npz_unknown_unit_and_layout(tmp_path):
    path = tmp_path / "u.npz"
    np.savez(path, z=[1], R=np.zeros((1, 1, 3)), E=[0.0], F=np.zeros((1, 1, 3)), e_unit="furlong")
    with pytest.raises(DataError, match=rf"{esc(path)}: unknown energy unit 'furlong'"):
        read(path)
    with pytest.raises(DataError, match=rf"{esc(path)}: unknown force unit 'eV/parsec'"):
        read(path, energy_unit="eV", force_unit="eV/parsec")
    path = tmp_path / "other.npz"
    np.savez(path, positions=np.zeros((1, 1, 3)))
    with pytest.raises(DataError, match=rf"{esc(path)}: unknown npz layout.*'positions'"):
        read(path)


# ----------------------------------------------------------------------------- QM-22 xyz


QM22_FRAME = """    3
  -76.4
O  0.0 0.0 0.1  0.01 -0.02 0.03
H  0.0 0.7 -0.5 -0.005 0.01 -0.015
H  0.0 -0.7 -0.5 -0.005 0.01 -0.015
"""


def write_text(path, text):
    path.write_text(text)
    return path


def test_qm22_energy_hartree_and_force_is_minus_gradient(tmp_path):
    path = write_text(tmp_path / "w.xyz", QM22_FRAME + QM22_FRAME.replace("-76.4", "-76.5") + "\n\n")
    assert detect_format(path) == "qm22"
    ds = read(path, fidelity="b3lyp")
    assert len(ds) == 2 and ds.fidelities == ["b3lyp"]
    assert ds[1].source == f"{path}:1"
    lab = ds[1].labels["b3lyp"]
    assert lab.energy == pytest.approx(-76.5 * Hartree)
    np.testing.assert_allclose(lab.forces[0], -np.array([0.01, -0.02, 0.03]) * Hartree / Bohr)
    np.testing.assert_allclose(ds[0].positions[1], [0.0, 0.7, -0.5])
    np.testing.assert_array_equal(ds[0].numbers, [8, 1, 1])


def test_qm22_truncated(tmp_path):
    text = QM22_FRAME + "".join(QM22_FRAME.splitlines(keepends=True)[:4])
    path = write_text(tmp_path / "t.xyz", text)
    with pytest.raises(
        DataError, match=rf"{esc(path)}: frame 1 \(header at line 6\) is truncated: .*3 atoms.*2 atom line"
    ):
        read(path, format="qm22")


def test_qm22_atom_count_too_small(tmp_path):
    path = write_text(tmp_path / "small.xyz", QM22_FRAME.replace("    3", "    2", 1) + QM22_FRAME)
    with pytest.raises(
        DataError, match=rf"{esc(path)}: line 5 \(frame 1\): expected the atom count.*frame 0 too small"
    ):
        read(path, format="qm22")


def test_qm22_atom_count_too_large(tmp_path):
    path = write_text(tmp_path / "large.xyz", QM22_FRAME.replace("    3", "    4", 1) + QM22_FRAME)
    with pytest.raises(DataError, match=rf"{esc(path)}: line 6 \(frame 0, atom 3\): expected 7 fields.*header"):
        read(path, format="qm22")


def test_qm22_non_numeric_fields(tmp_path):
    path = write_text(tmp_path / "nn.xyz", QM22_FRAME + QM22_FRAME.replace("-0.7 -0.5", "-0.7 abc"))
    with pytest.raises(DataError, match=rf"{esc(path)}: line 10 \(frame 1, atom 2\): non-numeric field"):
        read(path, format="qm22")
    path = write_text(tmp_path / "ne.xyz", QM22_FRAME.replace("-76.4", "energy?"))
    with pytest.raises(DataError, match=rf"{esc(path)}: line 2 \(frame 0\): expected the energy"):
        read(path, format="qm22")
    path = write_text(tmp_path / "el.xyz", QM22_FRAME.replace("O ", "Xx"))
    with pytest.raises(DataError, match=rf"{esc(path)}: frame 0 .*unknown element symbol 'Xx'"):
        read(path, format="qm22")


def test_qm22_nan_energy_names_frame(tmp_path):
    path = write_text(tmp_path / "nan.xyz", QM22_FRAME + QM22_FRAME.replace("-76.4", "nan"))
    with pytest.raises(DataError, match=rf"{esc(path)}:1: fidelity 'default': energy is nan"):
        read(path, format="qm22")


def test_qm22_unknown_unit(tmp_path):
    path = write_text(tmp_path / "w.xyz", QM22_FRAME)
    with pytest.raises(DataError, match=rf"{esc(path)}: unknown force unit 'hartree/parsec'"):
        read(path, gradient_unit="hartree/parsec")


# ----------------------------------------------------------------------------- ASE (extxyz, db)


def water(shift=0.0):
    return Atoms("OH2", positions=[[0, 0, shift], [0, 0.76, -0.59], [0, -0.76, -0.59]])


def test_extxyz_calculator_results(tmp_path):
    path = tmp_path / "a.extxyz"
    frames = []
    for k in range(3):
        a = water(0.01 * k)
        a.cell = np.eye(3) * 10
        a.pbc = True
        a.calc = SinglePointCalculator(a, energy=-k - 1.0, forces=np.full((3, 3), k), stress=np.arange(6.0) * 0.01)
        frames.append(a)
    ase.io.write(path, frames)
    assert detect_format(path) == "ase"
    ds = read(path)
    assert len(ds) == 3 and ds.fidelities == ["default"]
    f = ds[2]
    assert f.source == f"{path}:2"
    assert f.labels["default"].energy == -3.0
    np.testing.assert_allclose(f.labels["default"].forces, 2.0)
    assert f.labels["default"].stress.shape == (3, 3)
    assert f.labels["default"].stress[0, 1] == pytest.approx(0.05)  # Voigt xy
    assert f.pbc.all() and np.allclose(f.cell, np.eye(3) * 10)
    # GPa unit and index
    ds = read(path, index="1:", stress_unit="GPa")
    assert [g.source for g in ds] == [f"{path}:1", f"{path}:2"]
    assert ds[1].labels["default"].stress[0, 1] == pytest.approx(0.05 * GPa)


def write_custom_xyz(path, n=3, drop_energy_at=None, nan_at=None):
    frames = []
    for k in range(n):
        a = water(0.01 * k)
        if k != drop_energy_at:
            a.info["REF_energy"] = np.nan if k == nan_at else -10.0 * (k + 1)
        a.info["charge"] = 0
        a.arrays["REF_forces"] = np.full((3, 3), 0.5 * k)
        frames.append(a)
    ase.io.write(path, frames, format="extxyz")


def test_extxyz_custom_keys_and_units(tmp_path):
    path = tmp_path / "c.xyz"
    write_custom_xyz(path)
    assert detect_format(path) == "ase"
    ds = read(path, fidelity="ccsd", energy_key="REF_energy", forces_key="REF_forces", energy_unit="kcal/mol")
    assert ds.fidelities == ["ccsd"]
    assert ds[1].labels["ccsd"].energy == pytest.approx(-20.0 * KCAL)
    np.testing.assert_allclose(ds[1].labels["ccsd"].forces, 0.5 * KCAL)  # force unit follows energy/length
    ds = read(path, energy_key="REF_energy", forces_key="REF_forces", force_unit="hartree/bohr")
    np.testing.assert_allclose(ds[2].labels["default"].forces, 1.0 * Hartree / Bohr)
    # default keys absent: the labels are simply missing
    lab = read(path)[0].labels["default"]
    assert lab.energy is None and lab.forces is None


def test_extxyz_named_key_missing_in_a_frame(tmp_path):
    path = tmp_path / "m.xyz"
    write_custom_xyz(path, drop_energy_at=1)
    with pytest.raises(DataError, match=rf"{esc(path)}:1: energy key 'REF_energy' not found; keys present: .*'charge'"):
        read(path, energy_key="REF_energy")
    with pytest.raises(DataError, match=rf"{esc(path)}:0: forces key 'F' not found; keys present: .*'REF_forces'"):
        read(path, forces_key="F")


def test_extxyz_nan_label_names_frame(tmp_path):
    path = tmp_path / "n.xyz"
    write_custom_xyz(path, nan_at=2)
    with pytest.raises(DataError, match=rf"{esc(path)}:2: fidelity 'default': energy is nan"):
        read(path, energy_key="REF_energy")


def test_extxyz_truncated_and_wrong_count(tmp_path):
    path = tmp_path / "t.xyz"
    write_custom_xyz(path)
    lines = path.read_text().splitlines(keepends=True)
    write_text(path, "".join(lines[:-1]))
    with pytest.raises(DataError, match=rf"{esc(path)}: frame 2: cannot parse"):
        read(path)
    path = tmp_path / "count.xyz"
    write_custom_xyz(path, n=2)
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = "4\n"
    write_text(path, "".join(lines))
    with pytest.raises(DataError, match=rf"{esc(path)}: frame 0: cannot parse"):
        read(path)


def test_extxyz_forces_shape_mismatch_and_units(tmp_path):
    path = tmp_path / "u.xyz"
    write_custom_xyz(path)
    with pytest.raises(DataError, match=rf"{esc(path)}: unknown energy unit 'erg'"):
        read(path, energy_unit="erg")
    with pytest.raises(DataError, match=rf"{esc(path)}: unknown stress unit 'psi'"):
        read(path, stress_unit="psi")
    a = water()
    a.info["E_vec"] = np.array([1.0, 2.0])
    path = tmp_path / "s.xyz"
    ase.io.write(path, [a], format="extxyz")
    with pytest.raises(DataError, match=rf"{esc(path)}:0: energy key 'E_vec' holds shape \(2,\)"):
        read(path, energy_key="E_vec")


def test_ase_db_keys(tmp_path):
    path = tmp_path / "x.db"
    db = ase.db.connect(path)
    a = water()
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.ones((3, 3)))
    db.write(a, data={"dft_forces": np.full((3, 3), 2.0)}, dft_energy=-2.0)
    b = water(0.1)
    db.write(b, dft_energy=-3.0)
    ds = read(path)
    assert len(ds) == 2 and ds[0].source == f"{path}:0"
    assert ds[0].labels["default"].energy == -1.0 and ds[1].labels["default"].energy is None
    ds = read(path, energy_key="dft_energy", fidelity="dft")
    assert [f.labels["dft"].energy for f in ds] == [-2.0, -3.0]
    ds = read(path, energy_key="dft_energy", selection="id=1", forces_key="dft_forces")
    np.testing.assert_allclose(ds[0].labels["default"].forces, 2.0)
    with pytest.raises(DataError, match=rf"{esc(path)}:1: forces key 'dft_forces' not found.*row id 2"):
        read(path, forces_key="dft_forces")


# ----------------------------------------------------------------------------- ANI HDF5


def write_h5(path, *, species=b"OHH", nan_energy=False, forces_shape=None, drop=None):
    with h5py.File(path, "w") as h5:
        g = h5.create_group("set/sub/mol0")
        g["coordinates"] = RNG.normal(size=(2, 3, 3)).astype(np.float32)
        g["species"] = (
            np.array([bytes([c]) for c in species], dtype="S1") if isinstance(species, bytes) else np.array(species)
        )
        e = np.array([-76.0, -76.1])
        if nan_energy:
            e[1] = np.nan
        g["energies"] = e
        g["forces"] = np.full(forces_shape or (2, 3, 3), 0.01, dtype=np.float32)
        g2 = h5.create_group("set/mol1")
        g2["coordinates"] = np.zeros((1, 2, 3)) + [[0, 0, 0], [0, 0, 0.74]]
        g2["species"] = np.array([1, 1])
        g2["energies"] = np.array([-1.17])
        for grp, key in [(g, drop)] if drop else []:
            del grp[key]


def test_hdf5_nested_groups_units_and_gradient_sign(tmp_path):
    path = tmp_path / "ani.h5"
    write_h5(path)
    assert detect_format(path) == "hdf5"
    ds = read(path)
    assert len(ds) == 3 and ds.fidelities == ["default"]
    assert [f.source for f in ds] == [f"{path}:{i}" for i in range(3)]
    by_n = {f.n_atoms: f for f in ds}
    np.testing.assert_array_equal(ds[0].numbers, [1, 1])  # "set/mol1" sorts before "set/sub/mol0"
    lab = ds[2].labels["default"]
    assert lab.energy == pytest.approx(-76.1 * Hartree)
    np.testing.assert_allclose(lab.forces, -np.float32(0.01) * Hartree)  # stored gradient, negated
    assert by_n[2].labels["default"].forces is None  # group without forces
    ds = read(path, forces_are_gradients=False, fidelity="wb97x")
    np.testing.assert_allclose(ds[2].labels["wb97x"].forces, np.float32(0.01) * Hartree)


def test_hdf5_malformed(tmp_path):
    path = tmp_path / "nan.h5"
    write_h5(path, nan_energy=True)
    with pytest.raises(
        DataError, match=rf"{esc(path)}:2: fidelity 'default': energy is nan.*'set/sub/mol0', conformer 1"
    ):
        read(path)
    ds = read(path, nan_as_missing=True)
    assert ds[2].labels["default"].energy is None and ds[2].labels["default"].forces is not None
    path = tmp_path / "shape.h5"
    write_h5(path, forces_shape=(2, 4, 3))
    with pytest.raises(DataError, match=rf"{esc(path)}: group 'set/sub/mol0': 'forces' has shape \(2, 4, 3\)"):
        read(path)
    path = tmp_path / "species.h5"
    write_h5(path, drop="species")
    with pytest.raises(DataError, match=rf"{esc(path)}: group 'set/sub/mol0': no 'species' dataset"):
        read(path)
    path = tmp_path / "sym.h5"
    write_h5(path, species=b"OHQ")
    with pytest.raises(DataError, match=rf"{esc(path)}: group 'set/sub/mol0': unknown element symbol 'Q'"):
        read(path)
    path = tmp_path / "w.h5"
    write_h5(path)
    with pytest.raises(DataError, match=rf"{esc(path)}: group 'set/mol1': level 'ccsd': no energy dataset 'ccsd_e'"):
        read(path, levels={"ccsd": ("ccsd_e", None)})
    with pytest.raises(DataError, match=rf"{esc(path)}: unknown energy unit 'kelvin'"):
        read(path, energy_unit="kelvin")


# ----------------------------------------------------------------------------- PYSEQM folder


def write_pyseqm(folder, garbage=False, bad_shape=False):
    folder.mkdir()
    Z = np.array([[8, 1, 1, 0], [6, 1, 1, 1]])
    R = RNG.normal(size=(2, 4, 3))
    R[0, 3] = 0.0
    F = RNG.normal(size=(2, 4, 3))
    F[0, 3] = 5.0 if garbage else 0.0
    np.save(folder / "Z.npy", Z)
    np.save(folder / "R.npy", R)
    np.save(folder / "Etot_PM6.npy", np.array([-10.0, -20.0]))
    np.save(folder / "Etot_DFT.npy", np.array([-100.0, -200.0] + ([0.0] if bad_shape else [])))
    np.save(folder / "F_PM6.npy", F)
    np.save(folder / "F_DFT.npy", 2 * F)
    return Z, R, F


def test_pyseqm_padding_dropped_two_levels(tmp_path):
    folder = tmp_path / "seqm"
    Z, R, F = write_pyseqm(folder)
    assert detect_format(folder) == "pyseqm"
    ds = read(folder)
    assert ds.fidelities == ["pm6", "dft"]
    assert [f.n_atoms for f in ds] == [3, 4]
    assert ds[0].source == f"{folder}:0"
    np.testing.assert_allclose(ds[0].positions, R[0, :3])
    np.testing.assert_allclose(ds[0].labels["dft"].forces, 2 * F[0, :3])
    assert ds[1].labels["pm6"].energy == -20.0
    assert read(folder, fidelity="dft").fidelities == ["dft"]
    ds = read(folder, levels={"pm6_energy": ("Etot_PM6", None)})
    assert ds.fidelities == ["pm6_energy"] and ds[0].labels["pm6_energy"].forces is None


def test_pyseqm_malformed(tmp_path):
    folder = tmp_path / "garbage"
    write_pyseqm(folder, garbage=True)
    with pytest.raises(DataError, match=rf"{esc(folder)}:0: fidelity 'pm6': padding atoms \(Z == 0\) carry non-zero"):
        read(folder)
    folder = tmp_path / "shape"
    write_pyseqm(folder, bad_shape=True)
    with pytest.raises(DataError, match=rf"{esc(folder / 'Etot_DFT.npy')}: shape \(3,\): 3 energies for 2 frames"):
        read(folder)
    with pytest.raises(DataError, match=rf"{esc(folder / 'Etot_XX.npy')}: file not found; the folder holds"):
        read(folder, levels={"x": ("Etot_XX.npy", None)})
    with pytest.raises(DataError, match=rf"{esc(folder)}: unknown level\(s\) \['pm7'\]"):
        read(folder, fidelity="pm7")


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_errors(tmp_path):
    missing = tmp_path / "nope.xyz"
    with pytest.raises(DataError, match=rf"{esc(missing)}: file not found"):
        read(missing)
    path = write_text(tmp_path / "w.xyz", QM22_FRAME)
    with pytest.raises(DataError, match=r"unknown format 'cif2'; known formats: \[.*'npz'.*'qm22'.*\]"):
        read(path, format="cif2")
    with pytest.raises(DataError, match=rf"{esc(path)}: option not understood by the 'qm22' reader.*'energy_key'"):
        read(path, energy_key="E")
    with pytest.raises(DataError, match=r"not a PYSEQM folder"):
        read(tmp_path)
    assert set(READERS) >= {"ase", "extxyz", "ase-db", "npz", "hdf5", "pyseqm", "qm22"}


def test_load_dataset_spec(tmp_path):
    path = tmp_path / "mol.npz"
    write_rmd17(path)
    ds = load_dataset({"path": str(path), "format": "npz", "fidelity": "md17_pbe_ts", "options": {"index": [0]}})
    assert len(ds) == 1 and ds.fidelities == ["md17_pbe_ts"]
    with pytest.raises(DataError, match=r"unknown key\(s\) \['fidelty'\]"):
        load_dataset({"path": str(path), "fidelty": "x"})


# ----------------------------------------------------------------------------- splits and summary


def test_split_indices_deterministic_and_disjoint():
    a = split_indices(103, [0.8, 0.1, 0.1], seed=3)
    b = split_indices(103, [0.8, 0.1, 0.1], seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in a] == [82, 10, 11]
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(103))
    c = split_indices(103, [0.8, 0.1, 0.1], seed=4)
    assert not np.array_equal(a[1], c[1])
    s = split_indices(50, [10, 5], seed=0)
    assert [len(x) for x in s] == [10, 5] and not set(s[0]) & set(s[1])
    with pytest.raises(DataError, match="only 50"):
        split_indices(50, [40, 20])
    with pytest.raises(DataError, match="sum to"):
        split_indices(50, [0.7, 0.5])


def test_nested_subsets_and_random_subset():
    pool = np.arange(100, 300)
    subs = nested_subsets(pool, [50, 100, 200], seed=1)
    assert [len(s) for s in subs] == [50, 100, 200]
    assert set(subs[0]) <= set(subs[1]) <= set(subs[2]) == set(pool.tolist())
    assert set(random_subset(1000, 10, seed=2)) <= set(random_subset(1000, 100, seed=2))
    with pytest.raises(DataError):
        nested_subsets(pool, [500])


def test_summary():
    frames = [
        Frame(numbers=[8, 1, 1], positions=np.eye(3), labels={"a": Labels(energy=-3.0, forces=np.ones((3, 3)))}),
        Frame(numbers=[1, 1], positions=np.eye(3)[:2], labels={"a": Labels(energy=-1.0), "b": Labels(energy=-2.0)}),
    ]
    s = summarize(Dataset(frames, name="tiny"))
    assert s["frames"] == 2 and s["atoms"] == {"min": 2, "mean": 2.5, "max": 3}
    assert s["elements"] == ["H", "O"] and s["formulas"] == 2
    assert s["fidelities"]["a"]["energies"] == 2 and s["fidelities"]["a"]["forces"] == 1
    assert s["fidelities"]["a"]["energy_per_atom_mean"] == pytest.approx(-0.75)
    assert s["fidelities"]["a"]["force_rms"] == pytest.approx(1.0)
    assert s["fidelities"]["a"]["force_max"] == pytest.approx(np.sqrt(3))
    assert s["fidelities"]["b"]["force_rms"] is None
    text = format_summary(s)
    assert "tiny" in text and "\nb " in text


@pytest.mark.parametrize("suffix, opener", [(".gz", "gzip"), (".bz2", "bz2"), (".xz", "lzma")])
def test_compressed_extxyz_reads_as_ase_reads_it(tmp_path, suffix, opener) -> None:
    """ASE reads .xyz.gz, .bz2 and .xz; so does polyfid, frame checks included."""
    import importlib

    plain = tmp_path / "w.extxyz"
    ase.io.write(plain, toy_molecules(3), format="extxyz")
    packed = tmp_path / f"w.xyz{suffix}"
    with importlib.import_module(opener).open(packed, "wb") as fh:
        fh.write(plain.read_bytes())
    a, b = read(plain), read(packed)
    assert len(b) == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
