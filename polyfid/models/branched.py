"""Multi-head with a branch per fidelity: the first blocks shared, the last block(s) and the
energy head each fidelity's own.

E_f = Σ_i [ e_f(Z_i) + σ_f · (w_f · z_i^f + b_f) ], where z_i^f are the features of the shared
blocks followed by fidelity f's own last `own_blocks` blocks. The shared blocks run once per pass;
each fidelity asked for adds its own blocks. A linear head per fidelity on fully shared features
can only re-weight what the low level's forces shaped; fine-tuning showed that moving the last
interaction block is what a few high-level energies need (benchmarks/multifidelity.py, --phase
select: transfer with only the last block and head trainable matched full transfer, the head alone
did not), so each level gets that block while the low level's forces still shape the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from polyfid.data.batch import Batch
from polyfid.models.potential import Potential


class BranchedPotential(Potential):
    """A Potential whose fidelities share the representation's first blocks and own its last
    `own_blocks` blocks: fidelity 0 the representation's own, fidelity f > 0 `tails[f - 1]`
    (copies made at construction). Energies are computed for `energy_heads` if given, else
    `heads` if given, else all."""

    def __init__(self, representation: nn.Module, species: Sequence[int], fidelities: Sequence[str],
                 own_blocks: int) -> None:
        super().__init__(representation, species, fidelities)
        n_blocks = len(representation.blocks)
        if not 0 < own_blocks < n_blocks:
            raise ValueError(f"fidelity_blocks: each fidelity can own 1..{n_blocks - 1} of the network's {n_blocks} "
                             f"interaction blocks (at least one stays shared), not {own_blocks}")
        self.own_blocks = int(own_blocks)
        self.tails = nn.ModuleList([representation.make_tail(own_blocks) for _ in self.fidelities[1:]])

    def _tail(self, h: int) -> nn.ModuleList | None:
        return None if h == 0 else self.tails[h - 1]

    def own(self, h: int) -> nn.ModuleList:
        """The blocks fidelity `h` owns."""
        blocks = self.representation.blocks
        return nn.ModuleList(blocks[len(blocks) - self.own_blocks:]) if h == 0 else self.tails[h - 1]

    @torch.no_grad()
    def sync_tails(self) -> None:
        """Start every fidelity's own blocks as the representation's (after a warm start)."""
        source = self.representation.make_tail(self.own_blocks).state_dict()
        for t in self.tails:
            t.load_state_dict(source)

    def _head_energy(self, feats: list[torch.Tensor], idx: torch.Tensor, batch: Batch, h: int) -> torch.Tensor:
        e_atom = (nn.functional.linear(torch.cat(feats, dim=1), self.readout.weight[h:h + 1],
                                       self.readout.bias[h:h + 1]).squeeze(1) * self.energy_scale[h]).double()
        e_atom = e_atom + self.atom_ref[:, h].index_select(0, idx)
        if batch.n_frames == 1:
            return e_atom.sum().reshape(1)
        return e_atom.new_zeros(batch.n_frames).index_add_(0, batch.frame, e_atom)

    def _energies(self, idx, x, geom, batch) -> torch.Tensor:
        """Energies (B, H) of every fidelity (the autograd path)."""
        heads = range(len(self.fidelities))
        feats = self.representation.forward_branches(x, geom, [self._tail(h) for h in heads])
        return torch.stack([self._head_energy(f, idx, batch, h) for h, f in zip(heads, feats)], dim=1)

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
            passes = self.representation.forward_explicit_branches(x, geom, [self._tail(h) for h in cols])
            sizes = self.representation.feature_sizes
            energy: list[torch.Tensor | None] = [None] * len(self.fidelities)
            grads: dict[int, tuple] = {}
            for h, (feats, cache) in zip(cols, passes):
                energy[h] = self._head_energy(feats, idx, batch, h)
                if h in deriv:
                    w = self.readout.weight[h] * self.energy_scale[h]
                    g_vec = self.representation.pair_gradient(cache, [c.unsqueeze(0) for c in w.split(sizes)])
                    grads[h] = self._from_pair_gradient(batch, geom, g_vec, forces, stress)
            zero = next(e for e in energy if e is not None).new_zeros(batch.n_frames)
            out = {"energy": torch.stack([e if e is not None else zero for e in energy], dim=1)}
            if forces:
                out["forces"] = torch.stack([grads[h][0] for h in deriv], dim=1)
            if stress:
                out["stress"] = torch.stack([grads[h][1] for h in deriv], dim=1) / self._volume(batch)
        return out
