"""Pair geometry handed from the Potential to every representation."""

from __future__ import annotations

from typing import NamedTuple

import torch


def _blas_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself if BLAS takes it as is (contiguous, or a transposed contiguous batch)."""
    if t.is_contiguous() or t.transpose(1, 2).is_contiguous():
        return t
    return t.contiguous()


class _ContiguousBMM(torch.autograd.Function):
    """Batched matmul that never hands the CPU kernel a stride-0 (expanded) operand.

    Autograd's bmm backward passes expanded gradients, for which the CPU kernel falls back
    to a loop ~10x slower; transposed views are fine and are not copied. The backward is
    built from this same function, so second derivatives (force training) stay fast.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.bmm(_blas_ready(a), _blas_ready(b))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b = ctx.saved_tensors
        ga = bmm(g, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        gb = bmm(a.transpose(1, 2), g) if ctx.needs_input_grad[1] else None
        return ga, gb


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n, k) @ (B, k, m) -> (B, n, m), fast for any strides, twice differentiable."""
    return _ContiguousBMM.apply(a, b)


class PairGeometry(NamedTuple):
    """Directed pairs (i, j) of a batch of N atoms.

    pair_i, pair_j: (P,); vec: (P, 3) r_j − r_i in Å (with periodic shifts); r: (P,) Å;
    slot: (P,) place of each pair in the padded (N, K) neighbour layout; nbr_j: (N·K,)
    j of each slot (0 where padded: pad slots always carry zero weight); K = max_neighbors.
    """

    pair_i: torch.Tensor
    pair_j: torch.Tensor
    vec: torch.Tensor
    r: torch.Tensor
    slot: torch.Tensor
    nbr_j: torch.Tensor
    max_neighbors: int

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Scatter per-pair values (P, ...) into the padded layout (N, K, ...), zeros elsewhere."""
        n = self.nbr_j.shape[0]
        out = x.new_zeros((n,) + x.shape[1:]).index_copy(0, self.slot, x)
        return out.view((n // self.max_neighbors, self.max_neighbors) + x.shape[1:])

    def neighbor_sum(self, weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """env[i, ν, b] = Σ_j weights[(i,j), ν] · features[j, b] as one bmm.

        weights: (P, n_w); features: (N, n_f)  ->  (N, n_w, n_f).
        """
        w = self.pad(weights)  # (N, K, n_w)
        f = features.index_select(0, self.nbr_j).view(w.shape[0], self.max_neighbors, features.shape[1])
        return bmm(w.transpose(1, 2), f)
