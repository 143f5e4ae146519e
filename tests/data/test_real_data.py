"""Every public data set in ../shared/data loads with the right units, signs and shapes.

The data live beside the project (``<repo>/../shared/data``, or the folder named by the environment
variable POLYFID_SHARED_DATA) and are not committed; without them these tests are skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase.units import Bohr, Hartree, kcal, mol

from polyfid.data import read

KCAL = kcal / mol  # 0.0433641... eV per kcal/mol


def _data_dir() -> Path:
    env = os.environ.get("POLYFID_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


DATA = _data_dir()


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"../shared/data not found: {DATA} (set POLYFID_SHARED_DATA to the data folder)")
    return DATA


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path}")
    return path


# ----------------------------------------------------------------------------- rMD17


@pytest.mark.parametrize("molecule,n_atoms", [("ethanol", 9), ("aspirin", 21), ("azobenzene", 24)])
@pytest.mark.parametrize("split", ["train", "test"])
def test_rmd17(data, molecule, n_atoms, split):
    path = need(data / "rmd17" / f"rmd17_{molecule}_{split}_01.npz")
    t0 = time.perf_counter()
    ds = read(path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"loading {path.name} took {elapsed:.2f} s"
    assert len(ds) == 1000 and ds.fidelities == ["pbe_def2svp", "md17_pbe_ts"]
    raw = np.load(path)
    for i in (0, 999):
        f = ds[i]
        assert f.n_atoms == n_atoms and f.source == f"{path}:{i}"
        np.testing.assert_array_equal(f.numbers, raw["nuclear_charges"])
        np.testing.assert_allclose(f.positions, raw["coords"][i])
        assert f.labels["pbe_def2svp"].energy == pytest.approx(raw["energies"][i] * KCAL, rel=1e-12)
        np.testing.assert_allclose(f.labels["pbe_def2svp"].forces, raw["forces"][i] * KCAL, rtol=1e-12)
        assert f.labels["md17_pbe_ts"].energy == pytest.approx(raw["old_energies"][i] * KCAL, rel=1e-12)
        np.testing.assert_allclose(f.labels["md17_pbe_ts"].forces, raw["old_forces"][i] * KCAL, rtol=1e-12)


def test_rmd17_ethanol_known_values(data):
    path = need(data / "rmd17" / "rmd17_ethanol_train_01.npz")
    f = read(path, fidelity="pbe_def2svp")[0]
    assert KCAL == pytest.approx(0.0433641, rel=1e-6)
    np.testing.assert_allclose(
        f.labels["pbe_def2svp"].forces[0], np.array([-17.64730699, -26.13751651, 40.70575377]) * 0.0433641, rtol=1e-6
    )
    assert f.labels["pbe_def2svp"].energy == pytest.approx(-97079.92222179 * 0.0433641, rel=1e-6)


def test_botnet_ethanol_equals_rmd17_conversion(data):
    """BOTNet's ethanol set (eV) holds rMD17 frames: our kcal/mol -> eV conversion reproduces it."""
    rmd = read(need(data / "rmd17" / "rmd17_ethanol_test_01.npz"), fidelity="pbe_def2svp")
    bot = read(need(data / "botnet" / "dataset_ethanol_train.xyz"))
    r_pos = np.stack([f.positions for f in rmd])
    matches = 0
    for f in bot:
        d = np.abs(r_pos - f.positions).max(axis=(1, 2))
        j = int(d.argmin())
        if d[j] < 1e-6:
            matches += 1
            assert f.labels["default"].energy == pytest.approx(rmd[j].labels["pbe_def2svp"].energy, abs=1e-6)
            np.testing.assert_allclose(f.labels["default"].forces, rmd[j].labels["pbe_def2svp"].forces, atol=1e-6)
    assert matches == 12  # the overlap stated in ../shared/data/README.md


# ----------------------------------------------------------------------------- PYSEQM


def test_pyseqm(data):
    folder = need(data / "pyseqm_pm6_dft")
    ds = read(folder)
    assert len(ds) == 2922 and ds.fidelities == ["pm6", "dft"]
    Z = np.load(folder / "Z.npy")
    R = np.load(folder / "R.npy")
    F = np.load(folder / "F_DFT.npy")
    n = (Z > 0).sum(axis=1)
    assert [f.n_atoms for f in ds] == n.tolist()
    assert n.min() == 2 and n.max() == 20
    assert all((f.numbers > 0).all() for f in ds)  # padding dropped
    i = int(np.argmin(n))  # a heavily padded frame
    np.testing.assert_allclose(ds[i].positions, R[i, : n[i]])
    np.testing.assert_allclose(ds[i].labels["dft"].forces, F[i, : n[i]])
    assert ds[0].labels["pm6"].energy == pytest.approx(np.load(folder / "Etot_PM6.npy")[0])
    assert len({f.formula() for f in ds}) == 317


