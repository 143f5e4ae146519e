"""HIP-HOP-NN's compact invariants: the same numbers as the Cartesian reference
(`tensors.invariants`) for every (l_max, max_tensors), written-out derivatives equal to
autograd's, and constants that stay exact across dtype changes."""

from __future__ import annotations

import pytest
import torch

from polyfid.models.layers.compact import (
    CompactHarmonics,
    CompactInvariants,
    harmonics_projection,
    traceless_basis,
)
from polyfid.models.layers.geometry import PairGeometry
from polyfid.models.layers.tensors import cartesian_harmonics, invariant_names, invariants, split_orders

CASES = [(l_max, n) for l_max in (1, 2, 3) for n in (2, 3, 4)]


def directions(n: int, seed: int) -> torch.Tensor:
    u = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm(dim=1, keepdim=True)


def environments(l_max: int, n_atoms: int = 4, k: int = 6, a: int = 3, seed: int = 0):
    """Cartesian tensors (N, M, A) of random environments and their compact form (W, N·A)."""
    u = directions(n_atoms * k, seed)
    w = torch.randn(n_atoms, k, a, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    full = torch.einsum("nkm,nka->nma", cartesian_harmonics(u, l_max).view(n_atoms, k, -1), w)
    yc = (cartesian_harmonics(u, l_max)[:, 1:] @ harmonics_projection(l_max)).view(n_atoms, k, -1)
    compact = torch.einsum("nkw,nka->wna", yc, w).reshape(yc.shape[2], -1)
    return full, compact


@pytest.mark.parametrize("order", [1, 2, 3])
def test_basis_is_orthonormal_symmetric_and_traceless(order: int) -> None:
    e = traceless_basis(order)
    flat = e.reshape(2 * order + 1, -1)
    torch.testing.assert_close(flat @ flat.t(), torch.eye(2 * order + 1, dtype=torch.float64))
    if order >= 2:
        torch.testing.assert_close(e, e.transpose(1, 2))
        assert torch.einsum("pii...->p...", e).abs().max() < 1e-12
    # it spans the harmonics of that order: projecting onto it loses nothing
    start = sum(3**l_ for l_ in range(order))
    y = cartesian_harmonics(directions(9, 3), order)[:, start:start + 3**order]
    torch.testing.assert_close((y @ flat.t()) @ flat, y)


@pytest.mark.parametrize("l_max,max_tensors", CASES)
def test_compact_invariants_equal_the_cartesian_ones(l_max: int, max_tensors: int) -> None:
    names = [k for k in invariant_names(l_max, max_tensors) if k != "s"]
    full, compact = environments(l_max)
    ref = invariants(split_orders(full, l_max), names)  # (N, I, A)
    got = CompactInvariants(l_max, names).double()(compact).view(len(names), 4, 3).transpose(0, 1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("l_max,max_tensors", CASES)
def test_written_out_derivative_equals_autograd(l_max: int, max_tensors: int) -> None:
    names = [k for k in invariant_names(l_max, max_tensors) if k != "s"]
    ci = CompactInvariants(l_max, names).double()
    _, x = environments(l_max, seed=5)
    x.requires_grad_(True)
    g = torch.randn(len(names), x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (expected,) = torch.autograd.grad((ci(x) * g).sum(), x)
    torch.testing.assert_close(ci.backward(ci.expand(x.detach()), g), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("l_max", [1, 2, 3])
def test_harmonics_gradient_equals_autograd_across_directions(l_max: int) -> None:
    """dE/dr̂ from `CompactHarmonics.gradient`, projected perpendicular to r̂ and divided by r,
    is dE/d(pair vector) as autograd finds it through r̂ = r/|r| (padded slots included)."""
    harm = CompactHarmonics(l_max).double()
    vec = directions(5, 7) * torch.tensor([[1.0], [1.5], [0.8], [2.0], [1.2]], dtype=torch.float64)
    vec.requires_grad_(True)
    nbr = torch.tensor([1, 0, 2, 0, 1, 0, 0, 0])  # 2 atoms × 4 slots, 5 real pairs in slots 0-2, 4-5
    slot = torch.tensor([0, 1, 2, 4, 5])
    geom = PairGeometry(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 0, 2, 0, 1]), vec, vec.norm(dim=1), slot,
                        nbr, 4)
    u, yc = harm(geom)
    weight = torch.randn(yc.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (expected,) = torch.autograd.grad((yc * weight).sum(), vec)
    g_u = geom.unpad(harm.gradient(u.detach(), weight.reshape(8, -1)))
    unit, r = (vec / vec.norm(dim=1, keepdim=True)).detach(), vec.norm(dim=1, keepdim=True).detach()
    got = (g_u - (g_u * unit).sum(1, keepdim=True) * unit) / r
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("l_max", [1, 2, 3])
def test_harmonics_equal_the_projected_cartesian_ones(l_max: int) -> None:
    """The monomial form of `CompactHarmonics` is the Cartesian harmonics in the traceless
    basis, and padded slots (r̂ = 0) stay zero."""
    harm = CompactHarmonics(l_max).double()
    vec = directions(5, 11) * 1.7
    geom = PairGeometry(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 0, 2, 0, 1]), vec, vec.norm(dim=1),
                        torch.tensor([0, 1, 2, 4, 5]), torch.tensor([1, 0, 2, 0, 1, 0, 0, 0]), 4)
    u, yc = harm(geom)
    expected = cartesian_harmonics(u, l_max)[:, 1:] @ harmonics_projection(l_max)
    torch.testing.assert_close(yc.reshape(8, -1), expected, rtol=1e-12, atol=1e-14)
    assert yc[0, 3].abs().max() == 0 and yc[1, 2:].abs().max() == 0
    assert yc.shape[-1] == sum(2 * l_ + 1 for l_ in range(1, l_max + 1))


def test_constants_stay_exact_through_float32() -> None:
    names = [k for k in invariant_names(3, 4) if k != "s"]
    exact = CompactInvariants(3, names).double()
    round_trip = CompactInvariants(3, names).float().double()
    _, x = environments(3)
    torch.testing.assert_close(round_trip(x), exact(x), rtol=1e-13, atol=0)
    harm, round_trip = CompactHarmonics(3).double(), CompactHarmonics(3).float().double()
    for name in ("coef", "dcoef"):
        assert torch.equal(getattr(round_trip, name), getattr(harm, name))
    # a device move keeps the model's dtype (no float64 constants in a float32 model)
    assert CompactHarmonics(3).to("cpu").coef.dtype == torch.float32


def test_rejects_invariants_above_l_max() -> None:
    with pytest.raises(ValueError, match="order above l_max"):
        CompactInvariants(2, ["T:T"])
