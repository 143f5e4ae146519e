"""Fidelity as a learned embedding: one network and one energy head for every level of
theory, the level entering as a learned vector appended to each atom's input features.

E_f = Σ_i [ e_f(Z_i) + σ_f · w · z_i(Z, R, ε_f) ], with ε_f the embedding of fidelity f and
e_f its own reference energies. Each fidelity asked for costs one pass of the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from polyfid.data.batch import Batch
from polyfid.models.potential import Potential


class FidelityEmbeddingPotential(Potential):
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

    def _head_energy(self, feats: list[torch.Tensor], idx: torch.Tensor, batch: Batch, h: int) -> torch.Tensor:
        e_atom = (self.readout(torch.cat(feats, dim=1)).squeeze(1) * self.energy_scale[h]).double()
        e_atom = e_atom + self.atom_ref[:, h].index_select(0, idx)
        if batch.n_frames == 1:
            return e_atom.sum().reshape(1)
        return e_atom.new_zeros(batch.n_frames).index_add_(0, batch.frame, e_atom)

    def _energies(self, idx, x, geom, batch) -> torch.Tensor:
        """Energies (B, H) of every fidelity, one network pass each (the autograd path)."""
        out: list[torch.Tensor | None] = [None] * len(self.fidelities)
        for h in range(len(self.fidelities)):
            out[h] = self._head_energy(self.representation(self._inputs(x, h), geom), idx, batch, h)
        return torch.stack(out, dim=1)

    def forward(
        self,
        batch: Batch,
        forces: bool = True,
        stress: bool = False,
        create_graph: bool = False,
        heads: Sequence[int] | None = None,
        energy_heads: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        if (forces or stress) and self.explicit:
            return self._forward_explicit(batch, forces, stress, create_graph, heads, None, energy_heads)
        return super().forward(batch, forces, stress, create_graph, heads)

    def _forward_explicit(self, batch, forces, stress, create_graph, heads, idx=None, energy_heads=None):
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            idx, x, geom = self._geometry(batch, batch.positions, batch.cell, idx)
            deriv = list(range(len(self.fidelities))) if heads is None else list(heads)
            cols = sorted(set(deriv) | set(energy_heads if energy_heads is not None else deriv))
            sizes = self.representation.feature_sizes
            energy = [None] * len(self.fidelities)
            grads: dict[int, tuple] = {}
            for h in cols:
                feats, cache = self.representation.forward_explicit(self._inputs(x, h), geom)
                energy[h] = self._head_energy(feats, idx, batch, h)
                if h in deriv:
                    w = self.readout.weight[0] * self.energy_scale[h]
                    g_vec = self.representation.pair_gradient(cache, [c.unsqueeze(0) for c in w.split(sizes)])
                    grads[h] = self._from_pair_gradient(batch, geom, g_vec, forces, stress)
            zero = next(e for e in energy if e is not None).new_zeros(batch.n_frames)
            out = {"energy": torch.stack([e if e is not None else zero for e in energy], dim=1)}
            if forces:
                out["forces"] = torch.stack([grads[h][0] for h in deriv], dim=1)
            if stress:
                out["stress"] = torch.stack([grads[h][1] for h in deriv], dim=1) / self._volume(batch)
        return out
