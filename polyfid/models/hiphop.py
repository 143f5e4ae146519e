"""HIP-HOP-NN: HIP-NN on an optimal set of Cartesian tensor invariants (up to 5-body per neuron).

The order-0 environment is HIP-NN's interaction term. On A_t = tensor_features channels
(default 32) the interaction builds T^l_ia = Σ_j (Σ_ν C_νa s_ν(r_ij)) (Σ_b W_ab z_jb) Y^l(r̂_ij)
for l = 1..l_max (≤ 3): DESIGN.md's V^ν_ab factorised as C_νa W_ab, which keeps the pair
messages A_t wide (see `InvariantInteraction.tensors`). Then the invariants of DESIGN.md that
use tensors of order ≤ l_max and at most `max_tensors` factors (13 at l_max = 3,
max_tensors = 4: complete and functionally independent at generic points). Each invariant of
degree k (k tensors multiplied) is normalised by x / (1 + x²)^((k−1)/2k), linear for small x
and growing like |x|^(1/k): every invariant then scales like one tensor, smoothly, without
batch statistics (which would break "energy of a batch = sum of its frames"). The invariants
are mixed linearly into the pre-activation; the block's residual wrapper adds the skip.
Forces by autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from polyfid.models.hipnn import HIPNN
from polyfid.models.hipnn_ts import TensorEnvironment
from polyfid.models.layers.geometry import PairGeometry
from polyfid.models.layers.tensors import INVARIANTS, invariant_names, invariants


class InvariantInteraction(TensorEnvironment):
    def __init__(self, n_in: int, n_out: int, n_sens: int, soft_min: float, soft_max: float, cutoff: float,
                 l_max: int = 3, max_tensors: int = 4, tensor_features: int | None = None) -> None:
        super().__init__(n_in, n_out, n_sens, soft_min, soft_max, cutoff, l_max)
        self.n_tensor = n_out if tensor_features is None else min(int(tensor_features), n_out)
        # s (l = 0) enters directly, as HIP-NN's environment term; the others are mixed in
        self.names = [k for k in invariant_names(l_max, max_tensors) if k != "s"]
        degree = torch.tensor([float(INVARIANTS[k][1]) for k in self.names])
        self.register_buffer("power", ((degree - 1) / (2 * degree)).view(1, -1, 1), persistent=False)
        self.mix = nn.Linear(len(self.names) * self.n_tensor, n_out, bias=False)
        nn.init.xavier_normal_(self.mix.weight)
        # tensor messages V^ν_ab = C_νa W_ab: a radial filter per channel times mixed features
        self.filter = nn.Linear(n_sens, self.n_tensor, bias=False)
        self.features = nn.Linear(n_in, self.n_tensor, bias=False)

    def tensors(self, z: torch.Tensor, geom: PairGeometry, s: torch.Tensor) -> list[torch.Tensor]:
        """[v, Q, T] up to l_max, (N, 3, ..., A_t): T^l_ia = Σ_j (Σ_ν C_νa s_ν(r_ij)) (Σ_b W_ab z_jb) Y^l(r̂_ij).

        The full V^ν_ab of HIP-NN-TS would need an (N·K, n_sens, A_t) message per pair and its
        second derivatives, which dominate the cost on molecules with many neighbours (aspirin);
        the factorised message is one (N·K, n_sens) × (n_sens, A_t) matmul and one gather.
        """
        n, k = z.shape[0], geom.max_neighbors
        h = self.filter(s).view(n, k, -1) * geom.neighbor_features(self.features(z))  # (N, K, A_t)
        return self.moments(geom, h)

    def forward(self, z: torch.Tensor, geom: PairGeometry, inv_r: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        s = self.sensitivity(inv_r, cut)
        parts = self.tensors(z, geom, s)
        inv = invariants([None] + parts, self.names)  # (N, I, A_t)
        inv = inv / (1 + inv.square()).pow(self.power)
        return self.scalar_term(z, geom, s) + self.mix(inv.flatten(1))


class HIPHOPNN(HIPNN):
    """HIP-HOP-NN representation: HIP-NN's options plus l_max (1..3), max_tensors (1..4) and
    tensor_features (channels that carry tensors of order ≥ 1, at most n_features; default 32,
    None: all)."""

    def __init__(self, n_species: int, l_max: int = 3, max_tensors: int = 4, tensor_features: int | None = 32,
                 **hipnn_options) -> None:
        self.l_max, self.max_tensors = int(l_max), int(max_tensors)
        self.tensor_features = None if tensor_features is None else int(tensor_features)
        super().__init__(n_species, **hipnn_options)

    def make_interaction(self, n_in, n_out, n_sens, soft_min, soft_max, cutoff) -> nn.Module:
        return InvariantInteraction(n_in, n_out, n_sens, soft_min, soft_max, cutoff, self.l_max, self.max_tensors,
                                    self.tensor_features)

    @property
    def has_explicit_gradient(self) -> bool:
        return False  # forces by autograd
