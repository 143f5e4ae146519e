"""A descriptor network: per-element MLPs on fixed per-atom descriptors, energy as a sum over
atoms, forces by autograd through the descriptors (Behler–Parrinello style). It is the test bed
that compares descriptor sets (ACE full against pruned) at equal training time; it trains on
the run loop every training uses (`polyfid.train.descriptor`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from polyfid.data.batch import Batch, PackedData
from polyfid.descriptors.moments import element_index

#: positions (N, 3) Å, atomic numbers (N,), pair_i (P,), pair_j (P,)  ->  (N, D)
Descriptor = Callable[..., torch.Tensor]


class DescriptorNetwork(nn.Module):
    """E = Σ_i [MLP_{Z_i}((D_i − μ_{Z_i}) / σ_{Z_i}) + e0_{Z_i}] in eV; D from `descriptor`."""

    def __init__(self, descriptor: Descriptor, n_descriptors: int, elements: Sequence[int], hidden: int = 64,
                 layers: int = 2) -> None:
        super().__init__()
        self.descriptor, self.elements = descriptor, [int(z) for z in elements]
        n_el = len(self.elements)
        self.register_buffer("mean", torch.zeros(n_el, n_descriptors))
        self.register_buffer("scale", torch.ones(n_el, n_descriptors))
        self.register_buffer("e0", torch.zeros(n_el))

        def mlp() -> nn.Sequential:
            mods, width = [], n_descriptors
            for _ in range(layers):
                mods += [nn.Linear(width, hidden), nn.SiLU()]
                width = hidden
            mods.append(nn.Linear(width, 1))
            return nn.Sequential(*mods)

        self.nets = nn.ModuleList(mlp() for _ in range(n_el))

    def fit_statistics(self, data: PackedData, fidelity: int = 0) -> None:
        """Descriptor mean and spread per element, and per-element energies by least squares."""
        b = data.batch(np.arange(data.n_frames))
        with torch.no_grad():
            d = self.descriptor(b.positions.to(self.mean), b.numbers, b.pair_i, b.pair_j)
        el = element_index(b.numbers, self.elements)
        for k in range(len(self.elements)):
            rows = d[el == k]
            if len(rows):
                self.mean[k] = rows.mean(0)
                self.scale[k] = rows.std(0, unbiased=False).clamp_min(1e-6)
        counts = torch.zeros(b.n_atoms.shape[0], len(self.elements), dtype=torch.float64)
        counts.index_put_((b.frame, el), torch.ones(len(el), dtype=torch.float64), accumulate=True)
        e0 = torch.linalg.lstsq(counts, b.energy[:, fidelity:fidelity + 1].to(torch.float64)).solution[:, 0]
        self.e0.copy_(e0.to(self.e0))

    def forward(self, batch: Batch, forces: bool = True, create_graph: bool = False) -> dict[str, torch.Tensor]:
        pos = batch.positions.to(self.mean)
        if forces:
            pos = pos.requires_grad_(True)
        d = self.descriptor(pos, batch.numbers, batch.pair_i, batch.pair_j)
        el = element_index(batch.numbers, self.elements)
        x = (d - self.mean.index_select(0, el)) / self.scale.index_select(0, el)
        e_atom = self.e0.index_select(0, el)
        for k, net in enumerate(self.nets):
            idx = (el == k).nonzero()[:, 0]
            if len(idx):
                e_atom = e_atom.index_add(0, idx, net(x.index_select(0, idx))[:, 0])
        energy = e_atom.new_zeros(batch.n_atoms.shape[0]).index_add(0, batch.frame, e_atom)
        out = {"energy": energy}
        if forces:
            (g,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
            out["forces"] = -g
        return out


def predict(model: DescriptorNetwork, data: PackedData, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Energies (B,) eV and forces (N, 3) eV/Å of every frame, in data order."""
    es, fs = [], []
    for s in range(0, data.n_frames, batch_size):
        out = model(data.batch(np.arange(s, min(s + batch_size, data.n_frames))))
        es.append(out["energy"].detach().double().numpy())
        fs.append(out["forces"].detach().double().numpy())
    return np.concatenate(es), np.concatenate(fs)
