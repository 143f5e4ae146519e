"""HIP-HOP-NN's invariants in compact coordinates: each tensor order l in an orthonormal basis
of the symmetric traceless tensors (2l + 1 numbers instead of 3^l), every intermediate a
bilinear map written as one matrix product over all atoms and channels.

The 13 invariants of DESIGN.md (`tensors.INVARIANTS`) are each a dot product of two of
  v, q, t          the tensors of order 1, 2, 3 (3, 5, 7 coordinates; q·q = Q:Q, t·t = T:T)
  qq, b            (QQ)_ik, T_ijk T_ijl: symmetric, 6 coordinates (5 traceless, then along I/√3)
  vv, tv           v_i v_j (traceless part), T_ijk v_k: symmetric traceless, 5 coordinates
  qv, e            (Qv)_i, T_ijk Q_ij: vectors, 3 coordinates
and a bilinear z = f(x, y) is (x ⊗ y) C with C = f on pairs of basis tensors, projected onto
z's orthonormal basis, computed once in float64.
Full Cartesian products (tensors.invariants) would broadcast over 9 × 3 × 3 entries per
channel; here the largest product is 7 × 7, and the contractions are GEMMs over all rows
(atoms × channels) at once. `backward` is the same function's derivative written out, so that
training differentiates once (HIP-NN's explicit gradient) and inference needs no autograd.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from polyfid.models.layers.tensors import INVARIANTS, WIDTHS, cartesian_harmonics

#: invariant -> the two blocks whose coordinates it dots (over the narrower block's leading rows)
TERMS: dict[str, tuple[str, str]] = {
    "v.v": ("v", "v"), "Q:Q": ("q", "q"), "T:T": ("t", "t"), "trQ3": ("qq", "q"), "vQv": ("qv", "v"),
    "TTQ": ("b", "q"), "vQQv": ("qv", "qv"), "Tvvv": ("tv", "vv"), "vTTv": ("tv", "tv"), "b:b": ("b", "b"),
    "b:QQ": ("b", "qq"), "e.e": ("e", "e"),
}
#: bilinear intermediates: name -> (left block, right block, Cartesian formula on full tensors, the
#: space its coordinates are taken in: "vector" R³, "traceless" symmetric traceless matrices (5),
#: "symmetric" matrices (6: the traceless basis, then I/√3))
BILINEAR: dict[str, tuple[str, str, str, str]] = {
    "qq": ("q", "q", "pij,qjk->pqik", "symmetric"), "qv": ("q", "v", "pij,qj->pqi", "vector"),
    "vv": ("v", "v", "pi,qj->pqij", "traceless"), "b": ("t", "t", "pijk,qijl->pqkl", "symmetric"),
    "tv": ("t", "v", "pijk,qk->pqij", "traceless"), "e": ("t", "q", "pijk,qij->pqk", "vector"),
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
            # the buffer as fn left it gives dtype and device; the value comes from the original
            now = getattr(self, name)
            setattr(self, name, value.to(device=now.device, dtype=now.dtype))
        return self


#: exponent tuples (i ≤ j ≤ ...) of the monomials u_i u_j ... of degree 0..3
_MONOMIALS = [m for d in range(4) for m in itertools.combinations_with_replacement(range(3), d)]


def harmonics_projection(l_max: int) -> torch.Tensor:
    """(Σ_{1≤l≤l_max} 3^l, W) float64, block-diagonal over orders: `tensors.cartesian_harmonics`'
    columns after Y^0 times this are the compact harmonics (the basis of `traceless_basis`)."""
    width = sum(2 * l_ + 1 for l_ in range(1, l_max + 1))
    proj = torch.zeros(sum(WIDTHS[1:l_max + 1]), width, dtype=torch.float64)
    r = c = 0
    for l_ in range(1, l_max + 1):
        proj[r:r + WIDTHS[l_], c:c + 2 * l_ + 1] = traceless_basis(l_).reshape(2 * l_ + 1, -1).t()
        r, c = r + WIDTHS[l_], c + 2 * l_ + 1
    return proj


class CompactHarmonics(_Constants):
    """Cartesian harmonics Y^1..Y^l_max of pair directions in compact coordinates.

    forward(geom): r̂ (N·K, 3) and the compact harmonics (N, K, W), W = Σ_{1≤l≤l_max} (2l + 1),
    in the padded layout (padded slots: r̂ = 0, harmonics 0); `gradient(u, g)`: dE/dr̂ (N·K, 3)
    from dE/d(compact harmonics) (N·K, W), the exact gradient of the polynomial below (components
    along r̂ do not matter: the derivative of r̂ = r/|r| removes them).

    A traceless basis tensor E annihilates the trace terms of Y^l, so E : Y^l = E : r̂^⊗l, a
    linear map of the degree-l monomials of r̂: the harmonics are one GEMM on the 19 monomials
    of degree 1..3 instead of 3^l-entry tensors per pair, and their gradient another on the
    monomials of one degree less.
    """

    def __init__(self, l_max: int) -> None:
        super().__init__()
        if not 1 <= l_max <= 3:
            raise ValueError(f"l_max must be 1, 2 or 3, not {l_max}")
        self.l_max = l_max
        monos = [m for m in _MONOMIALS if len(m) <= l_max]
        for d in range(2, l_max + 1):  # monomial of degree d = one of degree d − 1 times a coordinate
            shorter = [m for m in monos if len(m) == d - 1]
            pairs = [(shorter.index(m[:-1]), m[-1]) for m in monos if len(m) == d]
            self.register_buffer(f"prev{d}", torch.tensor([a for a, _ in pairs]), persistent=False)
            self.register_buffer(f"coord{d}", torch.tensor([b for _, b in pairs]), persistent=False)
        # E : Y^l = E : u^⊗l = Σ_m u^m × (orderings of m) × E[m], E being symmetric
        width = sum(2 * l_ + 1 for l_ in range(1, l_max + 1))
        coef = torch.zeros(len(monos) - 1, width, dtype=torch.float64)
        c = 0
        for l_ in range(1, l_max + 1):
            basis = traceless_basis(l_)
            for i, m in enumerate(monos[1:]):
                if len(m) == l_:
                    orderings = math.factorial(l_) // math.prod(math.factorial(m.count(d)) for d in set(m))
                    coef[i, c:c + 2 * l_ + 1] = orderings * basis[(slice(None), *m)]
            c += 2 * l_ + 1
        u = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        target = cartesian_harmonics(u, l_max)[:, 1:] @ harmonics_projection(l_max)
        if (self.monomials(u.t(), l_max)[1:].t() @ coef - target).abs().max() > 1e-12:
            raise RuntimeError("compact harmonics are not E : u^⊗l")  # a guard on the identity above
        self._constant("coef", coef)  # (monomials of degree 1..l_max, W)
        # ∂(monomial m)/∂u_d = (power of u_d in m) × (m without one factor u_d), a monomial of
        # degree 0..l_max − 1: (3 · n_low, W) after the map
        low = [m for m in monos if len(m) < l_max]
        deriv = torch.zeros(3, len(low), len(monos) - 1, dtype=torch.float64)
        for i, m in enumerate(monos[1:]):
            for d in set(m):
                rest = list(m)
                rest.remove(d)
                deriv[d, low.index(tuple(rest)), i] = m.count(d)
        self._constant("dcoef", (deriv @ coef).reshape(3 * len(low), width))
        self.n_low = len(low)

    def monomials(self, u: torch.Tensor, degree: int) -> torch.Tensor:
        """u (3, P)  ->  the monomials of degree 0..degree (≤ l_max), (n, P), in `_MONOMIALS`
        order; coordinate-major, one row product per monomial."""
        rows = [torch.ones_like(u[:1]), u]
        for d in range(2, degree + 1):
            rows.append(rows[-1].index_select(0, getattr(self, f"prev{d}"))
                        * u.index_select(0, getattr(self, f"coord{d}")))
        return torch.cat(rows[: degree + 1], dim=0)

    def forward(self, geom) -> tuple[torch.Tensor, torch.Tensor]:
        k = geom.max_neighbors
        u = geom.directions()
        y = self.monomials(u.t(), self.l_max)[1:].t() @ self.coef.to(u.dtype)
        return u, y.view(u.shape[0] // k, k, -1)

    def gradient(self, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        low = self.monomials(u.t(), self.l_max - 1)  # (n_low, P)
        h = (self.dcoef.to(grad.dtype) @ grad.t()).view(3, self.n_low, -1)
        return (h * low[None]).sum(1).t()


def _output_bases() -> dict[str, torch.Tensor]:
    """Orthonormal bases (m, 3[, 3]) of the spaces the bilinear intermediates live in, float64."""
    eye = torch.eye(3, dtype=torch.float64)
    traceless = traceless_basis(2)
    return {"vector": eye, "traceless": traceless,
            "symmetric": torch.cat([traceless, (eye / math.sqrt(3.0))[None]])}


class CompactInvariants(_Constants):
    """The named invariants (names from `tensors.INVARIANTS`, "s" excluded) of tensors of
    order 1..l_max given in compact coordinates.

    `forward` maps compact tensors x (Σ (2l + 1), R) (the basis of `CompactHarmonics`) to invariants (I, R);
    `backward(z, g)`, z = expand(x), gives Σ_k g_k ∂inv_k/∂x (Σ (2l + 1), R). Coordinates come first and the
    R = atoms × channels columns last, so that every product runs over long contiguous rows.
    Every block is in an orthonormal basis, so each contraction is a plain dot product; a block
    is kept only in the subspace its partners can see (vv is dotted with the traceless T·v only,
    so its trace is dropped; the symmetric basis starts with the traceless one, so b · q reads
    b's first 5 rows).

    Cost (it is most of HIP-HOP-NN's training step, which also differentiates `backward`): the
    derivative of a bilinear z = C(x ⊗ y) goes through the small products y ⊗ g_z and x ⊗ g_z and
    one GEMM each (for x = y, one: C + Cᵀ), not through the w_x·w_y-row matrix C g_z; a dot
    product's derivative is read off the partner block's rows directly, without gathers.
    """

    def __init__(self, l_max: int, names: list[str]) -> None:
        super().__init__()
        if unknown := [k for k in names if k not in TERMS]:
            raise ValueError(f"no compact form for invariants {unknown}; known: {sorted(TERMS)}")
        if too_high := [k for k in names if max(INVARIANTS[k][0]) > l_max]:
            raise ValueError(f"invariants {too_high} need tensors of order above l_max = {l_max}")
        self.l_max, self.names = l_max, list(names)
        self.base = list(BASE[:l_max])
        self.widths = {b: 2 * l_ + 1 for l_, b in enumerate(self.base, start=1)}
        need = {b for k in self.names for b in TERMS[k]}
        by_block = dict(zip(BASE, [traceless_basis(l_) for l_ in range(1, l_max + 1)]))
        spaces = _output_bases()
        self.bilinear = [k for k in BILINEAR if k in need]
        for k in self.bilinear:
            a, b, formula, space = BILINEAR[k]
            cart = torch.einsum(formula, by_block[a], by_block[b])  # (w_a, w_b, 3[, 3])
            out = spaces[space].reshape(len(spaces[space]), -1)
            coef = cart.reshape(self.widths[a] * self.widths[b], -1) @ out.t()  # (w_a·w_b, m)
            self._constant(f"coef_{k}", coef)
            c3 = coef.view(self.widths[a], self.widths[b], -1)
            # ∂z_o/∂x_i = Σ_j C_ijo y_j: rows i, columns (j, o) against y ⊗ g_z; likewise for y
            if a == b:
                self._constant(f"grad_{k}", (c3 + c3.transpose(0, 1)).reshape(self.widths[a], -1))
            else:
                self._constant(f"grad_{k}_{a}", c3.reshape(self.widths[a], -1))
                self._constant(f"grad_{k}_{b}", c3.transpose(0, 1).reshape(self.widths[b], -1))
            self.widths[k] = out.shape[0]
        self.order = self.base + self.bilinear
        # each invariant dots the leading n rows of two blocks
        self.terms = [(*TERMS[k], min(self.widths[b] for b in TERMS[k])) for k in self.names]

    def expand(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (width, R)  ->  every block the invariants read, by name ((block width, R) each)."""
        out = dict(zip(self.base, x.split([self.widths[b] for b in self.base], dim=0)))
        for k in self.bilinear:
            a, b = BILINEAR[k][:2]
            outer = (out[a][:, None] * out[b][None]).reshape(-1, x.shape[1])
            out[k] = getattr(self, f"coef_{k}").to(x.dtype).t() @ outer
        return out

    def combine(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """The invariants (len(names), R) from `expand`'s blocks."""
        return torch.stack([(z[a][:n] * z[b][:n]).sum(0) for a, b, n in self.terms])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (width, R) compact tensors, one column per atom and channel  ->  (len(names), R)."""
        return self.combine(self.expand(x))

    def backward(self, z: dict[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """Σ_k grad_k ∂inv_k/∂x at z = expand(x) (kept from the forward pass); grad (len(names), R)
        ->  (width, R)."""
        g: dict[str, torch.Tensor] = {}

        def add(block: str, value: torch.Tensor) -> None:
            if value.shape[0] < self.widths[block]:  # b and qq dotted with q: their leading rows
                value = torch.cat([value, value.new_zeros(self.widths[block] - value.shape[0], value.shape[1])])
            g[block] = g[block] + value if block in g else value

        for (a, b, n), g_k in zip(self.terms, grad):
            if a == b:
                add(a, (2 * g_k) * z[a])
            else:
                add(a, g_k * z[b][:n])
                add(b, g_k * z[a][:n])
        for k in reversed(self.bilinear):  # intermediates depend on the base blocks only; every one is read
            a, b = BILINEAR[k][:2]
            g_k = g.pop(k)
            if a == b:
                add(a, getattr(self, f"grad_{k}") @ (z[a][:, None] * g_k[None]).reshape(-1, g_k.shape[1]))
            else:
                add(a, getattr(self, f"grad_{k}_{a}") @ (z[b][:, None] * g_k[None]).reshape(-1, g_k.shape[1]))
                add(b, getattr(self, f"grad_{k}_{b}") @ (z[a][:, None] * g_k[None]).reshape(-1, g_k.shape[1]))
        return torch.cat([g[b] if b in g else z[b].new_zeros(z[b].shape) for b in self.base], dim=0)
