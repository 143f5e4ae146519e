"""A potential: representation → hierarchical energy heads (one per fidelity) → energy,
forces = −∂E/∂R, stress = (1/V) ∂E/∂ε.

E_h = Σ_i [ e_h(Z_i) + σ_h · (Σ_n w_{h,n} · z_i^n + b_h) ], with e_h the per-element
reference energies of fidelity h (least squares on its own energies) and σ_h a fixed scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from polyfid.data.batch import Batch, PackedData
from polyfid.errors import DataError, FidelityError
from polyfid.models.layers.geometry import PairGeometry


class Potential(nn.Module):
    """Representation plus one hierarchical linear energy head per fidelity.

    representation: module (x_onehot (N, n_species), PairGeometry) -> list of feature blocks, with
    attributes `feature_sizes` and `cutoff` (Å). species: atomic numbers the model knows.
    fidelities: head names, in order.
    """

    def __init__(self, representation: nn.Module, species: Sequence[int], fidelities: Sequence[str]) -> None:
        super().__init__()
        self.representation = representation
        self.species = [int(z) for z in species]
        self.fidelities = list(fidelities)
        self.cutoff = float(representation.cutoff)
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("species_index", table, persistent=False)
        self.register_buffer("one_hot", torch.eye(len(self.species)), persistent=False)
        n_heads = len(self.fidelities)
        self.readout = nn.Linear(sum(representation.feature_sizes), n_heads)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)
        self.register_buffer("atom_ref", torch.zeros(len(self.species), n_heads, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones(n_heads))
        self.use_explicit_gradient = True  # False: forces by autograd (the reference path)

    #: the fidelity predicted when none is named (set from the model file; None: the first)
    default_fidelity: str | None = None

    def head_index(self, fidelity: str | None) -> int:
        """Index of the head for `fidelity` (None: `default_fidelity`, else the first)."""
        if fidelity is None:
            fidelity = self.default_fidelity
        if fidelity is None:
            return 0
        if fidelity not in self.fidelities:
            raise FidelityError(f"this model has no fidelity {fidelity!r}; it has {self.fidelities}")
        return self.fidelities.index(fidelity)

    def _species(self, numbers: torch.Tensor) -> torch.Tensor:
        idx = self.species_index.index_select(0, numbers)
        if idx.numel() and int(idx.min()) < 0:
            unknown = sorted(set(numbers[idx < 0].tolist()))
            raise DataError(f"atomic numbers {unknown} are not among the model's species {self.species}")
        return idx

    def _apply(self, fn, recurse=True):
        # per-element reference energies stay float64: absolute energies reach 1e4–1e5 eV,
        # where float32 steps are 1–10 meV
        ref = self.atom_ref
        super()._apply(fn, recurse)
        self.atom_ref = ref.to(device=self.energy_scale.device, dtype=torch.float64)
        return self

    def _geometry(self, batch: Batch, positions: torch.Tensor, cell: torch.Tensor, idx: torch.Tensor | None = None):
        """Species index (N,), one-hot (N, S) and pair geometry of a batch."""
        if idx is None:
            idx = self._species(batch.numbers)
        x = self.one_hot.index_select(0, idx).to(positions.dtype)
        vec = positions.index_select(0, batch.pair_j) - positions.index_select(0, batch.pair_i)
        if batch.periodic:
            pair_cell = cell.index_select(0, batch.frame.index_select(0, batch.pair_i))
            vec = vec + torch.bmm(batch.shifts.unsqueeze(1), pair_cell).squeeze(1)
        k, n = batch.max_neighbors, len(batch.numbers)
        # pairs (sorted by slot) that fill every slot are the padded layout already
        slot = None if batch.pair_j.shape[0] == n * k else batch.pair_slot
        return idx, x, PairGeometry(batch.pair_i, batch.pair_j, vec, vec.norm(dim=1), slot, batch.nbr_j, k)

    def _readout(self, feats: list[torch.Tensor], idx: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Frame energies (B, H) in eV, summed in float64."""
        e_atom = (self.readout(torch.cat(feats, dim=1)) * self.energy_scale).double()
        e_atom = e_atom + self.atom_ref.index_select(0, idx)
        if batch.n_frames == 1:
            return e_atom.sum(0, keepdim=True)
        return e_atom.new_zeros(batch.n_frames, e_atom.shape[1]).index_add_(0, batch.frame, e_atom)

    def energies(self, batch: Batch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Energies (B, H) in eV (float64) of every frame at every head, from `positions`
        (N, 3) Å and `cell` (B, 3, 3), which may carry autograd graphs."""
        idx, x, geom = self._geometry(batch, positions, cell)
        return self._energies(idx, x, geom, batch)

    def _energies(self, idx: torch.Tensor, x: torch.Tensor, geom: PairGeometry, batch: Batch) -> torch.Tensor:
        """Energies (B, H) from species index, one-hot and pair geometry."""
        return self._readout(self.representation(x, geom), idx, batch)

    @property
    def explicit(self) -> bool:
        """Whether forces come from the representation's explicit gradient (else autograd)."""
        return self.use_explicit_gradient and getattr(self.representation, "has_explicit_gradient", False)

    def forward(
        self,
        batch: Batch,
        forces: bool = True,
        stress: bool = False,
        create_graph: bool = False,
        heads: Sequence[int] | None = None,
        energy_heads: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict energy (B, H) eV; forces (N, len(heads), 3) eV/Å; stress (B, len(heads), 3, 3) eV/Å³.

        `heads` chooses the heads whose derivatives are taken (default: all).
        `energy_heads`: the heads whose energies are needed (default all); models whose heads
        cost a pass each (fidelity embedding) may leave the other columns at 0.
        `create_graph=True` when the forces enter a training loss.
        """
        if (forces or stress) and self.explicit:
            return self._forward_explicit(batch, forces, stress, create_graph, heads)
        return self._forward_autograd(batch, forces, stress, create_graph, heads, self.energies)

    def _forward_autograd(self, batch: Batch, forces: bool, stress: bool, create_graph: bool,
                          heads: Sequence[int] | None,
                          energies: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        """Energies from `energies(batch, positions, cell)`, forces and stress by autograd."""
        positions, cell = batch.positions, batch.cell
        wrt: list[torch.Tensor] = []
        if forces or stress:
            positions = positions.detach().requires_grad_(True)
            wrt.append(positions)
        if stress:
            strain = torch.zeros_like(cell).requires_grad_(True)
            sym = 0.5 * (strain + strain.transpose(1, 2))
            positions = positions + torch.bmm(positions.unsqueeze(1), sym.index_select(0, batch.frame)).squeeze(1)
            cell = cell + torch.bmm(cell, sym)
            wrt.append(strain)
        with torch.enable_grad() if wrt else contextlib.nullcontext():
            energy = energies(batch, positions, cell)
        out = {"energy": energy}
        if not wrt:
            return out
        heads = list(range(energy.shape[1])) if heads is None else list(heads)
        grads_f, grads_s = [], []
        for k, h in enumerate(heads):
            g = torch.autograd.grad(
                energy[:, h].sum(),
                wrt,
                create_graph=create_graph,
                retain_graph=create_graph or k < len(heads) - 1,
            )
            if forces:
                grads_f.append(-g[0].to(batch.positions.dtype))
            if stress:
                grads_s.append(g[-1].to(batch.positions.dtype))
        if forces:
            out["forces"] = torch.stack(grads_f, dim=1)
        if stress:
            out["stress"] = torch.stack(grads_s, dim=1) / self._volume(batch)
        return out

    @staticmethod
    def _volume(batch: Batch) -> torch.Tensor:
        return torch.linalg.det(batch.cell).abs().clamp_min(1e-12).reshape(-1, 1, 1, 1)

    def compiled(self) -> Callable[..., dict[str, torch.Tensor]]:
        """Inference (energy, forces, stress) compiled with torch.compile for any number of
        atoms and pairs: ~25 s once, then several times faster per call for small systems (the
        MD case). Same arguments as `forward`, create_graph excepted. Architectures with
        explicit forces compile the whole pass; the others compile the energy, whose backward
        (the forces) AOTAutograd compiles too."""
        def compiled_target(explicit: bool) -> Callable:
            # one per path, so that toggling use_explicit_gradient afterwards stays correct
            key = "_compiled_explicit" if explicit else "_compiled_energies"
            if key not in self.__dict__:
                target = self._forward_explicit if explicit else self._energies_checked
                self.__dict__[key] = torch.compile(target, dynamic=True)
            return self.__dict__[key]

        def run(batch: Batch, forces: bool = True, stress: bool = False, heads: Sequence[int] | None = None):
            idx = self._species(batch.numbers)  # checked outside: a data-dependent branch
            explicit = self.explicit
            fn = compiled_target(explicit)
            if explicit:
                return fn(batch, forces, stress, False, None if heads is None else tuple(heads), idx)
            return self._forward_autograd(batch, forces, stress, False, heads,
                                          lambda b, pos, cell: fn(b, pos, cell, idx))

        return run

    def _energies_checked(self, batch: Batch, positions: torch.Tensor, cell: torch.Tensor,
                          idx: torch.Tensor) -> torch.Tensor:
        """`energies` with the species index given (compiled code cannot raise on unknown elements)."""
        _, x, geom = self._geometry(batch, positions, cell, idx)
        return self._energies(idx, x, geom, batch)

    def _forward_explicit(
        self,
        batch: Batch,
        forces: bool,
        stress: bool,
        create_graph: bool,
        heads: Sequence[int] | None,
        idx: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        # graph only when training: inference runs without autograd
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            idx, x, geom = self._geometry(batch, batch.positions, batch.cell, idx)
            feats, cache = self.representation.forward_explicit(x, geom)
            energy = self._readout(feats, idx, batch)
            out = {"energy": energy}
            heads = list(range(energy.shape[1])) if heads is None else list(heads)
            sizes = self.representation.feature_sizes
            grads_f, grads_s = [], []
            for h in heads:
                w = self.readout.weight[h] * self.energy_scale[h]
                g_vec = self.representation.pair_gradient(cache, [c.unsqueeze(0) for c in w.split(sizes)])
                f, st = self._from_pair_gradient(batch, geom, g_vec, forces, stress)
                grads_f.append(f)
                grads_s.append(st)
            if forces:
                out["forces"] = torch.stack(grads_f, dim=1)
            if stress:
                out["stress"] = torch.stack(grads_s, dim=1) / self._volume(batch)
        return out

    @staticmethod
    def _from_pair_gradient(batch: Batch, geom: PairGeometry, g_vec: torch.Tensor, forces: bool, stress: bool):
        """Forces (N, 3) and virial (B, 3, 3) from dE/dvec (P, 3); None where not asked."""
        f = st = None
        if forces:  # vec = r_j − r_i: F_i = +dE/dvec, F_j = −dE/dvec
            f = g_vec.new_zeros(batch.positions.shape[0], 3).index_add(0, batch.pair_i, g_vec)
            f = f.index_add(0, batch.pair_j, -g_vec)
        if stress:  # virial: dE/dε = Σ_pairs vec ⊗ dE/dvec
            w_pairs = geom.vec.unsqueeze(2) * g_vec.unsqueeze(1)
            pair_frame = batch.frame.index_select(0, batch.pair_i)
            st = w_pairs.new_zeros(batch.n_frames, 3, 3).index_add(0, pair_frame, w_pairs)
        return f, st

    def head_tie_penalty(self, base: int) -> torch.Tensor:
        """Σ_{h≠base} ‖σ_h w_h − σ_b w_b‖² / σ_b²: how far each head's feature weights are from
        the base head's (the multi-head ridge that keeps a sparsely labelled level close to the
        level whose forces shaped the features)."""
        w = self.readout.weight * self.energy_scale.unsqueeze(1)
        diff = (w - w[base]) / self.energy_scale[base]
        return diff.square().sum()

    @torch.no_grad()
    def fit_reference_energies(self, data: PackedData) -> dict[str, list[float]]:
        """Least-squares per-element energies (eV) per fidelity, each from that fidelity's
        own energies only; minimum-norm where one composition pins down only a combination.
        Also sets each head's scale to the RMS of its force components (eV/Å), else the
        spread of its residual energies per atom. Returns {fidelity: references}."""
        idx = self._species(data.numbers).numpy()
        frame_of_atom = np.repeat(np.arange(data.n_frames), data.n_atoms)
        counts = np.zeros((data.n_frames, len(self.species)))
        np.add.at(counts, (frame_of_atom, idx), 1.0)
        result = {}
        for h, fid in enumerate(self.fidelities):
            if fid not in data.fidelities:
                continue
            col = data.fidelities.index(fid)
            mask = data.energy_mask[:, col].numpy()
            if not mask.any():
                raise DataError(
                    f"fidelity {fid!r} has no energies in the training data: its reference energies cannot be fitted"
                )
            e = data.energy[:, col].numpy()[mask]
            ref, *_ = np.linalg.lstsq(counts[mask], e, rcond=None)
            self.atom_ref[:, h] = torch.as_tensor(ref, dtype=self.atom_ref.dtype)
            fmask = data.forces_mask[:, col].numpy()
            if fmask.any():
                fm = np.repeat(fmask, data.n_atoms)
                scale = float(np.sqrt(np.mean(data.forces[:, col].numpy()[fm] ** 2)))
            else:
                resid = (e - counts[mask] @ ref) / data.n_atoms[mask]
                scale = float(np.std(resid)) if len(resid) > 1 else 1.0
            self.energy_scale[h] = max(scale, 1e-3)
            result[fid] = ref.tolist()
        return result

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PassPerHeadPotential(Potential):
    """A Potential whose heads each read their own pass of the representation (a fidelity
    embedding in the input, a fidelity's own last blocks). Subclasses give `_passes` (the
    features of each head asked for, sharing what they can) and `_head_row` (the readout row
    of a head). Energies are computed for `energy_heads` if given, else `heads` if given, else
    all; the other columns are 0."""

    def _passes(self, x: torch.Tensor, geom: PairGeometry, heads: Sequence[int], explicit: bool) -> list:
        """Per head in `heads`: its block features, or with `explicit` (features, cache) of
        `representation.forward_explicit`."""
        raise NotImplementedError

    def _head_row(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Readout weight (F,) and bias () of head `h`."""
        raise NotImplementedError

    def _head_energy(self, feats: list[torch.Tensor], idx: torch.Tensor, batch: Batch, h: int) -> torch.Tensor:
        """Frame energies (B,) in eV of head `h` from its features, summed in float64."""
        w, b = self._head_row(h)
        e_atom = ((torch.cat(feats, dim=1) @ w + b) * self.energy_scale[h]).double()
        e_atom = e_atom + self.atom_ref[:, h].index_select(0, idx)
        if batch.n_frames == 1:
            return e_atom.sum().reshape(1)
        return e_atom.new_zeros(batch.n_frames).index_add_(0, batch.frame, e_atom)

    def _energies(self, idx, x, geom, batch) -> torch.Tensor:
        """Energies (B, H) of every head (the autograd path)."""
        heads = list(range(len(self.fidelities)))
        feats = self._passes(x, geom, heads, explicit=False)
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
            sizes = self.representation.feature_sizes
            energy: list[torch.Tensor | None] = [None] * len(self.fidelities)
            grads: dict[int, tuple] = {}
            for h, (feats, cache) in zip(cols, self._passes(x, geom, cols, explicit=True)):
                energy[h] = self._head_energy(feats, idx, batch, h)
                if h in deriv:
                    w = self._head_row(h)[0] * self.energy_scale[h]
                    g_vec = self.representation.pair_gradient(cache, [c.unsqueeze(0) for c in w.split(sizes)])
                    grads[h] = self._from_pair_gradient(batch, geom, g_vec, forces, stress)
            zero = next(e for e in energy if e is not None).new_zeros(batch.n_frames)
            out = {"energy": torch.stack([e if e is not None else zero for e in energy], dim=1)}
            if forces:
                out["forces"] = torch.stack([grads[h][0] for h in deriv], dim=1)
            if stress:
                out["stress"] = torch.stack([grads[h][1] for h in deriv], dim=1) / self._volume(batch)
        return out
