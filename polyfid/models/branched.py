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

from polyfid.errors import ConfigError
from polyfid.models.potential import PassPerHeadPotential


class BranchedPotential(PassPerHeadPotential):
    """A Potential whose fidelities share the representation's first blocks and own its last
    `own_blocks` blocks: fidelity 0 the representation's own, fidelity f > 0 `tails[f - 1]`
    (copies made at construction). Energies are computed for `energy_heads` if given, else
    `heads` if given, else all."""

    def __init__(self, representation: nn.Module, species: Sequence[int], fidelities: Sequence[str],
                 own_blocks: int) -> None:
        super().__init__(representation, species, fidelities)
        n_blocks = len(representation.blocks)
        if not 0 < own_blocks < n_blocks:
            raise ConfigError(f"fidelity_blocks: each fidelity can own 1..{n_blocks - 1} of the network's {n_blocks} "
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
        source = self.own(0).state_dict()
        for t in self.tails:
            t.load_state_dict(source)

    def _head_row(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.readout.weight[h], self.readout.bias[h]

    def _passes(self, x: torch.Tensor, geom, heads: Sequence[int], explicit: bool) -> list:
        """The shared blocks once, then each fidelity's own blocks."""
        tails = [self._tail(h) for h in heads]
        rep = self.representation
        return rep.forward_explicit_branches(x, geom, tails) if explicit else rep.forward_branches(x, geom, tails)
