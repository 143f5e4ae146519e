"""Per-atom moment-tensor descriptors: the atomic base and its pruned rotation invariants.

The atomic base of atom i (an ACE-like "A basis" in Cartesian form) is, per channel c,

    A^l_ic = Σ_{j ≠ i, r_ij < r_c} R_ν(r_ij) · E_{e(j), m} · Y^l(r̂_ij),     c = m · n_radial + ν,

with Y^0 = 1, Y^1 = r̂, Y^2 = r̂r̂ − I/3, Y^3 = the symmetric traceless part of r̂r̂r̂
(`polyfid.models.layers.tensors.cartesian_harmonics`), R_ν the radial functions (each already
multiplied by a smooth cutoff) and E the neighbour-element embedding: E = identity (the
`atomic_base` default) gives one channel block per neighbour element; extra columns (all ones,
ones on a pair of elements: `element_embedding`) add blocks whose invariants couple neighbours
of different elements. Writing s, v, Q, T for
l = 0..3, `MomentInvariants` takes per channel the invariants of DESIGN.md ("Networks",
HIP-HOP-NN): at l_max = 3 and up to 4 tensors per product, the 13 functionally independent ones
(`invariant_names(3, 4)`: s; v·v; Q:Q; T:T; tr Q³; vQv; TTQ; vQQv; Tvvv; vTTv; b:b; b:QQ; e·e),
the "pruned invariant set" of DESIGN.md's descriptor pruning. Everything is a torch function of
the positions (float64 welcome): descriptors, their derivatives and forces come by autograd or
torch.func; no Python loop runs over atoms or pairs. For linear fits, which need the derivative
of every descriptor, `MomentInvariants.with_jacobian` gives them in closed form
(`invariants_and_jacobian`), several times faster than forward-mode autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from polyfid.errors import DataError
from polyfid.models.layers.tensors import (
    INVARIANTS,
    cartesian_harmonics,
    invariant_names,
    invariants,
    split_orders,
)

#: a radial basis: distances r (P,) in Å  ->  (P, n_radial), zero (with zero slope) at the cutoff
Radial = Callable[[torch.Tensor], torch.Tensor]


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """φ(r) = cos²(π r / 2 r_c) for r < r_c, else 0 (value and slope vanish at r_c); r in Å."""
    phi = torch.cos((0.5 * math.pi / cutoff) * r).square()
    return torch.where(r < cutoff, phi, torch.zeros_like(phi))


class InverseGaussianRadial:
    """HIP-NN's sensitivities with fixed centres: R_ν(r) = exp(−(1/r − 1/μ_ν)² / 2σ²) · cos²(πr/2r_c).

    n: number of functions; 1/μ spread evenly between 1/soft_max and 1/soft_min (Å);
    1/σ = 2·n·soft_min (Å), as hippynn initialises it; cutoff r_c in Å.
    Call: r (P,) Å  ->  (P, n).
    """

    def __init__(self, n: int = 8, soft_min: float = 0.85, soft_max: float = 4.5, cutoff: float = 5.0) -> None:
        self.n, self.soft_min, self.soft_max, self.cutoff = int(n), float(soft_min), float(soft_max), float(cutoff)
        self.inv_mu = torch.linspace(1.0 / soft_max, 1.0 / soft_min, self.n, dtype=torch.float64)
        self.inv_sigma = 2.0 * self.n * soft_min

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        d = (r.reciprocal().unsqueeze(1) - self.inv_mu.to(r)) * (self.inv_sigma * math.sqrt(0.5))
        return torch.exp(-d.square()) * cosine_cutoff(r, self.cutoff).unsqueeze(1)

    def __repr__(self) -> str:
        return (f"InverseGaussianRadial(n={self.n}, soft_min={self.soft_min}, soft_max={self.soft_max}, "
                f"cutoff={self.cutoff})")


class BesselRadial:
    """R_ν(r) = sin(ν π r / r_c) / r · cos²(π r / 2 r_c), ν = 1..n (Å⁻¹); call: r (P,) Å -> (P, n)."""

    def __init__(self, n: int = 8, cutoff: float = 5.0) -> None:
        self.n, self.cutoff = int(n), float(cutoff)
        self.freq = torch.arange(1, self.n + 1, dtype=torch.float64) * (math.pi / self.cutoff)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        rr = r.unsqueeze(1)
        return torch.sin(self.freq.to(r) * rr) / rr * cosine_cutoff(r, self.cutoff).unsqueeze(1)

    def __repr__(self) -> str:
        return f"BesselRadial(n={self.n}, cutoff={self.cutoff})"


def element_index(species: torch.Tensor, elements: Sequence[int]) -> torch.Tensor:
    """Index of each atomic number of `species` (N,) in `elements`; ValueError for one not listed."""
    table = torch.full((119,), -1, dtype=torch.long, device=species.device)
    table[torch.as_tensor(list(elements), dtype=torch.long, device=species.device)] = torch.arange(
        len(elements), device=species.device)
    idx = table.index_select(0, species.long())
    if idx.numel() and int(idx.min()) < 0:
        raise DataError(f"atomic numbers {sorted(set(species[idx < 0].tolist()))} are not in elements "
                         f"{list(elements)}")
    return idx


def _padded_slots(pair_i: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, int]:
    """Slot of each pair in a padded (n_atoms, K) neighbour layout (pairs grouped by i, stable
    order) and K = the largest neighbour count."""
    counts = torch.bincount(pair_i, minlength=n_atoms)
    k = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort(pair_i, stable=True)
    start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(len(pair_i), device=pair_i.device) - start.index_select(0, pair_i[order])
    rank = torch.empty_like(rank_sorted).index_copy_(0, order, rank_sorted)
    return pair_i * k + rank, k


class _PairTerms(NamedTuple):
    """What `_base` computes: the flat base and, on request, the per-slot pieces of its derivative."""

    flat: torch.Tensor  # (N, W, K) the base, orders l = 0..l_max flattened (widths 1, 3, 9, 27)
    k: int  # slots per atom in the padded layout
    slot: torch.Tensor  # (P,) slot of each pair
    y: torch.Tensor | None = None  # (N, k, W) harmonics per slot (0 in pad slots)
    dy: torch.Tensor | None = None  # (N, k, W, 3) ∂Y/∂vec
    chan: torch.Tensor | None = None  # (N, k, K) radial × element weights
    dchan: torch.Tensor | None = None  # (N, k, K) ∂(radial × element)/∂r
    unit: torch.Tensor | None = None  # (N, k, 3) r̂


def _base(positions, species, pair_i, pair_j, radial, elements, l_max, shifts, embedding,
          derivatives: bool = False) -> _PairTerms:
    if not 0 <= l_max <= 3:
        raise ValueError(f"l_max must be 0..3, got {l_max}")
    n_atoms = positions.shape[0]
    vec = positions.index_select(0, pair_j) - positions.index_select(0, pair_i)
    if shifts is not None:
        vec = vec + shifts.to(vec)
    r = vec.norm(dim=1)
    unit = vec / r.unsqueeze(1)
    y = cartesian_harmonics(unit, l_max)  # (P, W)
    if embedding is None:
        embedding = torch.eye(len(elements), dtype=positions.dtype, device=positions.device)
    emb = embedding.to(positions).index_select(0, element_index(species, elements).index_select(0, pair_j))
    if derivatives:
        rad, drad = torch.func.jvp(radial, (r,), (torch.ones_like(r),))
    else:
        rad, drad = radial(r), None
    n_pairs = len(r)
    chan = (emb.unsqueeze(2) * rad.unsqueeze(1)).reshape(n_pairs, -1)  # (P, K), c = m·n_radial + ν
    n_chan = chan.shape[1]
    slot, k = _padded_slots(pair_i, n_atoms)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((n_atoms * k,) + x.shape[1:]).index_copy(0, slot, x).view((n_atoms, k) + x.shape[1:])

    y_pad, c_pad = pad(y), pad(chan)
    flat = torch.bmm(y_pad.transpose(1, 2), c_pad)  # (N, W, K)
    if not derivatives:
        return _PairTerms(flat, k, slot)

    def harmonics_of(v: torch.Tensor) -> torch.Tensor:
        return cartesian_harmonics((v / v.norm()).unsqueeze(0), l_max)[0]

    dy = torch.func.vmap(torch.func.jacfwd(harmonics_of))(vec)  # (P, W, 3)
    dchan = (emb.unsqueeze(2) * drad.unsqueeze(1)).reshape(n_pairs, n_chan)
    return _PairTerms(flat, k, slot, y_pad, pad(dy), c_pad, pad(dchan), pad(unit))


def atomic_base(
    positions: torch.Tensor,
    species: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    radial: Radial,
    elements: Sequence[int],
    l_max: int = 3,
    shifts: torch.Tensor | None = None,
    embedding: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The atomic base A^l_ic of every atom, l = 0..l_max (module docstring), per channel c.

    Args:
        positions: (N, 3) Å; may carry autograd graphs or torch.func tangents.
        species: (N,) atomic numbers (int).
        pair_i, pair_j: (P,) int64 directed pairs within the radial cutoff, both directions
            (e.g. `polyfid.neighbors.neighbor_pairs`); no self pairs (r = 0).
        radial: r (P,) Å -> (P, n_radial), e.g. `InverseGaussianRadial` or `BesselRadial`.
        elements: the atomic numbers of the neighbour-element channels, in channel order.
        l_max: highest tensor order, 0..3.
        shifts: (P, 3) Cartesian periodic displacements (Å) added to r_j − r_i (shifts @ cell),
            or None for open boundaries.
        embedding: (len(elements), n_embed) weights of each neighbour element per channel block;
            default the identity (one block per element). Any float tensor, e.g. with a column
            of ones for element-blind channels.

    Returns:
        [s (N, K), v (N, 3, K), Q (N, 3, 3, K), T (N, 3, 3, 3, K)] up to l_max, the layout of
        `tensors.split_orders`, with K = n_embed · n_radial channels, c = m · n_radial + ν
        (m: embedding column, ν: radial function). Sums over neighbours use a padded
        (N, K_max) layout and one batched matmul, so no (P, Σ3^l, K) intermediate is built.
    """
    flat = _base(positions, species, pair_i, pair_j, radial, elements, l_max, shifts, embedding).flat
    return split_orders(flat, l_max)


