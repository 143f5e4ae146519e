"""The ASE calculator: same numbers as the batched model, forces and stress as derivatives of
its energy (float64 finite differences), energy conservation in MD, periodic cells smaller than
the cutoff, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

import polyfid
from polyfid.calculators.ase import PolyfidCalculator
from polyfid.models import build_potential, save_model

SMALL = {"n_features": 8, "n_sensitivities": 6, "soft_min": 0.7, "soft_max": 3.0, "cutoff": 3.5,
         "n_interactions": 2, "n_atom_layers": 1}


def thermalize(atoms, temperature_K, rng):
    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)


def tiny_model(species, fidelities=("low", "high"), cutoff=3.5, seed=0):
    """A small HIP-NN with a non-zero random readout (it starts at zero), in float64."""
    torch.manual_seed(seed)
    model = build_potential({"architecture": "hipnn", **SMALL, "cutoff": cutoff}, species, list(fidelities))
    with torch.no_grad():
        model.readout.weight.normal_(0, 0.3)
        model.atom_ref.normal_(0, 1.0)
    return model.double().eval()


@pytest.fixture(scope="module")
def mol_model():
    return tiny_model([1, 6, 8])


def ethanol(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_calculator_equals_batched_prediction(mol_model, tmp_path):
    images = [ethanol(k) for k in range(3)]
    for fid in ("low", "high"):
        ref = polyfid.predict(mol_model, images, fidelity=fid)
        for atoms, r in zip(images, ref):
            atoms.calc = PolyfidCalculator(mol_model, fidelity=fid, dtype="float64")
            assert atoms.get_potential_energy() == pytest.approx(r["energy"], rel=1e-12, abs=1e-10)
            np.testing.assert_allclose(atoms.get_forces(), r["forces"], rtol=1e-10, atol=1e-10)
    # the heads differ, so the fidelity argument matters
    a = images[0]
    a.calc = PolyfidCalculator(mol_model, fidelity="low", dtype="float64")
    e_low = a.get_potential_energy()
    a.calc = PolyfidCalculator(mol_model, fidelity="high", dtype="float64")
    assert abs(a.get_potential_energy() - e_low) > 1e-3
    # a model file gives the same numbers as the Potential it was written from
    path = tmp_path / "model.pt"
    save_model(path, mol_model, {"architecture": "hipnn", **SMALL})
    a.calc = PolyfidCalculator(path, fidelity="high", dtype="float64")
    assert a.get_potential_energy() == pytest.approx(images[0].calc.get_potential_energy(a), rel=1e-12)
    # float32 agrees with float64 to single precision
    a.calc = PolyfidCalculator(path, fidelity="high")
    assert a.get_potential_energy() == pytest.approx(images[0].calc.get_potential_energy(a), rel=1e-5)


def test_forces_are_minus_energy_gradient(mol_model):
    atoms = ethanol(1)
    atoms.calc = PolyfidCalculator(mol_model, fidelity="high", dtype="float64")
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2  # non-trivial
    numeric = calculate_numerical_forces(atoms, eps=1e-5)
    np.testing.assert_allclose(forces, numeric, atol=1e-7, rtol=1e-6)


def test_velocity_verlet_conserves_energy(mol_model):
    atoms = ethanol(2)
    atoms.calc = PolyfidCalculator(mol_model, fidelity="low", dtype="float64")
    thermalize(atoms, 300.0, np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, 0.25 * units.fs)
    e_pot, e_tot = [], []

    def record():
        e_pot.append(atoms.get_potential_energy())
        e_tot.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())

    dyn.attach(record, interval=1)
    dyn.run(200)
    e_pot, e_tot = np.array(e_pot), np.array(e_tot)
    assert np.all(np.isfinite(e_tot))
    assert np.ptp(e_pot) > 0.02  # the atoms moved on a non-flat surface
    assert np.ptp(e_tot) < 0.02 * np.ptp(e_pot), (np.ptp(e_tot), np.ptp(e_pot))


@pytest.fixture(scope="module")
def cu_model():
    return tiny_model([29], fidelities=("emt",), cutoff=4.5, seed=1)


def small_cu_cell():
    """A 1-atom-wide fcc Cu cell (vectors ≈ 2.55 Å, far below twice the cutoff), sheared,
    with 2 atoms so forces do not vanish by symmetry."""
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 0.98, 0.03], [0.01, 0.0, 1.02]]),
                   scale_atoms=True)
    atoms.positions[1] += [0.07, -0.05, 0.04]
    return atoms


def test_periodic_small_cell_stress_and_supercell(cu_model):
    atoms = small_cu_cell()
    assert 2 * cu_model.cutoff > min(np.linalg.norm(atoms.cell.array, axis=1))
    atoms.calc = PolyfidCalculator(cu_model, dtype="float64")
    e = atoms.get_potential_energy()
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-6), atol=1e-7, rtol=1e-5)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-5), atol=1e-7)
    # the same crystal as a 2x2x1 supercell: 4x the energy, the same stress and forces
    sc = atoms.repeat((2, 2, 1))
    sc.calc = PolyfidCalculator(cu_model, dtype="float64")
    assert sc.get_potential_energy() == pytest.approx(4 * e, rel=1e-10)
    np.testing.assert_allclose(sc.get_stress(), stress, atol=1e-10)
    np.testing.assert_allclose(sc.get_forces()[: len(atoms)], atoms.get_forces(), atol=1e-10)


def test_unknown_fidelity_is_a_clear_error(mol_model):
    with pytest.raises(KeyError, match="no fidelity 'dft'.*low.*high"):
        PolyfidCalculator(mol_model, fidelity="dft")


def test_unknown_element_is_a_clear_error(mol_model):
    atoms = Atoms("CuH", positions=[[0, 0, 0], [0, 0, 1.5]])
    atoms.calc = PolyfidCalculator(mol_model, dtype="float64")
    with pytest.raises(polyfid.DataError, match=r"atomic numbers \[29\]"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("arch", ["hipnn_ts", "hiphop"])
def test_compiled_calculator_equals_eager(arch):
    """compile=True gives eager's numbers for hipnn_ts (energy compiled, forces from its compiled
    backward) and hiphop (the explicit pass compiled)."""
    torch.manual_seed(0)
    extra = {"l_max": 2} if arch == "hipnn_ts" else {"l_max": 2, "max_tensors": 3, "tensor_features": 4}
    model = build_potential({"architecture": arch, **SMALL, **extra}, [1, 6, 8], ["low"])
    with torch.no_grad():
        model.readout.weight.normal_(0, 0.3)
    model = model.double().eval()
    # a second geometry reuses the compiled code; for hiphop, switching its explicit gradient off
    # afterwards must switch the compiled path too
    for k in range(3 if arch == "hiphop" else 2):
        model.use_explicit_gradient = k < 2
        atoms = ethanol(k)
        atoms.calc = PolyfidCalculator(model, dtype="float64")
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = PolyfidCalculator(model, dtype="float64", compile=True)
        assert atoms.get_potential_energy() == pytest.approx(e, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), f, rtol=1e-8, atol=1e-10)
