"""Fidelity as a learned embedding: one network and one energy head for every level of
theory, the level entering as a learned vector appended to each atom's input features.

E_f = Σ_i [ e_f(Z_i) + σ_f · w · z_i(Z, R, ε_f) ], with ε_f the embedding of fidelity f and
e_f its own reference energies. Each fidelity asked for costs one pass of the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from polyfid.models.potential import PassPerHeadPotential


class FidelityEmbeddingPotential(PassPerHeadPotential):
    """A Potential whose representation sees [one-hot(Z), ε_f]; one shared readout.

    The representation must have been built for n_species + embedding_dim inputs.
    Energies are computed for `energy_heads` if given, else `heads` if given, else all.
    """

    def __init__(
        self, representation: nn.Module, species: Sequence[int], fidelities: Sequence[str], embedding_dim: int
    ) -> None:
        super().__init__(representation, species, fidelities)
        self.embedding_dim = int(embedding_dim)
        self.readout = nn.Linear(sum(representation.feature_sizes), 1)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)
        # small random start: distinct levels from the first step, still close to each other
        self.fidelity_embedding = nn.Parameter(0.1 * torch.randn(len(self.fidelities), self.embedding_dim))

    def _inputs(self, x: torch.Tensor, h: int) -> torch.Tensor:
        return torch.cat([x, self.fidelity_embedding[h].to(x.dtype).expand(x.shape[0], -1)], dim=1)

    def _head_row(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.readout.weight[0], self.readout.bias[0]

    def _passes(self, x: torch.Tensor, geom, heads: Sequence[int], explicit: bool) -> list:
        """One pass of the network per fidelity, its embedding in the input."""
        run = self.representation.forward_explicit if explicit else self.representation
        return [run(self._inputs(x, h), geom) for h in heads]
