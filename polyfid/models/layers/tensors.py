"""Cartesian tensors of pair directions and their rotation invariants (HIP-NN-TS, HIP-HOP-NN).

Y^0 = 1, Y^1 = r̂, Y^2 = r̂r̂ − I/3 (traceless, 5 dof), Y^3 = the symmetric traceless part of
r̂r̂r̂ (7 dof): T_ijk = r̂_i r̂_j r̂_k − (r̂_i δ_jk + r̂_j δ_ik + r̂_k δ_ij)/5. Stored flat per pair,
l = 0..l_max concatenated: widths 1, 3, 9, 27.
"""

from __future__ import annotations

import torch

WIDTHS = (1, 3, 9, 27)


def cartesian_harmonics(u: torch.Tensor, l_max: int) -> torch.Tensor:
    """u: (P, 3) unit vectors (or zeros in padded slots)  ->  (P, Σ_{l≤l_max} 3^l)."""
    cols = [torch.ones_like(u[:, :1])]
    if l_max >= 1:
        cols.append(u)
    if l_max >= 2:
        eye = torch.eye(3, dtype=u.dtype, device=u.device)
        uu = u[:, :, None] * u[:, None, :]
        # pad slots (u = 0) must stay 0 in every order: the −I/3 part is weighted by |u|²
        norm2 = (u * u).sum(1)[:, None, None]
        cols.append((uu - norm2 * eye / 3).reshape(-1, 9))
    if l_max >= 3:
        uuu = uu[:, :, :, None] * u[:, None, None, :]
        ud = (u[:, :, None, None] * eye[None, None, :, :]  # u_i δ_jk
              + u[:, None, :, None] * eye[None, :, None, :]  # u_j δ_ik
              + u[:, None, None, :] * eye[None, :, :, None])  # u_k δ_ij
        cols.append((uuu - norm2[..., None] * ud / 5).reshape(-1, 27))
    return torch.cat(cols, dim=1)


def split_orders(t: torch.Tensor, l_max: int) -> list[torch.Tensor]:
    """(N, Σ 3^l, A) -> [s (N, A), v (N, 3, A), Q (N, 3, 3, A), T (N, 3, 3, 3, A)] up to l_max."""
    out, start = [], 0
    for l_ in range(l_max + 1):
        w = WIDTHS[l_]
        out.append(t[:, start:start + w].reshape((t.shape[0],) + (3,) * l_ + (t.shape[-1],)))
        start += w
    out[0] = out[0].reshape(t.shape[0], t.shape[-1])
    return out


#: name -> (orders used, number of tensors in the product); DESIGN.md's 13 invariants for l ≤ 3
INVARIANTS: dict[str, tuple[tuple[int, ...], int]] = {
    "s": ((0,), 1), "v.v": ((1,), 2), "Q:Q": ((2,), 2), "T:T": ((3,), 2), "trQ3": ((2,), 3),
    "vQv": ((1, 2), 3), "TTQ": ((2, 3), 3), "vQQv": ((1, 2), 4), "Tvvv": ((1, 3), 4), "vTTv": ((1, 3), 4),
    "b:b": ((3,), 4), "b:QQ": ((2, 3), 4), "e.e": ((2, 3), 4),
}


#: the same invariants in index notation (polyfid.invariants.parse_contraction reads it)
INDEX_NOTATION: dict[str, str] = {
    "s": "s", "v.v": "v_a v_a", "Q:Q": "Q_ab Q_ab", "T:T": "T_abc T_abc", "trQ3": "Q_ab Q_bc Q_ca",
    "vQv": "v_a Q_ab v_b", "TTQ": "T_abc T_abd Q_cd", "vQQv": "v_a Q_ab Q_bc v_c", "Tvvv": "T_abc v_a v_b v_c",
    "vTTv": "v_a T_abc T_dbc v_d", "b:b": "T_abc T_abd T_efc T_efd", "b:QQ": "T_abc T_abd Q_ce Q_ed",
    "e.e": "T_abc Q_ab T_dec Q_de",
}


def invariant_names(l_max: int, max_tensors: int) -> list[str]:
    """The invariants whose tensors all have order ≤ l_max and that multiply ≤ max_tensors."""
    return [k for k, (orders, n) in INVARIANTS.items() if max(orders) <= l_max and n <= max_tensors]


def invariants(tensors: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """Per channel a: the named invariants of s, v, Q, T (as from `split_orders`; a tensor no name
    uses may be None)  ->  (N, len(names), A).

    Written as broadcast products and sums over the 3-wide index axes, with the channel axis
    last: einsum would route these through bmm over N·A tiny matrices, many times slower on CPU
    (and again in the force and weight gradients). Q and T are symmetric, which shortens
    vQQv = |Qv|² and vTTv = |T·v|².
    """
    s = tensors[0]
    v = tensors[1] if len(tensors) > 1 else None
    q = tensors[2] if len(tensors) > 2 else None
    t = tensors[3] if len(tensors) > 3 else None
    n = next(x for x in tensors if x is not None).shape[0]
    cache: dict[str, torch.Tensor] = {}

    def get(key, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    qv = lambda: get("qv", lambda: (q * v[:, None]).sum(2))  # (Qv)_i  # noqa: E731
    qq = lambda: get("qq", lambda: (q[:, :, :, None] * q[:, None]).sum(2))  # (QQ)_ik  # noqa: E731
    t9 = lambda: get("t9", lambda: t.reshape(n, 9, 3, -1))  # T_(ij)k  # noqa: E731
    b = lambda: get("b", lambda: (t9()[:, :, :, None] * t9()[:, :, None]).sum(1))  # b_kl = T_ijk T_ijl  # noqa: E731
    tv = lambda: get("tv", lambda: (t * v[:, None, None]).sum(3))  # (T·v)_ij  # noqa: E731

    def e():  # e_k = T_ijk Q_ij
        return (t9() * q.reshape(n, 9, 1, -1)).sum(1)

    f = {
        "s": lambda: s,
        "v.v": lambda: v.square().sum(1),
        "Q:Q": lambda: q.square().sum((1, 2)),
        "T:T": lambda: t.square().sum((1, 2, 3)),
        "trQ3": lambda: (qq() * q).sum((1, 2)),
        "vQv": lambda: (v * qv()).sum(1),
        "TTQ": lambda: (b() * q).sum((1, 2)),
        "vQQv": lambda: qv().square().sum(1),
        "Tvvv": lambda: ((tv() * v[:, None]).sum(2) * v).sum(1),
        "vTTv": lambda: tv().square().sum((1, 2)),
        "b:b": lambda: b().square().sum((1, 2)),
        "b:QQ": lambda: (b() * qq()).sum((1, 2)),
        "e.e": lambda: e().square().sum(1),
    }
    return torch.stack([f[k]() for k in names], dim=1)
