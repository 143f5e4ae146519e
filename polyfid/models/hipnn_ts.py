"""HIP-NN-TS: HIP-NN with tensor sensitivities (Chigaev et al., J. Chem. Phys. 158, 184108, 2023).

The interaction pre-activation of channel a gains the norms of the vector and quadrupole
environments built with the same weights V:
  c¹_a (‖Σ_{j,ν,b} V^ν_ab s_ν(r_ij) r̂_ij z_jb‖_ε) + c²_a (‖Σ_{j,ν,b} V^ν_ab s_ν(r_ij) (r̂r̂ − I/3)_ij z_jb‖_ε),
with ‖x‖_ε = sqrt(|x|² + ε) − sqrt(ε), smooth at zero. Forces by autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from polyfid.models.hipnn import HIPNN, Interaction
from polyfid.models.layers.geometry import PairGeometry, bmm
from polyfid.models.layers.tensors import cartesian_harmonics, split_orders


class TensorEnvironment(Interaction):
    """Interaction whose environment also carries Cartesian tensors of order 1..l_max:
    `tensors` gives T^l_ia = Σ_j Σ_{ν,b} V^ν_ab s_ν(r_ij) Y^l(r̂_ij) z_jb, (N, Σ 3^l, n_out)."""

    def __init__(self, n_in: int, n_out: int, n_sens: int, soft_min: float, soft_max: float, cutoff: float,
                 l_max: int) -> None:
        super().__init__(n_in, n_out, n_sens, soft_min, soft_max, cutoff)
        if not 1 <= l_max <= 3:
            raise ValueError(f"l_max must be 1, 2 or 3, not {l_max}")
        self.l_max = l_max

    def tensors(self, z: torch.Tensor, geom: PairGeometry, s: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """[v (N, 3, A), Q (N, 3, 3, A), T (N, 3, 3, 3, A)] up to l_max, A = n_out; s: (N·K, n_sens)
        sensitivities and y: (N, K, Σ_{1≤l≤l_max} 3^l) harmonics (`HIPNNTS.shared_pair_terms`),
        both in the padded layout."""
        # V first: m_jνa = Σ_b V^ν_ab z_jb per atom, then per pair Σ_ν s_ν m_jνa, then Σ_j Y^l:
        # far fewer operations than contracting an (N, n_in, n_sens, 3^l) environment with V.
        # The (N·K, n_sens, A) pair messages and their second derivatives dominate the cost
        # (HIP-HOP-NN factorises V instead); the order-0 term goes HIP-NN's way (`scalar_term`).
        n, k = z.shape[0], geom.max_neighbors
        msg = (z @ self.weight.view(self.n_in, -1)).view(n, self.n_sens * self.n_out)
        h = bmm(s.unsqueeze(1), geom.neighbor_features(msg).view(n * k, self.n_sens, self.n_out))  # (N·K, 1, A)
        return self.moments(h.view(n, k, self.n_out), y)

    def moments(self, h: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Σ_j h_ija Y^l(r̂_ij) for l = 1..l_max; h: (N, K, A) pair messages, y: (N, K, M − 1)
        harmonics, both in the padded layout."""
        n, k, a = h.shape
        higher = bmm(y.transpose(1, 2), h)  # (N, M − 1, A)
        return split_orders(torch.cat([higher.new_zeros(n, 1, a), higher], 1), self.l_max)[1:]

    def scalar_term(self, z: torch.Tensor, geom: PairGeometry, s: torch.Tensor) -> torch.Tensor:
        """HIP-NN's interaction: W z + B + Σ_{ν,b} V^ν_ab Σ_j s_ν z_jb, (N, n_out)."""
        return self.combine(z, geom.neighbor_sum(s, z))


def soft_norm(sq: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(sq + ε) − sqrt(ε): a norm from its square, smooth (finite gradient) at zero."""
    return (sq + eps).sqrt() - eps**0.5


class TensorSensitivityInteraction(TensorEnvironment):
    def __init__(self, n_in: int, n_out: int, n_sens: int, soft_min: float, soft_max: float, cutoff: float,
                 l_max: int = 2, eps: float = 1e-4) -> None:
        if l_max > 2:
            raise ValueError(f"hipnn_ts: l_max is 1 or 2 (tensor sensitivities of order 3 are hiphop's), not {l_max}")
        super().__init__(n_in, n_out, n_sens, soft_min, soft_max, cutoff, l_max)
        self.eps = eps
        self.coef = nn.Parameter(torch.full((self.l_max, n_out), 0.5))

    def forward(self, z: torch.Tensor, geom: PairGeometry, inv_r: torch.Tensor, cut: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        s = self.sensitivity(inv_r, cut)
        out = self.scalar_term(z, geom, s)
        for l_, part in enumerate(self.tensors(z, geom, s, y), start=1):
            sq = part.square().flatten(1, -2).sum(1)  # (N, A)
            out = out + self.coef[l_ - 1] * soft_norm(sq, self.eps)
        return out


class HIPNNTS(HIPNN):
    """HIP-NN-TS representation: HIP-NN's options plus l_max (1 or 2) tensor sensitivities."""

    def __init__(self, n_species: int, l_max: int = 2, tensor_eps: float = 1e-4, **hipnn_options) -> None:
        self.l_max, self.tensor_eps = int(l_max), float(tensor_eps)
        super().__init__(n_species, **hipnn_options)

    def make_interaction(self, n_in, n_out, n_sens, soft_min, soft_max, cutoff) -> nn.Module:
        return TensorSensitivityInteraction(n_in, n_out, n_sens, soft_min, soft_max, cutoff, self.l_max,
                                            self.tensor_eps)

    def shared_pair_terms(self, geom: PairGeometry) -> tuple[torch.Tensor, ...]:
        k = geom.max_neighbors
        y = cartesian_harmonics(geom.directions(), self.l_max)[:, 1:]  # once for all layers
        return (y.view(y.shape[0] // k, k, -1),)

    @property
    def has_explicit_gradient(self) -> bool:
        return False  # forces by autograd
