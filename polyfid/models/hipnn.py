"""HIP-NN: hierarchically interacting particle neural network (Lubbers, Smith, Barros 2018).

Interaction layer: z'_ia = f( Σ_{ν,b} V^ν_ab Σ_j s_ν(r_ij) z_jb + Σ_b W_ab z_ib + B_a ),
followed by on-site atom layers; every layer wrapped in a residual block as in hippynn.
The representation returns the features of every block (block 0 = element one-hot), which
the hierarchical energy head reads out.
"""

from __future__ import annotations

import torch
from torch import nn

from polyfid.models.layers.geometry import PairGeometry
from polyfid.models.layers.residual import AtomLinear, Residual, make_activation
from polyfid.models.layers.sensitivity import CosineCutoff, InverseSensitivity


class Interaction(nn.Module):
    """Σ_{ν,b} V^ν_ab Σ_j s_ν(r_ij) z_jb + W z_i + B.

    z: (N, n_in); geometry of the pairs, 1/r and φ_cut(r) in its padded layout  ->  (N, n_out).
    """

    def __init__(self, n_in: int, n_out: int, n_sens: int, soft_min: float, soft_max: float, cutoff: float) -> None:
        super().__init__()
        self.n_in, self.n_out, self.n_sens = n_in, n_out, n_sens
        self.sensitivity = InverseSensitivity(n_sens, soft_min, soft_max, cutoff)
        w = torch.empty(n_sens, n_out, n_in)
        nn.init.xavier_normal_(w)
        # V^ν_ab stored as [b, ν, a], the order of the environment (N, n_in, n_sens), so
        # that the contraction over (b, ν) is one matmul with a free view
        self.weight = nn.Parameter(w.permute(2, 0, 1).contiguous())
        self.self_interaction = AtomLinear(n_in, n_out)
        self.register_load_state_dict_pre_hook(_weight_from_old_layout)

    def forward(self, z: torch.Tensor, geom: PairGeometry, inv_r: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        env = geom.neighbor_sum(self.sensitivity(inv_r, cut), z)  # (N, n_in, n_sens)
        si = self.self_interaction
        out = torch.addmm(si.bias, z, si.weight.t())
        return out.addmm_(env.reshape(z.shape[0], -1), self.weight.view(-1, self.n_out))


def _weight_from_old_layout(module: Interaction, state_dict: dict, prefix: str, *args) -> None:
    """Model files written before the weight became (n_in, n_sens, n_out) held it as
    (n_sens · n_in, n_out), row ν·n_in + b."""
    w = state_dict.get(prefix + "weight")
    if w is not None and w.dim() == 2:
        w = w.view(module.n_sens, module.n_in, module.n_out).transpose(0, 1).contiguous()
        state_dict[prefix + "weight"] = w


class HIPNN(nn.Module):
    """HIP-NN representation.

    Args: n_species (one-hot width), n_features per block, n_sensitivities, soft_min and
    soft_max (Å, where the sensitivities are centred), cutoff (Å), n_interactions blocks,
    each with n_atom_layers on-site layers, residual blocks (resnet), activation name.
    """

    def __init__(
        self,
        n_species: int,
        n_features: int = 128,
        n_sensitivities: int = 20,
        soft_min: float = 0.85,
        soft_max: float = 4.5,
        cutoff: float = 5.0,
        n_interactions: int = 2,
        n_atom_layers: int = 3,
        resnet: bool = True,
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.resnet = resnet
        self.feature_sizes = [n_species] + [n_features] * n_interactions
        self.cutoff_fn = CosineCutoff(cutoff)
        act = make_activation(activation)
        self.act = act
        self.blocks = nn.ModuleList()
        for n_in, n_out in zip(self.feature_sizes[:-1], self.feature_sizes[1:]):
            inter = Interaction(n_in, n_out, n_sensitivities, soft_min, soft_max, cutoff)
            layers: list[nn.Module] = [Residual(inter, n_in, n_out, n_out, act) if resnet else inter]
            for _ in range(n_atom_layers):
                lin = AtomLinear(n_out, n_out)
                layers.append(Residual(lin, n_out, n_out, n_out, act) if resnet else lin)
            self.blocks.append(nn.ModuleList(layers))

    def forward(self, x: torch.Tensor, geom: PairGeometry) -> list[torch.Tensor]:
        """x: (N, n_species) one-hot; returns the features of each block, [(N, f_0), (N, f_1), ...]."""
        # 1/r and the cutoff, shared by all interaction layers, in the padded pair layout
        r = geom.r.unsqueeze(1)
        pair = geom.pad(torch.cat([r.reciprocal(), self.cutoff_fn(r)], dim=1))
        inv_r, cut = pair[:, :1], pair[:, 1:]
        out = [x]
        for block in self.blocks:
            x = block[0](x, geom, inv_r, cut)
            if not self.resnet:
                x = self.act(x)
            for layer in block[1:]:
                x = layer(x) if self.resnet else self.act(layer(x))
            out.append(x)
        return out