def invariants_and_jacobian(flat: torch.Tensor, names: Sequence[str], l_max: int = 3,
                            jacobian: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The invariants `names` of `tensors.invariants` and their derivatives, in closed form.

    flat: (N, W, K) the atomic base with the orders flattened (W = Σ_{l≤l_max} 3^l components,
    row-major, as `atomic_base` builds them before splitting; Q and T symmetric) -> values
    (N, I, K) and jacobian (N, W, I, K) = ∂value/∂component (all components treated as
    independent; exact along symmetric directions, the only ones the base moves in), or None.
    Broadcast products and sums over the 3-wide axes with the channel axis last, as
    `tensors.invariants` does (no bmm over N·K tiny matrices), and no autograd.
    """
    n, w, kc = flat.shape
    s = flat[:, 0]
    v = flat[:, 1:4] if l_max >= 1 else None
    q = flat[:, 4:13].reshape(n, 3, 3, kc) if l_max >= 2 else None
    t = flat[:, 13:40].reshape(n, 3, 3, 3, kc) if l_max >= 3 else None
    cache: dict[str, torch.Tensor] = {}

    def get(key: str, fn):
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    def mv(m, x):  # Σ_j m_ij x_j
        return (m * x[:, None]).sum(2)

    def mtv(m, x):  # Σ_i m_ij x_i
        return (m * x[:, :, None]).sum(1)

    def mm(a, b):  # Σ_j a_ij b_jk
        return (a[:, :, :, None] * b[:, None]).sum(2)

    def outer(a, b):  # a_i b_j for vectors
        return a[:, :, None] * b[:, None]

    def t_last(m):  # Σ_l T_abl m_lc
        return (t[:, :, :, :, None] * m[:, None, None]).sum(3)

    qT = lambda: get("qT", lambda: q.transpose(1, 2))  # noqa: E731
    qv = lambda: get("qv", lambda: mv(q, v))  # noqa: E731
    qTv = lambda: get("qTv", lambda: mtv(q, v))  # noqa: E731
    qq = lambda: get("qq", lambda: mm(q, q))  # noqa: E731
    t9 = lambda: get("t9", lambda: t.reshape(n, 9, 3, kc))  # noqa: E731
    bm = lambda: get("b", lambda: (t9()[:, :, :, None] * t9()[:, :, None]).sum(1))  # noqa: E731  b_kl
    vv = lambda: get("vv", lambda: outer(v, v))  # noqa: E731

    values = flat.new_empty(n, len(names), kc)
    jac = flat.new_zeros(n, w, len(names), kc) if jacobian else None

    def put(i, gs=None, gv=None, gq=None, gt=None):
        if jac is None:
            return
        for g, lo, hi in ((gs, 0, 1), (gv, 1, 4), (gq, 4, 13), (gt, 13, 40)):
            if g is not None:
                jac[:, lo:hi, i] = g.reshape(n, hi - lo, kc) if hi - lo > 1 else g

    for i, name in enumerate(names):
        if name == "s":
            values[:, i] = s
            put(i, gs=1.0)
        elif name == "v.v":
            values[:, i] = v.square().sum(1)
            put(i, gv=2 * v)
        elif name == "Q:Q":
            values[:, i] = q.square().sum((1, 2))
            put(i, gq=2 * q)
        elif name == "T:T":
            values[:, i] = t.square().sum((1, 2, 3))
            put(i, gt=2 * t)
        elif name == "trQ3":
            values[:, i] = (qq() * qT()).sum((1, 2))
            put(i, gq=3 * qq().transpose(1, 2))
        elif name == "vQv":
            values[:, i] = (v * qv()).sum(1)
            put(i, gv=qv() + qTv(), gq=vv())
        elif name == "TTQ":
            values[:, i] = (bm() * q).sum((1, 2))
            put(i, gq=bm(), gt=t_last(q + qT()))
        elif name == "vQQv":
            p = qq()
            pv = mv(p, v)
            values[:, i] = (v * pv).sum(1)
            put(i, gv=pv + mtv(p, v), gq=outer(v, qv()) + outer(qTv(), v))
        elif name == "Tvvv":
            tv = (t * v[:, None, None]).sum(3)  # Σ_k T_ijk v_k
            term1 = mv(tv, v)  # Σ_jk T_ajk v_j v_k
            values[:, i] = (term1 * v).sum(1)
            if jac is not None:
                term2 = mtv(tv, v)  # Σ_ik T_iak v_i v_k
                term3 = (t9() * vv().reshape(n, 9, 1, kc)).sum(1)  # Σ_ij T_ija v_i v_j
                put(i, gv=term1 + term2 + term3, gt=vv()[:, :, :, None] * v[:, None, None])
        elif name == "vTTv":
            wv = (t * v[:, :, None, None]).sum(1)  # w_bc = Σ_a v_a T_abc
            values[:, i] = wv.square().sum((1, 2))
            put(i, gv=2 * (t * wv[:, None]).sum((2, 3)), gt=2 * v[:, :, None, None] * wv[:, None])
        elif name == "b:b":
            b = bm()
            values[:, i] = b.square().sum((1, 2))
            put(i, gt=2 * t_last(b + b.transpose(1, 2)))
        elif name == "b:QQ":
            b, p = bm(), qq()
            values[:, i] = (b * p).sum((1, 2))
            put(i, gt=t_last(p + p.transpose(1, 2)), gq=mm(b, qT()) + mm(qT(), b))
        elif name == "e.e":
            e = (t9() * q.reshape(n, 9, 1, kc)).sum(1)  # e_k = Σ_ij T_ijk Q_ij
            values[:, i] = e.square().sum(1)
            put(i, gt=2 * q[:, :, :, None] * e[:, None, None], gq=2 * (t * e[:, None, None]).sum(3))
        else:
            raise KeyError(f"unknown invariant {name!r}; known: {list(INVARIANTS)}")
    return values, jac


def normalise_invariants(inv: torch.Tensor, degrees: torch.Tensor, how: str = "smooth",
                         derivative: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Invariants (N, I, K) of the given degrees (I,) (tensors per product) rescaled to grow like
    one tensor: "smooth": f(x) = x / (1 + x²)^p with p = (k−1)/2k, linear near 0 and like
    sign(x)|x|^(1/k) far away, smooth everywhere (HIP-HOP-NN's choice); "none": unchanged (a
    polynomial basis). With derivative=True returns (f(x), f'(x))."""
    if how not in ("smooth", "none"):
        raise ValueError(f"normalisation {how!r}: expected 'smooth' or 'none'")
    if how == "none":
        return (inv, torch.ones_like(inv)) if derivative else inv
    p = ((degrees - 1) / (2 * degrees)).to(inv).view(1, -1, 1)
    x2 = inv.square()
    out = inv / (1 + x2).pow(p)
    if not derivative:
        return out
    return out, (1 + (1 - 2 * p) * x2) / (1 + x2).pow(p + 1)


class SlotDerivatives(NamedTuple):
    """Per-atom descriptors with their derivatives with respect to each pair vector.

    values: (N, D); grad: (N, k, 3, D) = ∂values_i / ∂vec_(i, slot), where vec = r_j − r_i
    (+ periodic shift) is the pair in slot (i, slot) of the padded (N, k) neighbour layout;
    nbr_j: (N·k,) the atom j of each slot (0 in pad slots); mask: (N·k,) bool, the real slots.
    The derivative of values_i with respect to r_a is Σ_slots grad_(i,slot) (δ_(a,j) − δ_(a,i)).
    """

    values: torch.Tensor
    grad: torch.Tensor
    nbr_j: torch.Tensor
    mask: torch.Tensor


def element_embedding(elements: Sequence[int], kind: str = "pairs") -> tuple[torch.Tensor, list[str]]:
    """Neighbour-element weights of the channel blocks (`atomic_base`'s embedding), float64
    (len(elements), n_blocks), and a label per block ("H", "C", "*" for all, "HC" for a pair);
    kind "single", "blind" or "pairs" (see `MomentInvariants`)."""
    if kind not in ("single", "blind", "pairs"):
        raise ValueError(f"element channels {kind!r}: expected 'single', 'blind' or 'pairs'")
    n_el = len(elements)
    symbols = [_symbol(int(z)) for z in elements]
    cols, labels = [torch.eye(n_el, dtype=torch.float64)], list(symbols)
    if kind in ("blind", "pairs") and n_el > 1:
        cols.append(torch.ones(n_el, 1, dtype=torch.float64))
        labels.append("*")
    if kind == "pairs" and n_el > 2:
        a, b = torch.triu_indices(n_el, n_el, offset=1)
        pair = torch.zeros(n_el, len(a), dtype=torch.float64)
        pair[a, torch.arange(len(a))] = 1.0
        pair[b, torch.arange(len(a))] = 1.0
        cols.append(pair)
        labels += [symbols[i] + symbols[j] for i, j in zip(a.tolist(), b.tolist())]
    return torch.cat(cols, dim=1), labels


class DescriptorJacobian(NamedTuple):
    """Descriptors with the factors of their derivatives (from `MomentInvariants.with_jacobian`).

    values: (N, D), D = I·K (invariant i, channel c at i·K + c); jac: (N, W, D) = ∂values/∂base
    component w (normalisation included); terms: the per-slot harmonics, radial weights and
    their derivatives; nbr_j, mask: (N·k,) as in `SlotDerivatives`.
    """

    values: torch.Tensor
    jac: torch.Tensor
    terms: _PairTerms
    nbr_j: torch.Tensor
    mask: torch.Tensor

    def slot_derivatives(self) -> SlotDerivatives:
        """∂values_i/∂vec of every slot, (N, k, 3, D): all columns (memory N·k·3·D)."""
        t, jac = self.terms, self.jac
        n, k, w = t.y.shape
        kc = t.chan.shape[2]
        n_inv = jac.shape[2] // kc
        # ∂A_(w,c)/∂vec_α of one slot: dY_wα · chan_c + Y_w · dchan_c · r̂_α
        g1 = torch.bmm(t.dy.transpose(2, 3).reshape(n, k * 3, w), jac).view(n, k, 3, n_inv, kc)
        g2 = torch.bmm(t.y, jac).view(n, k, 1, n_inv, kc)
        grad = g1.mul_(t.chan.view(n, k, 1, 1, kc))
        grad += g2 * (t.dchan.view(n, k, 1, 1, kc) * t.unit.view(n, k, 3, 1, 1))
        return SlotDerivatives(self.values, grad.view(n, k, 3, n_inv * kc), self.nbr_j, self.mask)

    def contract(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_d weights[m, i, d] · ∂values_i,d/∂vec for every slot, (M, N, k, 3), without forming
        the full (N, k, 3, D) derivative: the gradient of the energies E_m = Σ_i Σ_d
        weights[m, i, d] · values[i, d] (weights held fixed) with respect to each pair vector.
        weights: (M, N, D)."""
        t, jac = self.terms, self.jac
        n, k, w = t.y.shape
        kc = t.chan.shape[2]
        n_inv = jac.shape[2] // kc
        m = weights.shape[0]
        b = torch.einsum("nwic,mnic->mnwc", jac.view(n, w, n_inv, kc), weights.view(m, n, n_inv, kc))
        a1 = torch.einsum("nkc,mnwc->mnkw", t.chan, b)
        a2 = torch.einsum("nkc,mnwc->mnkw", t.dchan, b)
        g1 = torch.einsum("nkwa,mnkw->mnka", t.dy, a1)
        g2 = torch.einsum("nkw,mnkw->mnk", t.y, a2)
        return g1 + g2.unsqueeze(-1) * t.unit.unsqueeze(0)


class MomentInvariants:
    """Per-atom descriptors: per channel, the pruned set of Cartesian invariants of the atomic base.

    Args:
        elements: atomic numbers of the neighbour-element channels (all elements of the data).
        radial: the radial basis (default `BesselRadial(8, 5.0)`: broad, overlapping functions,
            which serve per-channel invariants far better than narrow Gaussians in 1/r).
        l_max, max_tensors: the invariants of `invariant_names(l_max, max_tensors)`; 3 and 4 give
            DESIGN.md's 13.
        normalise: "smooth" (x / (1 + x²)^((k−1)/2k) for an invariant of degree k) or "none".
        element_channels: which neighbour-element weightings make channel blocks (the columns
            of `embedding` in `atomic_base`): "single": one block per element; "blind": those
            and a block weighting every element by 1; "pairs" (default): those and one block
            per pair of elements (weights 1 on both), so that the per-channel angular
            invariants also couple neighbours of different elements (the C–C–O angle, the
            H–C–O angle, ...). S elements give S, S + 1 or S + 1 + S(S−1)/2 blocks.

    Call: (positions (N, 3) Å, species (N,), pair_i (P,), pair_j (P,), shifts (P, 3) Å or None)
    -> descriptors (N, n_descriptors), column d = invariant_index · K + channel (`names`);
    differentiable (autograd, torch.func). `with_gradients` gives the same values and their
    derivatives with respect to every pair vector in closed form, much faster than autograd
    when all of them are wanted (linear force fits).
    """

    def __init__(
        self,
        elements: Sequence[int],
        radial: Radial | None = None,
        l_max: int = 3,
        max_tensors: int = 4,
        normalise: str = "smooth",
        element_channels: str = "pairs",
    ) -> None:
        self.elements = [int(z) for z in elements]
        self.radial = radial if radial is not None else BesselRadial()
        self.cutoff = float(getattr(self.radial, "cutoff", 5.0))
        self.l_max, self.max_tensors, self.normalise = int(l_max), int(max_tensors), normalise
        self.invariant_names = invariant_names(self.l_max, self.max_tensors)
        self.degrees = torch.tensor([float(INVARIANTS[k][1]) for k in self.invariant_names], dtype=torch.float64)
        self.element_channels = element_channels
        self.embedding, labels = element_embedding(self.elements, element_channels)
        n_rad = int(self.radial(torch.tensor([1.0], dtype=torch.float64)).shape[1])
        self.channel_names = [f"{m}{nu}" for m in labels for nu in range(n_rad)]
        self.names = [f"{inv}[{c}]" for inv in self.invariant_names for c in self.channel_names]

    @property
    def n_descriptors(self) -> int:
        return len(self.names)

    def __call__(
        self,
        positions: torch.Tensor,
        species: torch.Tensor,
        pair_i: torch.Tensor,
        pair_j: torch.Tensor,
        shifts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = atomic_base(positions, species, pair_i, pair_j, self.radial, self.elements, self.l_max, shifts,
                            self.embedding)
        inv = invariants(parts, self.invariant_names)  # (N, I, K)
        return normalise_invariants(inv, self.degrees, self.normalise).flatten(1)

    def with_jacobian(
        self,
        positions: torch.Tensor,
        species: torch.Tensor,
        pair_i: torch.Tensor,
        pair_j: torch.Tensor,
        shifts: torch.Tensor | None = None,
    ) -> DescriptorJacobian:
        """Descriptors and the pieces of their derivatives (`DescriptorJacobian`): the closed-form
        Jacobian of the (normalised) invariants with respect to the atomic base, and the
        derivatives of the harmonics and radial functions of every neighbour slot. Inputs as
        for a call; no autograd."""
        with torch.no_grad():
            terms = _base(positions.detach(), species, pair_i, pair_j, self.radial, self.elements, self.l_max,
                          shifts, self.embedding, derivatives=True)
            n, k = positions.shape[0], terms.k
            w, kc = terms.flat.shape[1], terms.flat.shape[2]
            raw, jac = invariants_and_jacobian(terms.flat, self.invariant_names, self.l_max)
            values, slope = normalise_invariants(raw, self.degrees, self.normalise, derivative=True)
            jac = (jac * slope.unsqueeze(1)).view(n, w, values.shape[1] * kc)  # (N, W, I·K)
            nbr_j = pair_j.new_zeros(n * k).index_copy(0, terms.slot, pair_j)
            mask = torch.zeros(n * k, dtype=torch.bool, device=pair_j.device).index_fill(0, terms.slot, True)
        return DescriptorJacobian(values.flatten(1), jac, terms, nbr_j, mask)

    def with_gradients(
        self,
        positions: torch.Tensor,
        species: torch.Tensor,
        pair_i: torch.Tensor,
        pair_j: torch.Tensor,
        shifts: torch.Tensor | None = None,
    ) -> SlotDerivatives:
        """Descriptors (N, D) and ∂descriptor_i/∂vec for every pair vector of atom i (`SlotDerivatives`),
        in closed form (`with_jacobian`). Inputs as for a call; no autograd."""
        return self.with_jacobian(positions, species, pair_i, pair_j, shifts).slot_derivatives()

    def __repr__(self) -> str:
        return (f"MomentInvariants(elements={self.elements}, radial={self.radial!r}, l_max={self.l_max}, "
                f"max_tensors={self.max_tensors}, normalise={self.normalise!r}, "
                f"element_channels={self.element_channels!r}, n_descriptors={self.n_descriptors})")


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z]
