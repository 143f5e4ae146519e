"""The Cartesian ACE basis, its pruning, and the descriptor network."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import toy_dataset

from polyfid.data.batch import PackedData
from polyfid.descriptors.ace import ACEBasis, ace_counts
from polyfid.descriptors.moments import InverseGaussianRadial, atomic_base
from polyfid.descriptors.network import DescriptorNetwork, predict
from polyfid.invariants import random_points, rank_of
from polyfid.invariants.jacobian import coordinates_from_tensors, evaluate
from polyfid.train.descriptor import DescriptorTraining, train_descriptor_network


@pytest.fixture(scope="module")
def basis() -> ACEBasis:
    return ACEBasis([1, 6, 8], InverseGaussianRadial(2, 0.7, 2.5, 3.0), l_max=2, max_correlation=3, max_degree=4)


def _molecule(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(6, 3, generator=g, dtype=torch.float64)
    species = torch.tensor([6, 6, 8, 1, 1, 1])
    ii, jj = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    keep = (ii != jj) & ((pos[ii] - pos[jj]).norm(dim=-1) < 3.0)
    return pos, species, ii[keep], jj[keep]


def test_basis_equals_its_graphs_evaluated_on_the_atomic_base(basis):
    pos, species, pi, pj = _molecule()
    values = basis(pos, species, pi, pj)
    base = atomic_base(pos, species, pi, pj, basis.radial, basis.elements, basis.l_max)
    for atom in range(3):
        tensors = [base[t.order][atom][..., basis._channel(k)] for k, t in enumerate(basis.types)]
        ref = evaluate(basis.functions, coordinates_from_tensors(tensors, basis.types), basis.types)
        torch.testing.assert_close(values[atom], ref, rtol=1e-10, atol=1e-12)


def test_basis_is_invariant(basis):
    pos, species, pi, pj = _molecule(1)
    values = basis(pos, species, pi, pj)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    torch.testing.assert_close(basis(pos @ q.T + 0.7, species, pi, pj), values, rtol=1e-9, atol=1e-11)
    perm = torch.tensor([1, 0, 2, 4, 3, 5])  # swap the two carbons and two hydrogens
    inv = torch.argsort(perm)
    torch.testing.assert_close(basis(pos[perm], species[perm], inv[pi], inv[pj])[inv], values, rtol=1e-9, atol=1e-11)


def test_pruned_basis_keeps_the_rank_with_fewer_functions(basis):
    pruned = basis.prune()
    counts = ace_counts(basis, pruned)
    assert pruned.n_functions < basis.n_functions
    assert pruned.n_functions <= basis.n_coordinates - 3
    assert sum(counts["full_by_body_order"].values()) == basis.n_functions
    assert sum(counts["pruned_by_body_order"].values()) == pruned.n_functions
    assert counts["largest_rejected"] < 1e-10
    assert counts["smallest_kept"] > 1e-10
    point = random_points(basis.types, 1, seed=9)[0]  # a point the selection never saw
    full_rank = rank_of(list(range(basis.n_functions)), basis.functions, basis.types, point)
    kept = [basis.functions.index(c) for c in pruned.functions]
    assert rank_of(kept, basis.functions, basis.types, point) == full_rank == pruned.n_functions


def test_descriptor_network_forces_are_minus_the_energy_gradient(basis):
    ds = toy_dataset(4)
    data = PackedData(ds, 3.0, ["lj"], dtype=torch.float64)
    net = DescriptorNetwork(basis, basis.n_functions, [1, 6, 8], hidden=8).double()
    net.fit_statistics(data)
    b = data.batch(np.arange(1))
    forces = net(b)["forces"].detach()
    h = 1e-5
    for atom, axis in ((0, 0), (2, 1), (4, 2)):
        e = []
        for sign in (1, -1):
            pos = b.positions.clone()
            pos[atom, axis] += sign * h
            e.append(float(net(dataclasses.replace(b, positions=pos), forces=False)["energy"][0]))
        assert forces[atom, axis].item() == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-5, abs=1e-8)


def test_descriptor_network_learns(basis):
    ds = toy_dataset(24, seed=3)
    data = PackedData(ds, 3.0, ["lj"], dtype=torch.float32)
    net = DescriptorNetwork(basis, basis.n_functions, [1, 6, 8], hidden=16)
    net.fit_statistics(data)
    ref = data.batch(np.arange(data.n_frames)).forces[:, 0].numpy()
    before = np.abs(predict(net, data)[1] - ref).mean()
    train_descriptor_network(net, data, DescriptorTraining(budget_s=4.0, batch_size=8, lr=5e-3))
    after = np.abs(predict(net, data)[1] - ref).mean()
    assert after < 0.7 * before
