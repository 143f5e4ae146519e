"""The model contract, applied to every architecture and every way of reading out several
fidelities (one head each, a fidelity embedding, base + Δ model), as NequIP's reusable model tests:
rotation, translation and permutation invariance; forces = −∇E by float64 finite
differences; energy of a batch = sum of its frames; smooth at the cutoff; stress = strain
derivative for periodic cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyfid.data.batch import PackedData, single_frame_batch
from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.models import ARCHITECTURES, DeltaPotential, build_potential

# small but complete settings for each architecture
SMALL = {
    "hipnn": {"n_features": 8, "n_sensitivities": 5, "soft_min": 0.7, "soft_max": 2.5, "cutoff": 3.0,
              "n_interactions": 2, "n_atom_layers": 1},
    "hipnn_ts": {"n_features": 6, "n_sensitivities": 4, "soft_min": 0.7, "soft_max": 2.5, "cutoff": 3.0,
                 "n_interactions": 2, "n_atom_layers": 1, "l_max": 2},
    "hiphop": {"n_features": 5, "n_sensitivities": 4, "soft_min": 0.7, "soft_max": 2.5, "cutoff": 3.0,
               "n_interactions": 2, "n_atom_layers": 1, "l_max": 3, "max_tensors": 4, "tensor_features": 3},
}
SPECIES = [1, 6, 8]


KINDS = ("heads", "branched", "embedding", "delta")


def _randomize(m):
    with torch.no_grad():  # non-trivial readout (it starts at zero)
        m.readout.weight.normal_(0, 0.5)
        m.atom_ref.normal_(0, 1.0)
    return m


@pytest.fixture(params=[(a, k) for a in sorted(ARCHITECTURES) for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    arch, kind = request.param
    assert arch in SMALL, f"add small settings for {arch} to the contract test"
    torch.manual_seed(0)
    cfg = {"architecture": arch, **SMALL[arch]}
    if kind == "delta":
        base = _randomize(build_potential(cfg, SPECIES, ["a"]))
        return DeltaPotential(base, _randomize(build_potential(cfg, SPECIES, ["b"])), "b", "a").double()
    if kind == "embedding":
        cfg["fidelity_embedding"] = 3
    if kind == "branched":
        cfg["fidelity_blocks"] = 1
        m = _randomize(build_potential(cfg, SPECIES, ["a", "b"]))
        with torch.no_grad():  # the branches differ: b's own last block moved off a's
            for p in m.tails.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return m.double()
    return _randomize(build_potential(cfg, SPECIES, ["a", "b"])).double()


def perturb_head(model, h: int) -> None:
    """Change what only fidelity `h` depends on."""
    with torch.no_grad():
        if isinstance(model, DeltaPotential):
            assert h == 1
            model.delta.readout.weight.add_(1.0)
        elif hasattr(model, "fidelity_embedding"):
            model.fidelity_embedding[h].add_(1.0)
        elif hasattr(model, "tails") and h > 0:
            for p in model.tails[h - 1].parameters():
                p.add_(0.3)
        else:
            model.readout.weight[h].add_(1.0)


def random_molecule(rng, n=7):
    numbers = rng.choice(SPECIES, size=n)
    pos = rng.uniform(0, 2.5, size=(n, 3))
    return numbers, pos


def energy(model, numbers, pos, cell=None, pbc=None):
    b = single_frame_batch(numbers, pos, model.cutoff, cell, pbc, dtype=torch.float64)
    return model(b, forces=False)["energy"][0]


def random_rotation(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_rotation_translation_invariance(model):
    rng = np.random.default_rng(1)
    z, pos = random_molecule(rng)
    e0 = energy(model, z, pos)
    rot = random_rotation(rng)
    e1 = energy(model, z, pos @ rot.T + rng.normal(size=3) * 3.0)
    torch.testing.assert_close(e0, e1, rtol=1e-10, atol=1e-10)


def test_permutation_invariance(model):
    rng = np.random.default_rng(2)
    z, pos = random_molecule(rng)
    perm = rng.permutation(len(z))
    torch.testing.assert_close(energy(model, z, pos), energy(model, z[perm], pos[perm]), rtol=1e-10, atol=1e-10)


def test_forces_are_negative_gradient(model):
    rng = np.random.default_rng(3)
    z, pos = random_molecule(rng, n=5)
    b = single_frame_batch(z, pos, model.cutoff, dtype=torch.float64)
    forces = model(b, forces=True)["forces"][:, 0].detach().numpy()
    h = 1e-5
    fd = np.zeros_like(pos)
    for a in range(len(z)):
        for c in range(3):
            p, m = pos.copy(), pos.copy()
            p[a, c] += h
            m[a, c] -= h
            fd[a, c] = -(energy(model, z, p)[0] - energy(model, z, m)[0]).item() / (2 * h)
    np.testing.assert_allclose(forces, fd, rtol=1e-5, atol=1e-7)
    assert np.abs(forces).max() > 1e-3  # the test is not vacuous


def test_batch_is_sum_of_frames(model):
    rng = np.random.default_rng(4)
    frames = []
    for n in (3, 6, 4):
        z, pos = random_molecule(rng, n)
        frames.append(Frame(z, pos, {"a": Labels(energy=0.0)}))
    packed = PackedData(Dataset(frames), model.cutoff, ["a"])
    out = model(packed.batch([0, 1, 2]), forces=True)
    for k, f in enumerate(frames):
        b = single_frame_batch(f.numbers, f.positions, model.cutoff, dtype=torch.float64)
        single = model(b, forces=True)
        torch.testing.assert_close(out["energy"][k], single["energy"][0])
        s = packed.atom_ptr[k]
        torch.testing.assert_close(out["forces"][s : s + f.n_atoms], single["forces"])


def test_smooth_at_cutoff(model):
    # two atoms pulled apart through the cutoff: energy continuous, forces -> 0
    rc = model.cutoff
    z = np.array([6, 8])
    energies, forces = [], []
    for d in (rc - 1e-4, rc - 1e-6, rc + 1e-6):
        pos = np.array([[0.0, 0, 0], [d, 0, 0]])
        b = single_frame_batch(z, pos, rc, dtype=torch.float64)
        out = model(b, forces=True)
        energies.append(out["energy"][0, 0].item())
        forces.append(np.abs(out["forces"].detach().numpy()).max())
    assert abs(energies[1] - energies[2]) < 1e-8
    assert forces[1] < 1e-6


def test_periodic_stress_is_strain_derivative(model):
    rng = np.random.default_rng(5)
    cell = np.diag([3.2, 3.5, 3.9]) + rng.normal(scale=0.1, size=(3, 3))
    z = rng.choice(SPECIES, size=4)
    pos = rng.uniform(0, 1, size=(4, 3)) @ cell
    pbc = np.array([True, True, True])
    b = single_frame_batch(z, pos, model.cutoff, cell, pbc, dtype=torch.float64)
    out = model(b, forces=True, stress=True)
    stress = out["stress"][0, 0].detach().numpy()
    vol = abs(np.linalg.det(cell))
    h = 1e-6
    fd = np.zeros((3, 3))
    for a in range(3):
        for c in range(3):
            eps = np.zeros((3, 3))
            eps[a, c] = eps[c, a] = h / 2 if a != c else h
            ep = energy(model, z, pos @ (np.eye(3) + eps), cell @ (np.eye(3) + eps), pbc)[0].item()
            em = energy(model, z, pos @ (np.eye(3) - eps), cell @ (np.eye(3) - eps), pbc)[0].item()
            fd[a, c] = (ep - em) / (2 * h) / vol
    np.testing.assert_allclose(stress, fd, rtol=1e-5, atol=1e-8)
    # translation of a periodic system by a lattice vector changes nothing
    e_shift = energy(model, z, pos + cell[0], cell, pbc)
    torch.testing.assert_close(e_shift, out["energy"][0], rtol=1e-10, atol=1e-10)


def test_heads_are_independent(model):
    rng = np.random.default_rng(6)
    z, pos = random_molecule(rng)
    e = energy(model, z, pos)
    perturb_head(model, 1)
    e2 = energy(model, z, pos)
    assert e2[0] == e[0] and e2[1] != e[1]


def test_explicit_gradient_matches_autograd(model):
    """Where an architecture writes out dE/d(pair vector), it equals autograd's, and so do
    the parameter gradients of a force loss (what training differentiates)."""
    if not model.explicit:
        pytest.skip(f"{type(model).__name__} of this architecture uses autograd forces only")
    rng = np.random.default_rng(7)
    frames = [Frame(*random_molecule(rng, n), {"a": Labels(energy=0.0)}) for n in (4, 6)]
    cell = np.diag([3.3, 3.6, 3.9])
    z = rng.choice(SPECIES, size=4)
    frames.append(Frame(z, rng.uniform(0, 3, (4, 3)), {"a": Labels(energy=0.0)}, cell=cell, pbc=[True] * 3))
    batch = PackedData(Dataset(frames), model.cutoff, ["a"]).batch([0, 1, 2])
    results = {}
    for explicit in (True, False):
        model.use_explicit_gradient = explicit
        model.zero_grad()
        out = model(batch, forces=True, stress=True, create_graph=True)
        (out["forces"].square().sum() + out["stress"].square().sum()).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        results[explicit] = (out, grads)
    model.use_explicit_gradient = True
    (a, ga), (b, gb) = results[True], results[False]
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-11)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
