"""Evaluating contraction invariants on the coordinates of their tensors, and their Jacobian.

Each symmetric traceless tensor of order l has 2l + 1 independent components; an orthonormal
basis of that subspace (of the flattened 3^l entries) maps coordinates x_l ∈ R^(2l+1) to the
tensor. Invariants are functions of the concatenated coordinates x ∈ R^D, D = Σ (2l + 1), and
functional independence at x is the rank of their Jacobian there (float64 autograd).
"""

from __future__ import annotations

from functools import cache

import torch

from polyfid.invariants.graphs import Contraction, TensorType
from polyfid.models.layers.tensors import cartesian_harmonics

DTYPE = torch.float64


@cache
def traceless_basis(order: int) -> torch.Tensor:
    """(3^l, 2l + 1): orthonormal basis of the symmetric traceless tensors of order l ≤ 3.

    The harmonic tensors Y^l(r̂) of many directions span that space; their leading left
    singular vectors are the basis.
    """
    if order == 0:
        return torch.ones(1, 1, dtype=DTYPE)
    # deterministic directions (a Fibonacci sphere): no random numbers under torch.func transforms
    k = torch.arange(64, dtype=DTYPE) + 0.5
    z, phi = 1 - 2 * k / 64, k * torch.pi * (3 - 5**0.5)
    u = torch.stack([(1 - z**2).sqrt() * phi.cos(), (1 - z**2).sqrt() * phi.sin(), z], dim=1)
    start = sum(3**k for k in range(order))
    y = cartesian_harmonics(u, order)[:, start:start + 3**order]
    left, _, _ = torch.linalg.svd(y.T, full_matrices=False)
    return left[:, :2 * order + 1].contiguous()


def n_coordinates(types: list[TensorType]) -> int:
    return sum(2 * t.order + 1 for t in types)


def tensors_from_coordinates(x: torch.Tensor, types: list[TensorType]) -> list[torch.Tensor]:
    """x: (D,) -> one tensor of shape (3,)*l per type."""
    out, start = [], 0
    for t in types:
        k = 2 * t.order + 1
        full = traceless_basis(t.order).to(x) @ x[start:start + k]
        out.append(full.reshape((3,) * t.order) if t.order else full.reshape(()))
        start += k
    return out


def coordinates_from_tensors(tensors: list[torch.Tensor], types: list[TensorType]) -> torch.Tensor:
    """Inverse of `tensors_from_coordinates` (projects onto the symmetric traceless part)."""
    parts = [traceless_basis(t.order).to(tensors[0].dtype).T @ tensors[i].reshape(-1) for i, t in enumerate(types)]
    return torch.cat(parts)


def evaluate(contractions: list[Contraction], x: torch.Tensor, types: list[TensorType]) -> torch.Tensor:
    """(M,) values of the invariants at coordinates x (D,)."""
    tensors = tensors_from_coordinates(x, types)
    return torch.stack([torch.einsum(c.einsum(), *[tensors[t] for t in c.nodes]) for c in contractions])


def jacobian(contractions: list[Contraction], x: torch.Tensor, types: list[TensorType],
             zero_tol: float = 1e-9) -> torch.Tensor:
    """(M, D) Jacobian of the invariants at x, rows scaled to unit norm (rank is unchanged by
    row scaling, and invariants of different degree differ by orders of magnitude).

    A row whose norm is below zero_tol · max(1, |x|)^(k−1) (k factors) is rounding noise of a
    vanishing gradient (e.g. an invariant odd in a tensor that is zero at x) and is set to 0
    instead of being blown up to a unit vector.
    """
    x = x.to(DTYPE)
    jac = torch.func.jacfwd(lambda y: evaluate(contractions, y, types))(x)
    norm = jac.norm(dim=1, keepdim=True)
    scale = max(float(x.norm()), 1.0) ** torch.tensor([[c.n_tensors - 1.0] for c in contractions], dtype=DTYPE)
    return torch.where(norm > zero_tol * scale, jac / norm.clamp_min(1e-300), torch.zeros_like(jac))


def _generators() -> torch.Tensor:
    """(3, 3, 3): the infinitesimal rotations about x, y, z."""
    g = torch.zeros(3, 3, 3, dtype=DTYPE)
    for a, (i, j) in enumerate(((1, 2), (2, 0), (0, 1))):
        g[a, i, j], g[a, j, i] = -1.0, 1.0
    return g


def orbit_dimension(x: torch.Tensor, types: list[TensorType], tol: float = 1e-9) -> int:
    """Dimension of the rotation orbit through x: the rank of the three tangent vectors
    d/dθ (R(θ)·tensors) at θ = 0, each tensor index rotated."""
    tensors = tensors_from_coordinates(x.to(DTYPE), types)
    rows = []
    for gen in _generators():
        moved = []
        for t, tt in zip(tensors, types):
            d = torch.zeros_like(t)
            for slot in range(tt.order):  # rotate each index in turn
                d = d + torch.movedim(torch.tensordot(gen, t, dims=([1], [slot])), 0, slot)
            moved.append(d)
        rows.append(coordinates_from_tensors(moved, types))
    m = torch.stack(rows)
    s = torch.linalg.svdvals(m)
    scale = max(float(x.abs().max()), 1.0)
    return int((s > tol * scale).sum())
