"""Cartesian tensor building blocks of HIP-NN-TS and HIP-HOP-NN: symmetry, tracelessness,
rotation equivariance of the tensors, invariance and functional independence of the invariants."""

from __future__ import annotations

import pytest
import torch

from polyfid.models.layers.tensors import cartesian_harmonics, invariant_names, invariants, split_orders


@pytest.fixture(autouse=True)
def float64():
    """float64 in this module only (the default dtype is global state)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.det(q))


def unit(n: int, seed: int = 0) -> torch.Tensor:
    u = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    return u / u.norm(dim=1, keepdim=True)


def test_harmonics_are_symmetric_traceless_and_equivariant() -> None:
    u = unit(5)
    y = cartesian_harmonics(u, 3)
    assert y.shape == (5, 40)
    s, v, q, t = split_orders(y.unsqueeze(-1), 3)
    q, t = q[..., 0], t[..., 0]
    torch.testing.assert_close(q, q.transpose(1, 2))
    torch.testing.assert_close(torch.einsum("nii->n", q), torch.zeros(5), atol=1e-12, rtol=0)
    for perm in ((0, 2, 1, 3), (0, 3, 2, 1), (0, 1, 3, 2)):
        torch.testing.assert_close(t, t.permute(perm))
    for trace in ("niik->nk", "niki->nk", "nkii->nk"):
        torch.testing.assert_close(torch.einsum(trace, t), torch.zeros(5, 3), atol=1e-12, rtol=0)
    r = rotation(1)
    s2, v2, q2, t2 = (x[..., 0] for x in split_orders(cartesian_harmonics(u @ r.T, 3).unsqueeze(-1), 3))
    torch.testing.assert_close(v2, v[..., 0] @ r.T)
    torch.testing.assert_close(q2, torch.einsum("ia,jb,nab->nij", r, r, q))
    torch.testing.assert_close(t2, torch.einsum("ia,jb,kc,nabc->nijk", r, r, r, t))
    # padded slots (u = 0) carry nothing beyond order 0
    assert cartesian_harmonics(torch.zeros(2, 3), 3)[:, 1:].abs().max() == 0


def random_tensors(n: int, a: int, seed: int) -> list[torch.Tensor]:
    """Random s, v, Q, T per channel, T and Q symmetric traceless, built as sums of harmonics."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 7, a, generator=g)
    y = cartesian_harmonics(unit(n * 7, seed).view(-1, 3), 3).view(n, 7, 40)
    return split_orders(torch.einsum("nkm,nka->nma", y, w), 3)


def test_invariants_are_rotation_invariant() -> None:
    names = invariant_names(3, 4)
    assert len(names) == 13 and invariant_names(1, 4) == ["s", "v.v"] and len(invariant_names(3, 2)) == 4
    s, v, q, t = random_tensors(4, 3, 0)
    r = rotation(2)
    rot = [s, torch.einsum("ia,nab->nib", r, v), torch.einsum("ia,jb,nabc->nijc", r, r, q),
           torch.einsum("ia,jb,kc,nabcd->nijkd", r, r, r, t)]
    torch.testing.assert_close(invariants([s, v, q, t], names), invariants(rot, names))


def test_the_thirteen_invariants_are_functionally_independent() -> None:
    """Rank of the Jacobian with respect to the 16 degrees of freedom (1 + 3 + 5 + 7) at a
    random point is 16 − 3 (rotations) = 13: each invariant adds to the rank."""

    def tensors(p: torch.Tensor) -> list[torch.Tensor]:
        s, v = p[:1], p[1:4]
        a, b, c, d, e = p[4:9]
        q = torch.stack([torch.stack([a, b, c]), torch.stack([b, d, e]), torch.stack([c, e, -a - d])])
        basis = torch.zeros(10, 3, 3, 3)  # the 10 symmetric unit tensors
        idx = [(i, j, k) for i in range(3) for j in range(i, 3) for k in range(j, 3)]
        for m, (i, j, k) in enumerate(idx):
            for perm in {(i, j, k), (i, k, j), (j, i, k), (j, k, i), (k, i, j), (k, j, i)}:
                basis[(m, *perm)] = 1.0
        sym = torch.einsum("m,mijk->ijk", p[9:19], basis)
        tr = torch.einsum("iik->k", sym)
        eye = torch.eye(3)
        t = sym - (tr[None, None, :] * eye[:, :, None] + tr[None, :, None] * eye[:, None, :]
                   + tr[:, None, None] * eye[None, :, :]) / 5
        return [s.view(1, 1), v.view(1, 3, 1), q.view(1, 3, 3, 1), t.view(1, 3, 3, 3, 1)]

    names = invariant_names(3, 4)
    p = torch.randn(19, generator=torch.Generator().manual_seed(3))
    jac = torch.autograd.functional.jacobian(lambda x: invariants(tensors(x), names).view(-1), p)
    sv = torch.linalg.svdvals(jac)
    assert int((sv > 1e-8 * sv[0]).sum()) == 13
    for k in range(1, 13):  # every prefix is independent too: no invariant is redundant
        sub = torch.linalg.svdvals(jac[:k])
        assert int((sub > 1e-8 * sub[0]).sum()) == k
