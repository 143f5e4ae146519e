"""Δ-learning: E_target(R) = E_base(R) + ΔE(R), a base model of the low level plus a second
model trained on (high − low) where frames carry both.

The composite has the base model's fidelities plus the target; it answers the same calls as
a Potential (energies, forces, stress, chosen heads) and is saved as one model file holding
both networks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from polyfid.data.batch import Batch
from polyfid.errors import FidelityError
from polyfid.models.potential import Potential


class DeltaPotential(nn.Module):
    """base (any Potential) + delta (a one-head Potential) at fidelity `target`, on top of the
    base's head `base_fidelity`."""

    def __init__(self, base: Potential, delta: Potential, target: str, base_fidelity: str) -> None:
        super().__init__()
        if target in base.fidelities:
            raise ValueError(f"the base model already has fidelity {target!r}")
        if len(delta.fidelities) != 1:
            raise ValueError(f"the Δ model must have one head, it has {delta.fidelities}")
        self.base, self.delta = base, delta
        self.target, self.base_fidelity = target, base_fidelity
        self.base_col = base.head_index(base_fidelity)
        self.fidelities = list(base.fidelities) + [target]
        self.species = list(base.species)
        self.cutoff = max(base.cutoff, delta.cutoff)

    @property
    def explicit(self) -> bool:
        return self.base.explicit and self.delta.explicit

    @property
    def use_explicit_gradient(self) -> bool:
        return self.base.use_explicit_gradient

    @use_explicit_gradient.setter
    def use_explicit_gradient(self, value: bool) -> None:
        self.base.use_explicit_gradient = self.delta.use_explicit_gradient = value

    def head_index(self, fidelity: str | None) -> int:
        """Index of `fidelity` (None: the target, what a Δ model is for)."""
        if fidelity is None:
            return len(self.fidelities) - 1
        if fidelity not in self.fidelities:
            raise FidelityError(f"this model has no fidelity {fidelity!r}; it has {self.fidelities}")
        return self.fidelities.index(fidelity)

    def _species(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.base._species(numbers)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _plan(self, heads: Sequence[int] | None) -> tuple[list[int], list[int], bool]:
        """Requested heads, the base heads to evaluate, whether the Δ model is needed."""
        t = len(self.fidelities) - 1
        heads = list(range(len(self.fidelities))) if heads is None else list(heads)
        need_delta = t in heads
        base_heads = sorted({h for h in heads if h < t} | ({self.base_col} if need_delta else set()))
        return heads, base_heads, need_delta

    def _combine(self, heads, base_heads, out_b, out_d) -> dict[str, torch.Tensor]:
        t = len(self.fidelities) - 1
        e_b = out_b["energy"]
        e_t = e_b[:, self.base_col] + out_d["energy"][:, 0]
        out = {"energy": torch.cat([e_b, e_t.unsqueeze(1)], dim=1)}
        for key in ("forces", "stress"):
            if key not in out_b:
                continue
            cols = []
            for h in heads:
                if h < t:
                    cols.append(out_b[key][:, base_heads.index(h)])
                else:
                    cols.append(out_b[key][:, base_heads.index(self.base_col)] + out_d[key][:, 0])
            out[key] = torch.stack(cols, dim=1)
        return out

    def forward(
        self,
        batch: Batch,
        forces: bool = True,
        stress: bool = False,
        create_graph: bool = False,
        heads: Sequence[int] | None = None,
        energy_heads: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """As Potential.forward; the last column is the target fidelity."""
        heads, base_heads, need_delta = self._plan(heads)
        deriv = forces or stress
        out_b = self.base(batch, forces, stress, create_graph, heads=base_heads if deriv else None)
        # the Δ energy always (the target column), its derivatives only when the target is asked
        out_d = self.delta(batch, forces and need_delta, stress and need_delta, create_graph, heads=[0])
        return self._combine(heads, base_heads, out_b, out_d)

    def compiled(self) -> Callable[..., dict[str, torch.Tensor]]:
        """Inference through both networks' compiled functions (see Potential.compiled)."""
        fb, fd = self.base.compiled(), self.delta.compiled()

        def run(batch: Batch, forces: bool = True, stress: bool = False, heads: Sequence[int] | None = None):
            hs, base_heads, need_delta = self._plan(heads)
            out_b = fb(batch, forces, stress, base_heads)
            out_d = fd(batch, forces and need_delta, stress and need_delta, [0])
            return self._combine(hs, base_heads, out_b, out_d)

        return run
