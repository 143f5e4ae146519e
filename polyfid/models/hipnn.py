"""HIP-NN: hierarchically interacting particle neural network (Lubbers, Smith, Barros 2018).

Interaction layer: z'_ia = f( Σ_{ν,b} V^ν_ab Σ_j s_ν(r_ij) z_jb + Σ_b W_ab z_ib + B_a ),
followed by on-site atom layers; every layer wrapped in a residual block as in hippynn.
The representation returns the features of every block (block 0 = element one-hot), which
the hierarchical energy head reads out.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from polyfid.models.layers.geometry import PairGeometry, bmm
from polyfid.models.layers.residual import AtomLinear, Residual, activation_derivative, make_activation
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
        return self.combine(z, geom.neighbor_sum(self.sensitivity(inv_r, cut), z))

    def combine(self, z: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        """W z + B + Σ V env, env (N, n_in, n_sens)."""
        si = self.self_interaction
        out = torch.addmm(si.bias, z, si.weight.t())
        return out.addmm_(env.reshape(z.shape[0], -1), self.weight.view(-1, self.n_out))

    # ---- explicit gradient (see HIPNN.pair_gradient) --------------------------------------

    def forward_explicit(self, z: torch.Tensor, geom: PairGeometry, inv_r: torch.Tensor,
                         cut: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The pre-activation (N, n_out), and what `backward_explicit` needs."""
        parts = self.sensitivity.parts(inv_r, cut)
        nbr = geom.neighbor_features(z)
        return self.combine(z, geom.neighbor_sum(parts[0], nbr)), {"nbr": nbr, "parts": parts}

    def backward_explicit(self, ga: torch.Tensor, saved: dict, geom: PairGeometry, radial: tuple[torch.Tensor, ...],
                          input_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Given dE/d(pre-activation) ga (N, n_out): dE/dr (N·K,) and the gradient with respect
        to the representation's direction-dependent `shared_pair_terms` (or None) per slot of the
        padded layout, and dE/dz (N, n_in) when `input_grad`."""
        g_s, g_in = self.scalar_backward(ga, saved, geom, input_grad)
        return self.radial_backward(g_s, saved["parts"], radial), None, g_in

    def scalar_backward(self, ga: torch.Tensor, saved: dict, geom: PairGeometry,
                        input_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dE/ds (N·K, n_sens) and dE/dz (N, n_in) (or None) of the HIP-NN terms."""
        n_atoms = ga.shape[0]
        g_env = (ga @ self.weight.view(-1, self.n_out).t()).view(n_atoms, self.n_in, self.n_sens)
        g_s = bmm(saved["nbr"], g_env).view(-1, self.n_sens)  # (N·K, n_sens)
        if not input_grad:
            return g_s, None
        s = saved["parts"][0].view(n_atoms, geom.max_neighbors, self.n_sens)
        g_nbr = bmm(s, g_env.transpose(1, 2))  # (N, K, n_in)
        g_in = (ga @ self.self_interaction.weight).index_add(0, geom.nbr_j, g_nbr.reshape(-1, self.n_in))
        return g_s, g_in

    def radial_backward(self, g_s: torch.Tensor, parts: tuple[torch.Tensor, ...],
                        radial: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """dE/dr (N·K,) from dE/ds (N·K, n_sens)."""
        return (g_s * self.sensitivity.radial_derivative(parts, *radial)).sum(1)


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
            inter = self.make_interaction(n_in, n_out, n_sensitivities, soft_min, soft_max, cutoff)
            layers: list[nn.Module] = [Residual(inter, n_in, n_out, n_out, act) if resnet else inter]
            for _ in range(n_atom_layers):
                lin = AtomLinear(n_out, n_out)
                layers.append(Residual(lin, n_out, n_out, n_out, act) if resnet else lin)
            self.blocks.append(nn.ModuleList(layers))

    def make_interaction(self, n_in: int, n_out: int, n_sens: int, soft_min: float, soft_max: float,
                         cutoff: float) -> nn.Module:
        """The interaction layer of one block (subclasses replace it)."""
        return Interaction(n_in, n_out, n_sens, soft_min, soft_max, cutoff)

    def _radial(self, geom: PairGeometry, derivative: bool = False) -> list[torch.Tensor]:
        """1/r, φ_cut(r) [and φ'_cut(r)], shared by all interaction layers, padded layout (N·K, 1)."""
        r = geom.r.unsqueeze(1)
        cols = [r.reciprocal(), self.cutoff_fn(r)]
        if derivative:
            cols.append(self.cutoff_fn.derivative(r))
        return list(geom.pad(torch.cat(cols, dim=1)).split(1, dim=1))

    def shared_pair_terms(self, geom: PairGeometry) -> tuple[torch.Tensor, ...]:
        """Per-pair quantities every interaction layer reads beyond 1/r and φ_cut (computed once
        per pass; HIP-NN: none)."""
        return ()

    def direction_gradient(self, shared: tuple[torch.Tensor, ...], grad: torch.Tensor) -> torch.Tensor:
        """dE/dr̂ (N·K, 3) from the interactions' summed gradients with respect to the
        direction-dependent shared terms (HIP-NN has none)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, geom: PairGeometry) -> list[torch.Tensor]:
        """x: (N, n_species) one-hot; returns the features of each block, [(N, f_0), (N, f_1), ...]."""
        return self.forward_branches(x, geom, [None])[0]

    # ---- branches: the same first blocks, each branch its own last blocks ------------------
    # A branch ("tail") is a ModuleList replacing the last len(tail) blocks (None: this
    # network's own); the blocks before the tails run once for all branches. Multi-fidelity
    # potentials give each fidelity its own last block this way (models/branched.py).

    def make_tail(self, n_blocks: int) -> nn.ModuleList:
        """A copy of the last `n_blocks` blocks (a branch's own blocks, starting as these)."""
        if not 0 < n_blocks <= len(self.blocks):
            raise ValueError(f"a branch replaces 1..{len(self.blocks)} blocks, not {n_blocks}")
        return copy.deepcopy(self.blocks[len(self.blocks) - n_blocks:])

    def _split(self, tails: Sequence[nn.ModuleList | None]) -> int:
        """Number of leading blocks every branch shares."""
        k = 0
        for t in tails:  # a plain loop: torch.compile traces it without a graph break (max(default=) breaks)
            if t is not None:
                k = max(k, len(t))
        return len(self.blocks) - k

    def _branch_blocks(self, tail: nn.ModuleList | None) -> list[nn.ModuleList]:
        return list(self.blocks) if tail is None else list(self.blocks[: len(self.blocks) - len(tail)]) + list(tail)

    def forward_branches(self, x: torch.Tensor, geom: PairGeometry,
                         tails: Sequence[nn.ModuleList | None]) -> list[list[torch.Tensor]]:
        """The block features (as `forward`) of each branch in `tails`."""
        inv_r, cut = self._radial(geom)
        shared = self.shared_pair_terms(geom)
        n_shared = self._split(tails)

        def run(x: torch.Tensor, blocks: Sequence[nn.ModuleList]) -> list[torch.Tensor]:
            out = []
            for block in blocks:
                x = block[0](x, geom, inv_r, cut, *shared)
                if not self.resnet:
                    x = self.act(x)
                for layer in block[1:]:
                    x = layer(x) if self.resnet else self.act(layer(x))
                out.append(x)
            return out

        prefix = [x] + run(x, self.blocks[:n_shared])
        return [prefix + run(prefix[-1], self._branch_blocks(t)[n_shared:]) for t in tails]

    # ---- explicit forces ----------------------------------------------------------------
    # The derivative of the energy with respect to the pair vectors, written out layer by
    # layer with ordinary (differentiable) tensor operations. Inference needs no autograd
    # graph; training differentiates through it once instead of twice (double backward).

    @property
    def has_explicit_gradient(self) -> bool:
        return activation_derivative(self.act, torch.zeros(1)) is not None

    def forward_explicit(self, x: torch.Tensor, geom: PairGeometry) -> tuple[list[torch.Tensor], dict]:
        """As `forward`, also returning the intermediates `pair_gradient` needs."""
        return self.forward_explicit_branches(x, geom, [None])[0]

    def forward_explicit_branches(self, x: torch.Tensor, geom: PairGeometry,
                                  tails: Sequence[nn.ModuleList | None]) -> list[tuple[list[torch.Tensor], dict]]:
        """`forward_explicit` of each branch in `tails`, the shared blocks run once."""
        inv_r, cut, dcut = self._radial(geom, derivative=True)
        shared = self.shared_pair_terms(geom)
        n_shared = self._split(tails)

        def run(x: torch.Tensor, blocks: Sequence[nn.ModuleList]) -> tuple[list[torch.Tensor], list[dict]]:
            out, saved = [], []
            for block in blocks:
                inter = block[0].base if self.resnet else block[0]
                a, saved_inter = inter.forward_explicit(x, geom, inv_r, cut, *shared)
                h = self.act(a)
                x = block[0].around(x, h) if self.resnet else h
                pre = []
                for layer in block[1:]:
                    lin = layer.base if self.resnet else layer
                    p = torch.nn.functional.linear(x, lin.weight, lin.bias)
                    pre.append(p)
                    h = self.act(p)
                    x = layer.around(x, h) if self.resnet else h
                saved.append({"inter": saved_inter, "a": a, "pre": pre})
                out.append(x)
            return out, saved

        out0, saved0 = run(x, self.blocks[:n_shared])
        prefix = [x] + out0
        result = []
        for t in tails:
            modules = self._branch_blocks(t)
            out1, saved1 = run(prefix[-1], modules[n_shared:])
            cache = {"geom": geom, "radial": (inv_r, cut, dcut), "shared": shared, "blocks": saved0 + saved1,
                     "modules": modules}
            result.append((prefix + out1, cache))
        return result

    def pair_gradient(self, cache: dict, feature_grads: list[torch.Tensor]) -> torch.Tensor:
        """dE/d(pair vector) (P, 3), given dE/d(features of block n) for every block
        (feature_grads[n]: (N, f_n) or (1, f_n), e.g. readout weights)."""
        geom: PairGeometry = cache["geom"]
        modules = cache.get("modules", self.blocks)  # a branch's blocks (forward_explicit_branches)
        g = feature_grads[-1]
        g_r = g_dir = None
        for n in range(len(modules) - 1, -1, -1):
            block, saved = modules[n], cache["blocks"][n]
            for layer, p in zip(reversed(block[1:]), reversed(saved["pre"])):
                lin = layer.base if self.resnet else layer
                dact = activation_derivative(self.act, p)
                if self.resnet:
                    gx, gp = layer.backward_around(g, dact)
                    g = torch.addmm(gx, gp, lin.weight)
                else:
                    g = (g * dact) @ lin.weight
            inter = block[0].base if self.resnet else block[0]
            dact = activation_derivative(self.act, saved["a"])
            if self.resnet:
                gz, ga = block[0].backward_around(g, dact)
            else:
                gz, ga = None, g * dact
            # block 0's input is the element one-hot: no gradient needed
            r_n, dir_n, g_in = inter.backward_explicit(ga, saved["inter"], geom, cache["radial"], n > 0)
            g_r = r_n if g_r is None else g_r + r_n
            if dir_n is not None:
                g_dir = dir_n if g_dir is None else g_dir + dir_n
            if n == 0:
                break
            if gz is not None:
                g_in = g_in + gz
            g = g_in + feature_grads[n]
        # dE/dvec = dE/dr · r̂ + (1 − r̂r̂) dE/dr̂ / r
        r = geom.r.unsqueeze(1)
        g_vec = geom.unpad(g_r.unsqueeze(1)) / r * geom.vec
        if g_dir is not None:
            u, g_u = geom.vec / r, geom.unpad(self.direction_gradient(cache["shared"], g_dir))
            g_vec = g_vec + (g_u - (g_u * u).sum(1, keepdim=True) * u) / r
        return g_vec
