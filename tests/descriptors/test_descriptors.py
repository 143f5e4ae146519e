"""Moment-tensor descriptors: symmetry, the closed-form derivatives, the atomic-base layout."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from polyfid.descriptors import BesselRadial, InverseGaussianRadial, MomentInvariants, atomic_base
from polyfid.descriptors.moments import element_embedding, invariants_and_jacobian
from polyfid.diagnose.potentials import frame_rows
from polyfid.models.layers.tensors import invariant_names, invariants, split_orders
from polyfid.neighbors import neighbor_pairs

ELEMENTS = [1, 6, 8]


def cluster(seed: int = 0, n: int = 7, spacing: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
    """A random H/C/O cluster (Å) on a jittered cube of edge `spacing`: at 1.2 Å every atom sees
    all others within 3 Å; at 1.9 Å the body diagonals fall outside, so neighbour counts differ
    and the padded neighbour slots are exercised."""
    rng = np.random.default_rng(seed)
    grid = np.array(list(itertools.product(range(2), range(2), range(2))), float)[:n]
    pos = spacing * grid + rng.normal(scale=0.15, size=(n, 3))
    species = rng.choice(ELEMENTS, size=n)
    species[:3] = ELEMENTS  # every element present
    return torch.tensor(pos, dtype=torch.float64), torch.tensor(species)


def pairs(pos: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    i, j, _ = neighbor_pairs(pos.detach().numpy(), cutoff)
    return torch.from_numpy(i), torch.from_numpy(j)


def random_rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


@pytest.fixture
def desc() -> MomentInvariants:
    return MomentInvariants(ELEMENTS, BesselRadial(3, 3.0), element_channels="pairs")


def test_names_and_sizes(desc) -> None:
    assert desc.invariant_names == invariant_names(3, 4) and len(desc.invariant_names) == 13
    emb, labels = element_embedding(ELEMENTS, "pairs")
    assert emb.shape == (3, 7) and labels == ["H", "C", "O", "*", "HC", "HO", "CO"]
    assert desc.n_descriptors == 13 * 7 * 3 == len(desc.names)
    assert element_embedding([1, 8], "pairs")[0].shape == (2, 3)  # two elements: the pair is the blind block


@pytest.mark.parametrize("spacing", [1.2, 1.9])
def test_invariant_to_rotation_translation_permutation(desc, spacing) -> None:
    pos, z = cluster(spacing=spacing)
    i, j = pairs(pos, desc.cutoff)
    if spacing > 1.5:  # uneven neighbour counts: padded slots in the neighbour layout
        assert len(set(torch.bincount(i).tolist())) > 1
    d = desc(pos, z, i, j)
    assert d.shape == (len(z), desc.n_descriptors) and torch.isfinite(d).all()
    rot = pos @ random_rotation(1).T + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    torch.testing.assert_close(desc(rot, z, *pairs(rot, desc.cutoff)), d, rtol=1e-10, atol=1e-10)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(2))
    dp = desc(pos[perm], z[perm], *pairs(pos[perm], desc.cutoff))
    torch.testing.assert_close(dp, d[perm], rtol=1e-10, atol=1e-10)
    # the pair list's order does not matter
    order = torch.randperm(len(i), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(desc(pos, z, i[order], j[order]), d, rtol=1e-12, atol=1e-12)


def test_atomic_base_is_the_sum_over_neighbours() -> None:
    pos, z = cluster(1)
    radial = InverseGaussianRadial(4, 0.85, 4.5, 3.0)
    i, j = pairs(pos, 3.0)
    s, v, q, t = atomic_base(pos, z, i, j, radial, ELEMENTS, 3)
    vec = pos[j] - pos[i]
    r = vec.norm(dim=1)
    u = vec / r[:, None]
    rad = radial(r)  # (P, 4)
    el = torch.tensor([ELEMENTS.index(int(x)) for x in z[j]])
    chan = torch.zeros(len(r), 3, 4, dtype=torch.float64)
    chan[torch.arange(len(r)), el] = rad
    chan = chan.reshape(len(r), 12)  # c = element · n_radial + ν
    torch.testing.assert_close(s, torch.zeros(len(z), 12, dtype=torch.float64).index_add(0, i, chan))
    torch.testing.assert_close(v, torch.zeros(len(z), 3, 12, dtype=torch.float64).index_add(
        0, i, u[:, :, None] * chan[:, None]))
    assert torch.allclose(q.diagonal(dim1=1, dim2=2).sum(-1), torch.zeros(len(z), 12, dtype=torch.float64),
                          atol=1e-12)  # traceless
    assert torch.allclose(t, t.transpose(1, 2)) and torch.allclose(t, t.transpose(2, 3))  # symmetric


def _symmetric_flat(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(n, 40, k, dtype=torch.float64, generator=g)
    q = flat[:, 4:13].reshape(n, 3, 3, k)
    q = (q + q.transpose(1, 2)) / 2
    t = flat[:, 13:40].reshape(n, 3, 3, 3, k)
    t = sum(t.permute(0, *[1 + p for p in perm], 4) for perm in itertools.permutations(range(3))) / 6
    return torch.cat([flat[:, :4], q.reshape(n, 9, k), t.reshape(n, 27, k)], 1)


def test_closed_form_invariants_and_jacobian_match_autograd() -> None:
    names = invariant_names(3, 4)
    flat = _symmetric_flat(4, 3, 0)
    vals, jac = invariants_and_jacobian(flat, names)
    torch.testing.assert_close(vals, invariants(split_orders(flat, 3), names))
    # directional derivatives along symmetric directions (the only ones the base moves in)
    direction = _symmetric_flat(4, 3, 1)
    _, jvp = torch.func.jvp(lambda f: invariants(split_orders(f, 3), names), (flat,), (direction,))
    torch.testing.assert_close(torch.einsum("nwik,nwk->nik", jac, direction), jvp)


@pytest.mark.parametrize("spacing", [1.2, 1.9])
def test_slot_gradients_and_force_rows_equal_finite_differences(desc, spacing) -> None:
    pos, z = cluster(2, spacing=spacing)
    i, j = pairs(pos, desc.cutoff)
    if spacing > 1.5:
        assert len(set(torch.bincount(i).tolist())) > 1
        assert (torch.cdist(pos, pos) - desc.cutoff).abs().min() > 1e-3  # no pair at the cutoff
    sd = desc.with_gradients(pos, z, i, j)
    torch.testing.assert_close(sd.values, desc(pos, z, i, j), rtol=1e-12, atol=1e-12)
    element = torch.tensor([ELEMENTS.index(int(x)) for x in z])
    frame = torch.zeros(len(z), dtype=torch.long)
    xe, xf = frame_rows(sd.values, sd.grad, sd.nbr_j, sd.mask, frame, element, 1, 3)

    def energy_rows(p: torch.Tensor) -> torch.Tensor:
        d = desc(p, z, i, j)  # same pairs: no atom crosses the cutoff for a small step
        return torch.zeros(3, d.shape[1], dtype=torch.float64).index_add(0, element, d).reshape(1, -1)

    torch.testing.assert_close(energy_rows(pos), xe, rtol=1e-12, atol=1e-12)
    h = 1e-5
    for a, alpha in [(0, 0), (2, 1), (4, 2), (6, 0)]:
        step = torch.zeros_like(pos)
        step[a, alpha] = h
        fd = -(energy_rows(pos + step) - energy_rows(pos - step))[0] / (2 * h)
        torch.testing.assert_close(xf[3 * a + alpha], fd, rtol=1e-6, atol=1e-7)


def test_periodic_shifts_match_an_explicit_image() -> None:
    """Two atoms in a 4 Å cube, 3 Å cutoff: the periodic environment equals a cluster with the image atom."""
    desc = MomentInvariants([1, 8], BesselRadial(3, 3.0), element_channels="blind")
    cell = np.eye(3) * 4.0
    pos = np.array([[0.2, 0.1, 0.0], [3.3, 0.3, 0.2]])  # 0.9 Å apart through the x boundary
    i, j, s = neighbor_pairs(pos, 3.0, cell, np.array([True, True, True]))
    shifts = torch.from_numpy(s.astype(float) @ cell)
    z = torch.tensor([1, 8])
    d = desc(torch.tensor(pos), z, torch.from_numpy(i), torch.from_numpy(j), shifts)
    image = np.array([pos[0], pos[1] - [4.0, 0, 0]])
    di = desc(torch.tensor(image), z, *pairs(torch.tensor(image), 3.0))
    torch.testing.assert_close(d, di, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("l_max", "max_tensors"), [(1, 2), (2, 3), (2, 4), (3, 3)])
def test_lower_orders_have_exact_gradients(l_max, max_tensors) -> None:
    desc = MomentInvariants(ELEMENTS, BesselRadial(3, 3.0), l_max=l_max, max_tensors=max_tensors)
    pos, z = cluster(3)
    i, j = pairs(pos, 3.0)
    sd = desc.with_gradients(pos, z, i, j)
    weights = torch.randn(sd.values.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = pos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((desc(p, z, i, j) * weights).sum(), p)
    n, k = sd.values.shape[0], sd.grad.shape[1]
    per_slot = (sd.grad * weights[:, None, None, :]).sum(-1).reshape(n * k, 3)
    owner = torch.arange(n).repeat_interleave(k)
    mine = torch.zeros(n, 3, dtype=torch.float64).index_add(0, sd.nbr_j[sd.mask], per_slot[sd.mask])
    mine = mine.index_add(0, owner[sd.mask], per_slot[sd.mask], alpha=-1.0)
    torch.testing.assert_close(mine, grad, rtol=1e-10, atol=1e-12)
    # the contraction used for predictions gives the same per-slot gradient
    contracted = desc.with_jacobian(pos, z, i, j).contract(weights.unsqueeze(0))[0].reshape(n * k, 3)
    torch.testing.assert_close(contracted[sd.mask], per_slot[sd.mask], rtol=1e-10, atol=1e-12)
