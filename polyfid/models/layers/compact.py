"""HIP-HOP-NN's invariants in compact coordinates: each tensor order l in an orthonormal basis
of the symmetric traceless tensors (2l + 1 numbers instead of 3^l), every intermediate a
bilinear map written as one matrix product over all atoms and channels.

The 13 invariants of DESIGN.md (`tensors.INVARIANTS`) are each Σ A ⊙ B over two of
  v, q, t          the tensors of order 1, 2, 3 (3, 5, 7 coordinates; q·q = Q:Q, t·t = T:T)
  Qf               Q as its 9 Cartesian entries
  qq, qv, vv       (QQ)_ik, (Qv)_i, v_i v_j
  b, tv, e         T_ijk T_ijl, T_ijk v_k, T_ijk Q_ij
and a bilinear z = f(x, y) is (x ⊗ y) C with C = f on pairs of basis tensors, computed once.
Full Cartesian products (tensors.invariants) would broadcast over 9 × 3 × 3 entries per
channel; here the largest product is 7 × 7, and the contractions are GEMMs over all rows
(atoms × channels) at once. `backward` is the same function's derivative written out, so that
training differentiates once (HIP-NN's explicit gradient) and inference needs no autograd.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polyfid.models.layers.tensors import INVARIANTS, WIDTHS, cartesian_harmonics, harmonics_gradient

#: invariant -> the two blocks whose elementwise product it sums
TERMS: dict[str, tuple[str, str]] = {
    "v.v": ("v", "v"), "Q:Q": ("q", "q"), "T:T": ("t", "t"), "trQ3": ("qq", "Qf"), "vQv": ("qv", "v"),
    "TTQ": ("b", "Qf"), "vQQv": ("qv", "qv"), "Tvvv": ("tv", "vv"), "vTTv": ("tv", "tv"), "b:b": ("b", "b"),
    "b:QQ": ("b", "qq"), "e.e": ("e", "e"),
}
#: bilinear intermediates: name -> (left block, right block, Cartesian formula on full tensors)
BILINEAR: dict[str, tuple[str, str, str]] = {
    "qq": ("q", "q", "pij,qjk->pqik"), "qv": ("q", "v", "pij,qj->pqi"), "vv": ("v", "v", "pi,qj->pqij"),
    "b": ("t", "t", "pijk,qijl->pqkl"), "tv": ("t", "v", "pijk,qk->pqij"), "e": ("t", "q", "pijk,qij->pqk"),
}
BASE = ("v", "q", "t")  # order l = 1, 2, 3


def traceless_basis(order: int) -> torch.Tensor:
    """An orthonormal basis (2l + 1, 3, ..., 3) of the symmetric traceless tensors of order l,
    float64 (l = 1: the identity). Rows span the Cartesian harmonics Y^l of `tensors`."""
    if order == 1:
        return torch.eye(3, dtype=torch.float64)
    n = 64  # a Fibonacci sphere: fixed directions, so the basis is the same on every machine
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * k / n
    phi = math.pi * (3 - math.sqrt(5)) * k
    u = torch.stack([(1 - z**2).sqrt() * phi.cos(), (1 - z**2).sqrt() * phi.sin(), z], 1)
    start = sum(WIDTHS[:order])
    y = cartesian_harmonics(u, order)[:, start:start + WIDTHS[order]]
    basis = torch.linalg.svd(y, full_matrices=False).Vh[: 2 * order + 1]
    return basis.reshape((2 * order + 1,) + (3,) * order)


class _Constants(nn.Module):
    """A module with constant float buffers kept exact: every dtype or device change casts
    from the float64 originals, so that .double() after .float() is exact again."""

    def __init__(self) -> None:
        super().__init__()
        self._exact: dict[str, torch.Tensor] = {}

    def _constant(self, name: str, value: torch.Tensor) -> None:
        self._exact[name] = value
        self.register_buffer(name, value.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, value in self._exact.items():
            setattr(self, name, fn(value))
        return self


class CompactHarmonics(_Constants):
    """Cartesian harmonics Y^1..Y^l_max of pair directions in compact coordinates.

    forward(geom): r̂ (N·K, 3) and the compact harmonics (N, K, W), W = Σ_{1≤l≤l_max} (2l + 1),
    in the padded layout; `gradient(u, g)`: dE/dr̂ (N·K, 3) from dE/d(compact harmonics)
    (N·K, W), up to components along r̂ (which the derivative of r̂ = r/|r| removes).
    """

    def __init__(self, l_max: int) -> None:
        super().__init__()
        if not 1 <= l_max <= 3:
            raise ValueError(f"l_max must be 1, 2 or 3, not {l_max}")
        self.l_max = l_max
        bases = [traceless_basis(l_) for l_ in range(1, l_max + 1)]
        proj = torch.zeros(sum(WIDTHS[1:l_max + 1]), sum(2 * l_ + 1 for l_ in range(1, l_max + 1)),
                           dtype=torch.float64)
        r = c = 0
        for l_, e in enumerate(bases, start=1):  # block-diagonal over orders
            proj[r:r + WIDTHS[l_], c:c + 2 * l_ + 1] = e.reshape(2 * l_ + 1, -1).t()
            r, c = r + WIDTHS[l_], c + 2 * l_ + 1
        self._constant("proj", proj)

    def forward(self, geom) -> tuple[torch.Tensor, torch.Tensor]:
        k = geom.max_neighbors
        u = geom.pad(geom.vec / geom.r.unsqueeze(1))
        y = cartesian_harmonics(u, self.l_max)[:, 1:] @ self.proj.to(u.dtype)
        return u, y.view(u.shape[0] // k, k, -1)

    def gradient(self, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return harmonics_gradient(u, grad @ self.proj.to(grad.dtype).t(), self.l_max)


class CompactInvariants(_Constants):
    """The named invariants (names from `tensors.INVARIANTS`, "s" excluded) of tensors of
    order 1..l_max given in compact coordinates.

    `forward` maps compact tensors x (Σ (2l + 1), R) (the basis of `CompactHarmonics`) to invariants (I, R);
    `backward(x, g)` gives Σ_k g_k ∂inv_k/∂x (Σ (2l + 1), R). Coordinates come first and the
    R = atoms × channels columns last, so that every product runs over long contiguous rows.
    """

    def __init__(self, l_max: int, names: list[str]) -> None:
        super().__init__()
        if unknown := [k for k in names if k not in TERMS]:
            raise ValueError(f"no compact form for invariants {unknown}; known: {sorted(TERMS)}")
        if too_high := [k for k in names if max(INVARIANTS[k][0]) > l_max]:
            raise ValueError(f"invariants {too_high} need tensors of order above l_max = {l_max}")
        self.l_max, self.names = l_max, list(names)
        bases = [traceless_basis(l_) for l_ in range(1, l_max + 1)]
        self.base = list(BASE[:l_max])
        self.widths = {b: 2 * l_ + 1 for l_, b in enumerate(self.base, start=1)}
        need = {b for k in self.names for b in TERMS[k]}
        by_block = dict(zip(BASE, bases))
        self.bilinear = [k for k in BILINEAR if k in need]
        for k in self.bilinear:
            a, b, formula = BILINEAR[k]
            coef = torch.einsum(formula, by_block[a], by_block[b])
            self._constant(f"coef_{k}", coef.reshape(self.widths[a] * self.widths[b], -1))
            self.widths[k] = coef[0, 0].numel()
        self.with_qf = "Qf" in need
        if self.with_qf:
            self._constant("qf", bases[1].reshape(5, 9))
            self.widths["Qf"] = 9
        self.order = self.base + (["Qf"] if self.with_qf else []) + self.bilinear
        offset, start = 0, {}
        for k in self.order:
            start[k], offset = offset, offset + self.widths[k]
        left, right, which = [], [], []
        for i, k in enumerate(self.names):
            a, b = TERMS[k]
            left += range(start[a], start[a] + self.widths[a])
            right += range(start[b], start[b] + self.widths[b])
            which += [i] * self.widths[a]
        self.register_buffer("left", torch.tensor(left), persistent=False)
        self.register_buffer("right", torch.tensor(right), persistent=False)
        total = torch.zeros(len(left), len(self.names))
        total[torch.arange(len(left)), torch.tensor(which)] = 1.0
        self.register_buffer("total", total, persistent=False)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """x (width, R)  ->  every block the invariants read, stacked (Σ block widths, R), in `order`."""
        out = dict(zip(self.base, x.split([self.widths[b] for b in self.base], dim=0)))
        if self.with_qf:
            out["Qf"] = self.qf.to(x.dtype).t() @ out["q"]
        for k in self.bilinear:
            a, b, _ = BILINEAR[k]
            outer = (out[a][:, None] * out[b][None]).reshape(-1, x.shape[1])
            out[k] = getattr(self, f"coef_{k}").to(x.dtype).t() @ outer
        return torch.cat([out[k] for k in self.order], dim=0)

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        """The invariants (len(names), R) from `expand`'s blocks."""
        return self.total.to(z.dtype).t() @ (z.index_select(0, self.left) * z.index_select(0, self.right))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (width, R) compact tensors, one column per atom and channel  ->  (len(names), R)."""
        return self.combine(self.expand(x))

    def backward(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Σ_k grad_k ∂inv_k/∂x at z = expand(x) (kept from the forward pass); grad (len(names), R)
        ->  (width, R)."""
        g_term = self.total.to(z.dtype) @ grad
        g_z = torch.zeros_like(z).index_add(0, self.left, g_term * z.index_select(0, self.right))
        g_z = g_z.index_add(0, self.right, g_term * z.index_select(0, self.left))
        sizes = [self.widths[k] for k in self.order]
        blocks = dict(zip(self.order, z.split(sizes, dim=0)))
        g = dict(zip(self.order, g_z.split(sizes, dim=0)))
        for k in reversed(self.bilinear):  # intermediates depend on the base blocks only
            a, b, _ = BILINEAR[k]
            m = (getattr(self, f"coef_{k}").to(z.dtype) @ g[k]).view(self.widths[a], self.widths[b], -1)
            g[a] = g[a] + (m * blocks[b][None]).sum(1)
            g[b] = g[b] + (m * blocks[a][:, None]).sum(0)
        if self.with_qf:
            g["q"] = g["q"] + self.qf.to(z.dtype) @ g["Qf"]
        return torch.cat([g[b] for b in self.base], dim=0)