def _xh_stretch_slope(ds, fid):
    """Slope of the radial force on H along its X-H bond vs the bond length: negative for forces
    (a stretched bond pulls back), positive for gradients."""
    r, fr = [], []
    for f in ds:
        forces = f.labels[fid].forces
        heavy = np.flatnonzero(f.numbers > 1)
        for h in np.flatnonzero(f.numbers == 1):
            d = np.linalg.norm(f.positions[heavy] - f.positions[h], axis=1)
            j = heavy[d.argmin()]
            if d.min() < 1.3:
                u = (f.positions[h] - f.positions[j]) / d.min()
                r.append(d.min())
                fr.append((forces[h] - forces[j]) @ u / 2)
    return np.polyfit(r, fr, 1)[0]


def test_pyseqm_and_rmd17_store_forces_not_gradients(data):
    seqm = read(need(data / "pyseqm_pm6_dft"), index=slice(0, 300))
    assert _xh_stretch_slope(seqm, "pm6") < -5 and _xh_stretch_slope(seqm, "dft") < -5  # eV/Å²
    rmd = read(need(data / "rmd17" / "rmd17_ethanol_train_01.npz"), index=slice(0, 200))
    assert _xh_stretch_slope(rmd, "pbe_def2svp") < -5


# ----------------------------------------------------------------------------- BOTNet extxyz


BOTNET = {
    "dataset_3BPA_iso_atoms.xyz": (4, False),
    "dataset_3BPA_train_300K.xyz": (500, True),
    "dataset_3BPA_train_mixedT.xyz": (500, True),
    "dataset_acac_isolated_atoms.xyz": (3, False),
    "dataset_acac_test_H_transfer.xyz": (15, False),
    "dataset_acac_test_MD_300K.xyz": (650, True),
    "dataset_acac_test_MD_600K.xyz": (650, True),
    "dataset_acac_test_dihedral.xyz": (45, False),
    "dataset_acac_train_300K.xyz": (500, True),
    "dataset_acac_train_600K.xyz": (500, True),
    "dataset_ethanol_isolated_atoms.xyz": (4, False),
    "dataset_ethanol_test_H_removal.xyz": (60, False),
    "dataset_ethanol_test_MD.xyz": (1000, True),
    "dataset_ethanol_test_dimers.xyz": (429, False),
    "dataset_ethanol_test_eth_meth.xyz": (1145, True),
    "dataset_ethanol_test_norm_mode_3005.xyz": (18, False),
    "dataset_ethanol_test_norm_mode_874.xyz": (37, False),
    "dataset_ethanol_train.xyz": (1000, True),
    "dataset_ethanol_train_eth_meth.xyz": (1300, True),
}


@pytest.mark.parametrize("name", sorted(BOTNET))
def test_botnet(data, name):
    path = need(data / "botnet" / name)
    n_frames, has_forces = BOTNET[name]
    ds = read(path, fidelity="dft")
    assert len(ds) == n_frames
    assert ds.count("dft", "energy") == n_frames
    assert ds.count("dft", "forces") == (n_frames if has_forces else 0)
    assert ds[-1].source == f"{path}:{n_frames - 1}"
    assert not any(f.pbc.any() for f in ds)
    if has_forces:  # molecules in vacuum: forces sum to ~0
        assert max(np.abs(f.labels["dft"].forces.sum(axis=0)).max() for f in ds) < 1e-2


def test_botnet_extxyz_values(data):
    path = need(data / "botnet" / "dataset_ethanol_train.xyz")
    f = read(path, index=0)[0]
    assert f.labels["default"].energy == pytest.approx(-4209.4657843064815)
    np.testing.assert_allclose(f.labels["default"].forces[0], [-4.15950961, 0.10729389, 3.61777644])
    np.testing.assert_allclose(f.positions[0], [0.40162460, 0.38569419, 0.07944170])


# ----------------------------------------------------------------------------- QM-22


