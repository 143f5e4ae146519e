"""Pair geometry handed from the Potential to every representation."""

from __future__ import annotations

from typing import NamedTuple

import torch


def _is_col(t: torch.Tensor) -> bool:
    return t.transpose(1, 2).is_contiguous()


def _fast_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm with operand layouts the CPU BLAS handles fast.

    MKL's batched gemm of small matrices is 2-8x slower when the second operand is stored
    column-major (a transposed view) than when it is row-major, and ~10x slower on
    expanded (stride-0) operands. Either compute the transposed product, whose operands
    are then both row-major, or copy the smaller operand.
    """
    if not b.is_contiguous():
        if not _is_col(b):
            b = b.contiguous()
        elif _is_col(a):  # C = (Bᵀ Aᵀ)ᵀ with row-major Bᵀ, Aᵀ: no copy at all
            return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
        elif b.numel() <= a.numel():
            b = b.contiguous()
        else:
            return torch.bmm(b.transpose(1, 2), a.transpose(1, 2).contiguous()).transpose(1, 2)
    if not (a.is_contiguous() or _is_col(a)):
        a = a.contiguous()
    return torch.bmm(a, b)


class _BMM(torch.autograd.Function):
    """Batched matmul through `_fast_bmm`, twice differentiable: the backward is built
    from this same function, so second derivatives (force training) stay fast too."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _fast_bmm(a, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b = ctx.saved_tensors
        ga = bmm(g, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        gb = bmm(a.transpose(1, 2), g) if ctx.needs_input_grad[1] else None
        return ga, gb


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n, k) @ (B, k, m) -> (B, n, m), fast for any strides, twice differentiable.

    Small products (a molecule at a time) skip the layout care, whose Python overhead
    would cost more than it saves."""
    if a.shape[0] <= _SMALL_BATCH:
        return torch.bmm(a, b)
    return _BMM.apply(a, b)


_SMALL_BATCH = 64


class PairGeometry(NamedTuple):
    """Directed pairs (i, j) of a batch of N atoms.

    pair_i, pair_j: (P,); vec: (P, 3) r_j − r_i in Å (with periodic shifts); r: (P,) Å;
    slot: (P,) place of each pair in the padded (N, K) neighbour layout, or None when the
    pairs already are that layout (every atom has K neighbours, pairs in slot order);
    nbr_j: (N·K,) j of each slot (0 where padded: pad slots always carry zero weight);
    K = max_neighbors.
    """

    pair_i: torch.Tensor
    pair_j: torch.Tensor
    vec: torch.Tensor
    r: torch.Tensor
    slot: torch.Tensor | None
    nbr_j: torch.Tensor
    max_neighbors: int

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pair values (P, ...) in the flat padded layout (N·K, ...), zeros in pad slots."""
        if self.slot is None:
            return x
        return x.new_zeros((self.nbr_j.shape[0],) + x.shape[1:]).index_copy(0, self.slot, x)

    def directions(self) -> torch.Tensor:
        """Unit pair vectors r̂ (N·K, 3) in the flat padded layout, zeros in pad slots."""
        return self.pad(self.vec / self.r.unsqueeze(1))

    def neighbor_features(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, n_f) of the neighbour in each slot  ->  (N, K, n_f)."""
        k = self.max_neighbors
        return features.index_select(0, self.nbr_j).view(self.nbr_j.shape[0] // k, k, features.shape[1])

    def neighbor_sum(self, weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """env[i, b, ν] = Σ_j features[j, b] · weights[(i,j), ν] as one bmm.

        weights: (N·K, n_w) in the padded layout (see `pad`); features: (N, n_f)
        ->  (N, n_f, n_w). This order (features outer, weights inner) keeps the operands of
        the bmm and of its derivatives in layouts the CPU BLAS is fast with.
        """
        f = features if features.dim() == 3 else self.neighbor_features(features)
        return bmm(f.transpose(1, 2), weights.view(f.shape[0], f.shape[1], weights.shape[1]))

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `pad`: values of the real pairs (P, ...) from the padded layout."""
        return x if self.slot is None else x.index_select(0, self.slot)