def _qm22_raw_frame(path: Path, n_atoms: int, i: int):
    with open(path) as fh:
        lines = fh.readlines()[i * (n_atoms + 2) : (i + 1) * (n_atoms + 2)]
    values = np.array([ln.split()[1:] for ln in lines[2:]], dtype=float)
    return float(lines[1]), values[:, :3], values[:, 3:]


@pytest.mark.parametrize("name,n_frames,n_atoms", [("Ethanol.xyz", 11011, 9), ("Methane.xyz", 9000, 5)])
def test_qm22(data, name, n_frames, n_atoms):
    path = need(data / "qm22" / name)
    t0 = time.perf_counter()
    ds = read(path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"loading {name} took {elapsed:.2f} s"
    assert len(ds) == n_frames and ds.fidelities == ["default"]
    for i in (0, 1234, n_frames - 1):
        energy, pos, grad = _qm22_raw_frame(path, n_atoms, i)
        f = ds[i]
        assert f.source == f"{path}:{i}"
        np.testing.assert_allclose(f.positions, pos)
        assert f.labels["default"].energy == pytest.approx(energy * Hartree, rel=1e-12)
        np.testing.assert_allclose(f.labels["default"].forces, -grad * Hartree / Bohr, rtol=1e-12)
    assert _xh_stretch_slope(ds[:300], "default") < 0  # forces after negating the stored gradient


# ----------------------------------------------------------------------------- mbGDML water


@pytest.mark.parametrize(
    "name,n_frames,n_atoms",
    [("140h2o.sphere.gfn2.md.500k.prod1.3h2o.dset.1h2o-dset.npz", 14027, 3), ("6h2o.temelso.etal-dset.npz", 8, 18)],
)
def test_mbgdml_water(data, name, n_frames, n_atoms):
    path = need(data / "mbgdml_water" / name)
    ds = read(path, fidelity="mp2")
    assert len(ds) == n_frames and ds.fidelities == ["mp2"]
    raw = np.load(path)
    assert str(raw["e_unit"]) == "kcal/mol" and str(raw["r_unit"]) == "Angstrom"
    f = ds[n_frames - 1]
    assert f.n_atoms == n_atoms and sorted(f.numbers.tolist()) == [1] * (2 * n_atoms // 3) + [8] * (n_atoms // 3)
    assert f.labels["mp2"].energy == pytest.approx(raw["E"][-1] * KCAL)
    np.testing.assert_allclose(f.labels["mp2"].forces, raw["F"][-1] * KCAL)


# ----------------------------------------------------------------------------- COMP6 S66x8


def test_comp6_s66x8(data):
    path = need(data / "comp6_s66x8" / "s66x8_wb97x6-31gd.h5")
    ds = read(path)
    assert len(ds) == 528 and ds.fidelities == ["default"]
    assert ds.elements == [1, 6, 7, 8]
    with h5py.File(path) as h5:
        g = h5["s66x8/mol00"]
        assert [s.decode() for s in g["species"][()]] == ["O", "H", "H", "O", "H", "H"]
        E, R, G = g["energies"][()], g["coordinates"][()].astype(float), g["forces"][()].astype(float)
    # the first group is the water dimer, 8 separations
    for i in range(8):
        f = ds[i]
        np.testing.assert_allclose(f.positions, R[i])
        assert f.labels["default"].energy == pytest.approx(E[i] * Hartree)
        np.testing.assert_allclose(f.labels["default"].forces, -G[i] * Hartree)  # stored gradient, negated


def test_comp6_forces_are_minus_energy_derivative(data):
    """Along the S66x8 dissociation scan the net force on one monomer equals −dE/d(separation):
    our (negated) forces match the energies; the stored vectors are gradients."""
    path = need(data / "comp6_s66x8" / "s66x8_wb97x6-31gd.h5")
    scan = read(path, groups=["s66x8/mol00"])  # water dimer: atoms 0-2 and 3-5
    pos = np.stack([f.positions for f in scan])
    energy = np.array([f.labels["default"].energy for f in scan])
    forces = np.stack([f.labels["default"].forces for f in scan])
    com_a, com_b = pos[:, :3].mean(axis=1), pos[:, 3:].mean(axis=1)
    sep = np.linalg.norm(com_a - com_b, axis=1)
    u = (com_a - com_b) / sep[:, None]
    f_along = np.einsum("ij,ij->i", forces[:, :3].sum(axis=1), u)
    dE = np.gradient(energy, sep)
    mid = slice(2, 6)  # evenly spaced middle of the scan, where central differences are accurate
    np.testing.assert_allclose(f_along[mid], -dE[mid], rtol=0.1)
