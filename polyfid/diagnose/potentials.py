"""Is a neural network worth it for a potential? Linear and multilinear models on descriptors
against HIP-NN, as learning curves of test energy and force errors.

Models (all fitted on the same nested training subsets, the first N frames of the training
pool after the validation split that `polyfid train` makes, and scored on the same test frames):

- ``linear_invariants``: E = Σ_i [w_{Z_i} · D_i + e0_{Z_i}] with D_i the per-atom moment-tensor
  invariants of `polyfid.descriptors.MomentInvariants` (13 invariants per radial × element
  channel: DESIGN.md's pruned set). Forces F = −∂E/∂r = Σ_i w_{Z_i} · (−∂D_i/∂r) are linear in w
  too, so w comes from one ridge regression on stacked energy rows (per atom: (E − Ê)/n) and
  force rows (weight `force_weight`); e0 is fitted without penalty (minimum norm when one
  composition pins down only a combination). The ridge strength λ and the force weight are
  chosen on the validation frames (the smallest validation score E_MAE/σ_E + F_MAE/σ_F, σ the
  spread of the training energies and force components).
- ``multilinear_invariants``: the same model on D_i plus all pairwise products (squares
  included) of the first `n_components` principal components of D per element — a quadratic
  model in the principal subspace. The principal components come from the descriptors of the
  smallest training subset (no labels; those frames are in every training set), so every size
  uses the same, label-free product set.
- ``linear_hipnn_features``: the HIP-NN trained on the same N frames, frozen; its last block's
  atom features z_i (128 per atom) replace D_i, and the per-element linear readout (energies and
  forces) is refitted by the same ridge. It tells whether the network's edge lies in its learned
  features (a linear readout on them recovers it) or in its nonlinear readout.
- networks ``hipnn`` (and ``hiphop``, HIP-HOP-NN, on request): trained with
  `polyfid.api.train_model` on the N frames for a wall-clock budget each (cosine learning-rate
  decay over the budget, final EMA weights; no validation-based selection).

Descriptor settings (defaults): `BesselRadial(8, 5 Å)` radial functions × "pairs" element
channels (H, C, O, all, HC, HO, CO: 7 blocks, 56 channels, 728 invariants per atom for H/C/O).
The Bessel basis and the element-pair blocks matter: on rMD17 ethanol at N = 200 the linear
ridge reached a force MAE of 33 meV/Å with them, 50 with Bessel and element + all blocks, 124
with HIP-NN-like narrow Gaussians in 1/r (element + all blocks).

How the rows are made: the force design rows of the descriptor models come in closed form
(`MomentInvariants.with_jacobian`: the invariants' Jacobian with respect to the atomic base
times the derivatives of harmonics and radial functions), and test-set predictions contract
per-atom effective weights ∂E/∂D_i with that Jacobian, never forming per-column derivatives.
The network features' rows come by forward-mode differentiation (torch.func.jvp, all frames of
a batch at once), along `feature_tangents` random orthonormal directions per training frame (a
sketch of its 3n force rows, scaled so that the force term of the loss keeps its expectation;
None: all 3n), while their validation and test predictions are exact (reverse mode). The ridge
works on accumulated normal equations (a nested training set is a snapshot), so frames are
never held as one big design matrix. This suits molecules and small cells: a frame costs 3n
forward-mode tangents at most.

Verdict, in the spirit of the tabular diagnostic: at the largest training size, a network
"wins" a quantity (energy, forces) when its test MAE is lower than the best linear/multilinear
model's by more than `min_gain` (default 10%) and a paired bootstrap over test frames puts the
95% interval of the gain above zero. "nonlinear" when the network wins both quantities, "linear"
when it wins neither, "mixed" otherwise. The evidence says whether the gap grows with N (the
relative gain at the largest size against the smallest, and log-log slopes between the two
largest sizes).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.data.batch import Batch, PackedData
from polyfid.data.frame import Dataset
from polyfid.descriptors.moments import (
    BesselRadial,
    InverseGaussianRadial,
    MomentInvariants,
    Radial,
    SlotDerivatives,
    element_index,
)
from polyfid.errors import ConfigError, DataError

DEFAULT_SIZES = (50, 100, 250, 500, 950)
LINEAR_MODELS = ("linear_invariants", "multilinear_invariants")
FEATURE_MODELS = ("linear_hipnn_features",)
NETWORKS = ("hipnn", "hiphop")
#: relative ridge strengths (of the column-scaled normal matrix, whose diagonal is 1)
LAMBDAS = tuple(10.0 ** k for k in range(-9, 2))
#: force-row weights tried (energy rows carry weight 1 per frame, in eV/atom)
FORCE_WEIGHTS = (1e-4, 1e-3, 1e-2)
#: the networks' training recipe (the PEERS.md one of benchmarks/common.py): loss 1·MSE(E/N) +
#: 100·MSE(F), energy weight 1000 for the last quarter, cosine decay over the budget, Adam 1e-3,
#: batch 32, EMA weights; no validation inside the budget
NETWORK_TRAINING: dict[str, Any] = {
    "batch_size": 32, "lr": 1e-3, "min_lr": 1e-6, "scheduler": "cosine", "energy_weight": 1.0,
    "force_weight": 100.0, "final_energy_weight": 1000.0, "final_fraction": 0.25, "ema_decay": 0.99,
    "grad_clip": 100.0, "dtype": "float32", "eval_every": 10**9, "early_stopping_patience": None,
}


# ======================================================================================
# design rows: per-frame energy columns and force rows from per-atom features
# ======================================================================================
@dataclass
class DesignBlock:
    """Rows of a few frames (B frames, N atoms, C columns; energies eV, forces eV/Å).

    XE (B, C): Σ over each frame's atoms of their element's feature block; counts (B, S): atoms
    per element; n_atoms (B,); energy (B,) reference energies; XF (3N, C): −∂XE/∂r, one row per
    atom coordinate (frame-major, atoms in frame order, x y z); forces (3N,) reference forces;
    frame_of_row (3N,) index of each force row's frame within the block.
    """

    XE: torch.Tensor
    counts: torch.Tensor
    n_atoms: torch.Tensor
    energy: torch.Tensor
    XF: torch.Tensor
    forces: torch.Tensor
    frame_of_row: torch.Tensor


def frame_rows(values: torch.Tensor, grad: torch.Tensor, nbr_j: torch.Tensor, mask: torch.Tensor,
               frame: torch.Tensor, element: torch.Tensor, n_frames: int, n_elements: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame, per-element sums of per-atom features and their force rows.

    values (N, D); grad (N, k, 3, D) = ∂values_i/∂vec of each neighbour slot of atom i
    (`SlotDerivatives`); nbr_j, mask (N·k,); frame, element (N,) frame and element index of each
    atom -> XE (n_frames, S·D) with column e·D + d = Σ_{atoms i of element e} values[i, d], and
    XF (3N, S·D) = −∂XE[frame of atom a]/∂r_a (rows a·3 + α), so that forces = XF @ w for
    energies XE @ w.
    """
    n, k, _, d = grad.shape
    s = n_elements
    xe = values.new_zeros(n_frames * s, d).index_add_(0, frame * s + element, values).view(n_frames, s * d)
    g = grad.reshape(n * k, 3, d)
    owner = torch.arange(n, device=grad.device).repeat_interleave(k)
    dg = grad.new_zeros(n * s, 3, d)
    dg.index_add_(0, nbr_j[mask] * s + element.index_select(0, owner[mask]), g[mask])  # vec = r_j − r_i
    dg.index_add_(0, torch.arange(n, device=grad.device) * s + element, grad.sum(1), alpha=-1.0)
    xf = dg.view(n, s, 3, d).transpose(1, 2).reshape(n * 3, s * d).neg_()
    return xe, xf


def _batches(packed: PackedData, index: Sequence[int], max_atoms: int) -> Iterator[np.ndarray]:
    """Consecutive runs of `index` holding at most `max_atoms` atoms (at least one frame each)."""
    index = np.asarray(index, dtype=np.int64)
    start = 0
    while start < len(index):
        n_at = np.cumsum(packed.n_atoms[index[start:]])
        stop = start + max(1, int(np.searchsorted(n_at, max_atoms, side="right")))
        yield index[start:stop]
        start = stop


def _block(packed: PackedData, idx: np.ndarray, batch: Batch, xe: torch.Tensor, xf: torch.Tensor,
           element: torch.Tensor, n_elements: int) -> DesignBlock:
    counts = torch.zeros(len(idx), n_elements, dtype=torch.float64).index_put_(
        (batch.frame, element), torch.ones(len(element), dtype=torch.float64), accumulate=True)
    frame_of_row = batch.frame.repeat_interleave(3)
    return DesignBlock(xe, counts, batch.n_atoms.double(), batch.energy[:, 0].double(), xf,
                       batch.forces[:, 0, :].double().reshape(-1), frame_of_row)


def make_radial(kind: str, n: int, cutoff: float) -> Radial:
    """"bessel": `BesselRadial(n, cutoff)`; "gaussian": `InverseGaussianRadial(n, 0.85, 4.5, cutoff)`."""
    if kind == "bessel":
        return BesselRadial(n, cutoff)
    if kind == "gaussian":
        return InverseGaussianRadial(n, 0.85, 4.5, cutoff)
    raise ValueError(f"radial basis {kind!r}: expected 'bessel' or 'gaussian'")


# ---- moment-invariant features (with optional PCA products) ----------------------------
class InvariantFeatures:
    """Per-atom moment invariants and, optionally, the pairwise products of their leading
    principal components per element (the multilinear features).

    descriptor: a `MomentInvariants`; elements: atomic numbers in column-block order.
    Call `fit_products(packed, index, n_components)` to add products (principal components of
    the standardised descriptors of each element's atoms in those frames).
    """

    def __init__(self, descriptor: MomentInvariants, elements: Sequence[int]) -> None:
        self.descriptor = descriptor
        self.elements = [int(z) for z in elements]
        self.n_components = 0
        self.pca: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per element (mean, std, V)

    @property
    def n_linear(self) -> int:
        """Columns per element of the descriptors alone."""
        return self.descriptor.n_descriptors

    @property
    def n_products(self) -> int:
        m = self.n_components
        return m * (m + 1) // 2

    def fit_products(self, packed: PackedData, index: Sequence[int], n_components: int,
                     max_atoms: int = 2000) -> None:
        """Principal axes of the standardised descriptors of each element in frames `index`."""
        vals, els = [], []
        with torch.no_grad():
            for idx in _batches(packed, index, max_atoms):
                b = packed.batch(idx)
                vals.append(self.descriptor(b.positions.double(), b.numbers, b.pair_i, b.pair_j, _shift_vectors(b)))
                els.append(element_index(b.numbers, self.elements))
        values, element = torch.cat(vals), torch.cat(els)
        m = int(n_components)
        self.pca = []
        for e in range(len(self.elements)):
            x = values[element == e]
            if len(x) < 2:
                raise DataError(f"element {self.elements[e]}: fewer than 2 atoms in the frames used for the products")
            mean, std = x.mean(0), x.std(0)
            std = torch.where(std > 1e-8 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
            _, _, vt = torch.linalg.svd((x - mean) / std, full_matrices=False)
            m = min(m, vt.shape[0])
            self.pca.append((mean, std, vt))
        self.pca = [(mean, std, vt[:m].T.contiguous()) for mean, std, vt in self.pca]
        self.n_components = m

    def rows(self, packed: PackedData, idx: np.ndarray) -> DesignBlock:
        """Design rows of frames `idx`: columns [descriptor blocks (S·D) | product blocks (S·M)]."""
        b = packed.batch(idx)
        element = element_index(b.numbers, self.elements)
        sd = self.descriptor.with_gradients(b.positions.double(), b.numbers, b.pair_i, b.pair_j, _shift_vectors(b))
        s = len(self.elements)
        xe, xf = frame_rows(sd.values, sd.grad, sd.nbr_j, sd.mask, b.frame, element, len(idx), s)
        if self.n_components:
            pv, pg = self._products(sd, element)
            xe2, xf2 = frame_rows(pv, pg, sd.nbr_j, sd.mask, b.frame, element, len(idx), s)
            xe, xf = torch.cat([xe, xe2], 1), torch.cat([xf, xf2], 1)
        return _block(packed, idx, b, xe, xf, element, s)

    def predict(self, packed: PackedData, idx: np.ndarray, models: Sequence[RidgeModel]
                ) -> tuple[DesignBlock, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Energies (B,) eV and forces (3N,) eV/Å of frames `idx` for fitted models (columns
        among [descriptors | products]), and a block with the labels and energy columns (no XF).

        Forces come from per-atom effective weights v_i = ∂E/∂D_i (the linear weights plus, for
        products, (W + Wᵀ) u_i mapped back through the principal axes) contracted with the
        descriptor Jacobian (`DescriptorJacobian.contract`): no per-column derivative is formed.
        """
        b = packed.batch(idx)
        element = element_index(b.numbers, self.elements)
        dj = self.descriptor.with_jacobian(b.positions.double(), b.numbers, b.pair_i, b.pair_j, _shift_vectors(b))
        s, d, n = len(self.elements), self.n_linear, len(element)
        key = b.frame * s + element
        xe = dj.values.new_zeros(len(idx) * s, d).index_add_(0, key, dj.values).view(len(idx), s * d)
        m_pc, u = self.n_components, {}
        if m_pc:
            pv = dj.values.new_zeros(n, self.n_products)
            iu, ju = torch.triu_indices(m_pc, m_pc)
            for e, (mean, std, axes) in enumerate(self.pca):
                sel = torch.nonzero(element == e).squeeze(1)
                u[e] = (sel, ((dj.values[sel] - mean) / std) @ axes)
                pv[sel] = u[e][1][:, iu] * u[e][1][:, ju]
            xe2 = pv.new_zeros(len(idx) * s, self.n_products).index_add_(0, key, pv).view(len(idx), -1)
            xe = torch.cat([xe, xe2], 1)
        weights = dj.values.new_zeros(len(models), n, d)
        for k, model in enumerate(models):
            w = torch.zeros(xe.shape[1], dtype=torch.float64)
            w[model.columns] = model.w
            weights[k] = w[: s * d].view(s, d).index_select(0, element)
            if m_pc:
                w_prod = w[s * d:].view(s, self.n_products)
                for e, (sel, ue) in u.items():
                    wm = torch.zeros(m_pc, m_pc, dtype=torch.float64)
                    wm[iu, ju] = w_prod[e]
                    _, std, axes = self.pca[e]
                    weights[k, sel] += ((ue @ (wm + wm.T)) @ axes.T) / std
        g = dj.contract(weights)  # (M, N, k, 3): ∂E/∂vec per slot
        n_slots = g.shape[2]
        flat = g.reshape(len(models), n * n_slots, 3)
        dedr = -g.sum(2)
        dedr = dedr.index_add(1, dj.nbr_j[dj.mask], flat[:, dj.mask])  # vec = r_j − r_i
        block = _block(packed, idx, b, xe, torch.zeros(0, 0, dtype=torch.float64), element, s)
        out = []
        for k, model in enumerate(models):
            energy = xe[:, model.columns] @ model.w + block.counts @ model.e0
            out.append((energy, -dedr[k].reshape(-1)))
        return block, out

    def _products(self, sd: SlotDerivatives, element: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Products u_a u_b (a ≤ b) of the principal-component scores u of each atom, and their
        slot derivatives u_a ∂u_b + u_b ∂u_a."""
        m = self.n_components
        iu, ju = torch.triu_indices(m, m)
        n, k = sd.grad.shape[:2]
        pv = sd.values.new_zeros(n, len(iu))
        pg = sd.values.new_zeros(n, k, 3, len(iu))
        for e, (mean, std, axes) in enumerate(self.pca):
            sel = torch.nonzero(element == e).squeeze(1)
            if not len(sel):
                continue
            u = ((sd.values[sel] - mean) / std) @ axes  # (n_e, m)
            du = (sd.grad[sel] / std) @ axes  # (n_e, k, 3, m)
            pv[sel] = u[:, iu] * u[:, ju]
            pg[sel] = u[:, None, None, iu] * du[..., ju] + u[:, None, None, ju] * du[..., iu]
        return pv, pg


def _shift_vectors(b: Batch) -> torch.Tensor | None:
    """Cartesian periodic displacements of the pairs (P, 3) Å, or None for open boundaries."""
    if not b.periodic:
        return None
    cell = b.cell.double().index_select(0, b.frame.index_select(0, b.pair_i))
    return torch.bmm(b.shifts.double().unsqueeze(1), cell).squeeze(1)


# ---- network features by forward-mode differentiation ----------------------------------
@contextlib.contextmanager
def _plain_bmm() -> Iterator[None]:
    """Route polyfid's bmm through torch.bmm for every batch size: its fast path for large
    batches is a custom autograd.Function, which torch.func transforms cannot go through."""
    from polyfid.models.layers import geometry

    old = geometry._SMALL_BATCH
    geometry._SMALL_BATCH = 1 << 62
    try:
        yield
    finally:
        geometry._SMALL_BATCH = old


def local_tangents(frame: torch.Tensor, n_atoms: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One tangent per local atom coordinate: (3·n_max, N, 3), tangent a·3 + α moving atom a
    (counted within its frame) of every frame along α."""
    n = frame.shape[0]
    start = torch.cumsum(n_atoms, 0) - n_atoms
    local = torch.arange(n) - start.index_select(0, frame)
    tangents = torch.zeros(int(n_atoms.max()) * 3, n, 3, dtype=dtype)
    atoms = torch.arange(n)
    for a in range(3):
        tangents[local * 3 + a, atoms, a] = 1.0
    return tangents


def sketch_tangents(frame: torch.Tensor, n_atoms: torch.Tensor, m: int, generator: torch.Generator,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """m random orthonormal directions in each frame's 3n-dimensional coordinate space (m ≤ 3n
    of every frame), scaled by sqrt(3n/m) so that the sum of squared projections of a force
    vector estimates its squared norm without bias -> (tangents (m, N, 3), Ω (B, m, 3·n_max))."""
    nb, n_max = len(n_atoms), int(n_atoms.max())
    valid = (torch.arange(n_max).unsqueeze(0) < n_atoms.unsqueeze(1)).repeat_interleave(3, dim=1)  # (B, 3n_max)
    g = torch.randn(nb, 3 * n_max, m, generator=generator, dtype=dtype) * valid.unsqueeze(2)
    q = torch.linalg.qr(g).Q * valid.unsqueeze(2)  # orthonormal columns inside each frame's coordinates
    omega = (q * (3 * n_atoms.to(dtype) / m).sqrt().view(nb, 1, 1)).transpose(1, 2)  # (B, m, 3n_max)
    start = torch.cumsum(n_atoms, 0) - n_atoms
    local = torch.arange(frame.shape[0]) - start.index_select(0, frame)
    tangents = omega.view(nb, m, n_max, 3)[frame, :, local, :].transpose(0, 1)  # (m, N, 3)
    return tangents.contiguous(), omega


def jvp_rows(columns: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor, tangents: torch.Tensor,
             chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame columns and their directional derivatives by forward-mode differentiation.

    columns: positions (N, 3) Å -> (B, C), each frame's columns depending on its own atoms only;
    tangents (R, N, 3), each moving atoms of every frame at once (frames are independent, so one
    tangent gives every frame's derivative along its part) -> (XE (B, C), ∂XE/∂r · t (R, B, C)).
    """
    with torch.no_grad():
        xe = columns(positions)

        def one(t: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(columns, (positions,), (t,))[1]

        d = torch.func.vmap(one, chunk_size=chunk_size)(tangents.to(positions.dtype))
    return xe, d


class NetworkFeatures:
    """The last block's atom features of a trained Potential (HIP-NN family), frozen, as
    per-element descriptor blocks (columns e·F + a for element e, feature a).

    Force rows come by forward-mode differentiation in `dtype`: all 3n coordinates of a frame
    (`n_tangents` None), or `n_tangents` random orthonormal directions per frame (a sketch of
    the force rows, scaled so that the force part of the ridge loss keeps its expectation; 3n/m
    times cheaper). Predictions for given readout weights (`predict`) are exact (reverse mode).
    """

    def __init__(self, model: Any, elements: Sequence[int], dtype: torch.dtype = torch.float64) -> None:
        self.model = copy.deepcopy(model).to(dtype).eval()
        self.dtype = dtype
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.elements = [int(z) for z in elements]
        self.n_features = int(self.model.representation.feature_sizes[-1])

    def _columns(self, b: Batch, element: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        s, nb, model = len(self.elements), b.n_frames, self.model
        key = b.frame * s + element

        def columns(pos: torch.Tensor) -> torch.Tensor:
            _, x, geom = model._geometry(b, pos, b.cell)
            z = model.representation(x, geom)[-1]
            return z.new_zeros(nb * s, z.shape[1]).index_add(0, key, z).view(nb, -1)

        return columns

    def rows(self, packed: PackedData, idx: np.ndarray, n_tangents: int | None = None,
             generator: torch.Generator | None = None, chunk_size: int | None = None) -> DesignBlock:
        """Design rows of frames `idx` (see the class docstring); with a sketch, XF has m rows per
        frame and `forces` holds the matching projections of the reference forces."""
        b = packed.batch(idx).to(dtype=self.dtype)
        element = element_index(b.numbers, self.elements)
        s, nb = len(self.elements), len(idx)
        columns = self._columns(b, element)
        exact = n_tangents is None or n_tangents >= 3 * int(b.n_atoms.max()) or n_tangents > 3 * int(b.n_atoms.min())
        with _plain_bmm():
            if exact:
                xe, d = jvp_rows(columns, b.positions, local_tangents(b.frame, b.n_atoms, self.dtype), chunk_size)
                n = b.positions.shape[0]
                start = torch.cumsum(b.n_atoms, 0) - b.n_atoms
                local = torch.arange(n) - start.index_select(0, b.frame)
                d = d.view(-1, 3, nb, d.shape[2])
                xf = -d[local, :, b.frame, :].reshape(n * 3, -1)
                block = _block(packed, idx, b, xe.double(), xf.double(), element, s)
                return block
            gen = generator or torch.Generator().manual_seed(0)
            tangents, omega = sketch_tangents(b.frame, b.n_atoms, int(n_tangents), gen, torch.float64)
            xe, d = jvp_rows(columns, b.positions, tangents, chunk_size)  # d (m, B, C)
        m = int(n_tangents)
        xf = -d.transpose(0, 1).reshape(nb * m, -1).double()
        block = _block(packed, idx, b, xe.double(), xf, element, s)
        n_max = int(b.n_atoms.max())
        f = torch.zeros(nb, n_max * 3, dtype=torch.float64)
        start = torch.cumsum(b.n_atoms, 0) - b.n_atoms
        local = torch.arange(b.positions.shape[0]) - start.index_select(0, b.frame)
        f.view(nb, n_max, 3)[b.frame, local] = block.forces.view(-1, 3)
        block.forces = (omega @ f.unsqueeze(2)).reshape(nb * m)
        block.frame_of_row = torch.arange(nb).repeat_interleave(m)
        return block

    def predict(self, packed: PackedData, idx: np.ndarray, models: Sequence[RidgeModel]
                ) -> tuple[DesignBlock, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Exact energies (B,) eV and forces (3N,) eV/Å of frames `idx` for several readouts at
        once (one reverse-mode pass per readout, vectorised), and a label-only block (no XF)."""
        b = packed.batch(idx).to(dtype=self.dtype)
        element = element_index(b.numbers, self.elements)
        columns = self._columns(b, element)
        w = torch.stack([m.w for m in models]).to(self.dtype)  # (M, C)
        with _plain_bmm():
            xe, vjp_fn = torch.func.vjp(columns, b.positions)
            cot = w.unsqueeze(1).expand(-1, len(idx), -1).contiguous()
            g = torch.func.vmap(vjp_fn, chunk_size=4)(cot)[0]  # (M, N, 3)
        block = _block(packed, idx, b, xe.detach().double(), torch.zeros(0, 0, dtype=torch.float64), element,
                       len(self.elements))
        e0 = torch.stack([m.e0 for m in models])
        energies = xe.detach().double() @ w.double().T + block.counts @ e0.T  # (B, M)
        return block, [(energies[:, k], -g[k].detach().double().reshape(-1)) for k in range(len(models))]


# ======================================================================================
# ridge on accumulated normal equations
# ======================================================================================
class RidgeAccumulator:
    """Normal equations of the stacked energy and force rows of training frames.

    Energy rows are [XE/n, counts/n, (E − counts·e_base)/n] (per-atom energies; e_base a fixed
    baseline that keeps the numbers small), force rows [XF, F]; both Gram matrices are summed
    over frames, so a nested training subset is a snapshot (`copy`).
    """

    def __init__(self, n_columns: int, n_elements: int, e_base: torch.Tensor | None = None) -> None:
        self.c, self.s = int(n_columns), int(n_elements)
        self.e_base = torch.zeros(self.s, dtype=torch.float64) if e_base is None else e_base.double()
        self.energy_gram = torch.zeros(self.c + self.s + 1, self.c + self.s + 1, dtype=torch.float64)
        self.force_gram = torch.zeros(self.c + 1, self.c + 1, dtype=torch.float64)

    def add(self, block: DesignBlock) -> None:
        n = block.n_atoms.unsqueeze(1)
        y = (block.energy - block.counts @ self.e_base).unsqueeze(1)
        a = torch.cat([block.XE, block.counts, y], 1) / n
        self.energy_gram += a.T @ a
        f = torch.cat([block.XF, block.forces.unsqueeze(1)], 1)
        self.force_gram += f.T @ f

    def copy(self) -> RidgeAccumulator:
        return copy.deepcopy(self)


@dataclass
class RidgeModel:
    """E = XE·w + counts·e0 (eV), F = XF·w (eV/Å) on the columns `columns`; λ (relative) and the
    force weight chosen on validation; `val` holds the validation errors (meV, meV/Å)."""

    w: torch.Tensor
    e0: torch.Tensor
    columns: torch.Tensor
    lam: float
    force_weight: float
    val: dict[str, float] = field(default_factory=dict)

    def predict(self, block: DesignBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """(energies (B,) eV, forces (3N,) eV/Å) of a block with all columns of the fit."""
        xe, xf = block.XE[:, self.columns], block.XF[:, self.columns]
        return xe @ self.w + block.counts @ self.e0, xf @ self.w


def _errors(model_e: torch.Tensor, model_f: torch.Tensor, block: DesignBlock) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """Per-frame |ΔE| (meV), Σ|ΔF| over the frame's components (meV/Å) and component counts."""
    de = 1e3 * (model_e - block.energy).abs()
    df = 1e3 * (model_f - block.forces).abs()
    nb = len(block.energy)
    fsum = torch.zeros(nb, dtype=torch.float64).index_add_(0, block.frame_of_row, df)
    return de.numpy(), fsum.numpy(), (3 * block.n_atoms).numpy()


class RidgeSystem:
    """The ridge problem of an accumulator on some of its columns: w penalised on column-scaled
    normal equations (λ relative to their unit diagonal), e0 unpenalised (minimum norm when one
    composition pins down only a combination of the per-element energies).

    columns: the accumulator's columns to use (default all), e.g. the descriptor block only.
    `solve(force_weight, lam)` -> RidgeModel; the scaled matrices of each force weight are kept
    for the next λ.
    """

    def __init__(self, acc: RidgeAccumulator, columns: torch.Tensor | None = None) -> None:
        c = acc.c
        self.cols = torch.arange(c) if columns is None else torch.as_tensor(columns)
        ye = c + acc.s
        eg, fg = acc.energy_gram, acc.force_gram
        self.bmat = eg[self.cols, c:ye]
        self.dpinv = torch.linalg.pinv(eg[c:ye, c:ye], hermitian=True, rtol=1e-10)
        self.bc = eg[c:ye, ye]
        self.ge = eg[self.cols][:, self.cols] - self.bmat @ self.dpinv @ self.bmat.T
        self.gvec_e = eg[self.cols, ye] - self.bmat @ self.dpinv @ self.bc
        self.gf, self.gvec_f = fg[self.cols][:, self.cols], fg[self.cols, c]
        self.e_base = acc.e_base
        self._prepared: dict[float, tuple[torch.Tensor, ...]] = {}

    def _prepare(self, fw: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept columns, their scales, scaled normal matrix, scaled right-hand side) at `fw`."""
        if fw not in self._prepared:
            g = self.ge + fw * self.gf
            rhs = self.gvec_e + fw * self.gvec_f
            scale = g.diagonal().clamp_min(0).sqrt()
            keep = scale > 1e-10 * float(scale.max().clamp_min(1e-300))
            sk = scale[keep]
            self._prepared[fw] = (keep, sk, g[keep][:, keep] / (sk[:, None] * sk[None, :]), rhs[keep] / sk)
        return self._prepared[fw]

    def solve(self, fw: float, lam: float) -> RidgeModel | None:
        """The ridge solution at force weight `fw` and relative strength `lam` (None if the
        system is not positive definite)."""
        keep, sk, gk, rk = self._prepare(fw)
        a = gk.clone()
        a.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return None
        w = torch.zeros(len(self.cols), dtype=torch.float64)
        # two right-hand sides: torch's single-column triangular solve is ~10x slower on CPU
        w[keep] = torch.cholesky_solve(torch.stack([rk, rk], 1), chol)[:, 0] / sk
        e0 = self.dpinv @ (self.bc - self.bmat.T @ w) + self.e_base
        return RidgeModel(w, e0, self.cols, float(lam), float(fw))


def ridge_search(
    acc: RidgeAccumulator,
    validation_errors: Callable[[Sequence[RidgeModel]], list[tuple[float, float]]],
    columns: torch.Tensor | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    force_weights: Sequence[float] = FORCE_WEIGHTS,
    scales: tuple[float, float] = (1.0, 1.0),
) -> RidgeModel:
    """The (force weight, λ) with the smallest validation score E_MAE/scales[0] + F_MAE/scales[1],
    searched coarse to fine: every other λ of the sorted grid (and its last) for every force
    weight, then the grid neighbours of each force weight's best λ; two calls of
    validation_errors(models) -> [(energy MAE meV, force MAE meV/Å)], each with all candidates
    of its round."""
    system = RidgeSystem(acc, columns)
    lams = sorted(float(x) for x in lambdas)
    tried: dict[tuple[float, int], RidgeModel] = {}

    def run(keys: list[tuple[float, int]]) -> None:
        models = [(key, m) for key in dict.fromkeys(keys) if key not in tried
                  and (m := system.solve(key[0], lams[key[1]])) is not None]
        if not models:
            return
        for (key, m), (e, f) in zip(models, validation_errors([m for _, m in models])):
            m.val = {"energy_mae_meV": e, "force_mae_meV_A": f, "score": e / scales[0] + f / scales[1]}
            tried[key] = m

    coarse = sorted(set(range(0, len(lams), 2)) | {len(lams) - 1})
    run([(fw, k) for fw in force_weights for k in coarse])
    refine = []
    for fw in force_weights:
        mine = [k for (f, k) in tried if f == fw]
        if mine:
            k = min(mine, key=lambda j: tried[(fw, j)].val["score"])
            refine += [(fw, j) for j in (k - 1, k + 1) if 0 <= j < len(lams)]
    run(refine)
    if not tried:
        raise RuntimeError("ridge: no (λ, force weight) gave a positive definite system")
    return min(tried.values(), key=lambda m: m.val["score"])


def block_validation(blocks: Sequence[DesignBlock]) -> Callable[[Sequence[RidgeModel]], list[tuple[float, float]]]:
    """validation_errors for `ridge_search` from design blocks of the validation frames."""

    def errors(models: Sequence[RidgeModel]) -> list[tuple[float, float]]:
        per = _block_errors(dict(enumerate(models)), iter(blocks))
        return [_mae(*per[k]) for k in range(len(models))]

    return errors


def fit_ridge(
    acc: RidgeAccumulator,
    val_blocks: Sequence[DesignBlock],
    columns: torch.Tensor | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    force_weights: Sequence[float] = FORCE_WEIGHTS,
    scales: tuple[float, float] = (1.0, 1.0),
) -> RidgeModel:
    """`ridge_search` with validation design blocks (errors in meV, meV/Å)."""
    return ridge_search(acc, block_validation(val_blocks), columns, lambdas, force_weights, scales)


def _mae(de: np.ndarray, fsum: np.ndarray, nc: np.ndarray) -> tuple[float, float]:
    return float(np.mean(de)), float(np.sum(fsum) / np.sum(nc))


# ======================================================================================
# data and networks
# ======================================================================================
@dataclass
class PotentialData:
    """The frames of the diagnostic: the training pool (the N-frame subsets are its first N),
    validation and test sets, all with labels at `fidelity`; `data_config` is the `data` section
    that makes `polyfid train` split the same way."""

    train: Dataset
    val: Dataset
    test: Dataset
    fidelity: str
    data_config: dict[str, Any]
    name: str = ""

    @property
    def elements(self) -> list[int]:
        return sorted(set(self.train.elements) | set(self.val.elements) | set(self.test.elements))


def load_potential_data(
    train: str | Path,
    test: str | Path,
    fidelity: str | None = None,
    val_size: int = 50,
    seed: int = 0,
    format: str | None = None,
    select: str | None = None,
    test_select: str | None = None,
) -> PotentialData:
    """Read the training file (split into a pool and `val_size` validation frames with `seed`,
    exactly as `polyfid train` does) and the test file. `fidelity` names the label set (default:
    the first the training file has); every frame used needs an energy and forces there.
    `select`/`test_select`: slices such as "0:200" applied to the files before splitting."""
    from polyfid.data.readers import read
    from polyfid.train.config import load_config
    from polyfid.train.run import build_datasets

    if fidelity is None:
        probe = read(train, format=format)
        if not probe.fidelities:
            raise DataError(f"{train}: no labels")
        fidelity = probe.fidelities[0]
    spec = {"path": str(train), "format": format, "fidelity": fidelity, "select": select,
            "use": ["energy", "forces"]}
    test_spec = {"path": str(test), "format": format, "fidelity": fidelity, "select": test_select,
                 "use": ["energy", "forces"]}
    data_cfg = {"train": [spec], "test": [test_spec], "val_size": int(val_size), "seed": int(seed)}
    cfg = load_config({"data": data_cfg})
    tr, va, te = build_datasets(cfg.data)
    for name, ds in (("training", tr), ("validation", va), ("test", te)):
        if len(ds) == 0:
            raise DataError(f"{name} set is empty")
        missing = [f.source for f in ds if fidelity not in f.labels or f.labels[fidelity].energy is None
                   or f.labels[fidelity].forces is None]
        if missing:
            raise DataError(f"{missing[0]}: no energy and forces at fidelity {fidelity!r} "
                            f"({len(missing)} {name} frame(s) lack them)")
    for ds in (tr, va, te):
        for f in ds:
            f.labels = {fidelity: f.labels[fidelity]}
    return PotentialData(tr, va, te, fidelity, data_cfg, Path(train).stem)


def train_network(
    data: PotentialData,
    n_train: int,
    architecture: str,
    budget_s: float,
    out: str | Path,
    model_options: dict[str, Any] | None = None,
    training_options: dict[str, Any] | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train `architecture` on the first `n_train` pool frames with `polyfid.api.train_model`
    for `budget_s` seconds of wall clock (NETWORK_TRAINING recipe, overridable) -> (the
    trained Potential, {train_s, epochs, params, run_dir})."""
    from polyfid.api import train_model

    data_cfg = {k: v for k, v in data.data_config.items() if k != "test"} | {"train_size": int(n_train)}
    config = {
        "data": data_cfg,
        "model": {"architecture": architecture, **(model_options or {})},
        "training": NETWORK_TRAINING | {"epochs": 10**8, "max_time_s": float(budget_s), "seed": seed,
                                        "num_threads": threads} | dict(training_options or {}),
        "output": {"dir": str(out), "tensorboard": False, "plots": False, "progress": False},
    }
    # a fresh folder: with no validation inside the budget, a model.pt left by an earlier run in
    # the same folder would be taken for this run's best model
    shutil.rmtree(out, ignore_errors=True)
    res = train_model(config)
    info = {"train_s": res.train_s, "epochs": res.epochs, "params": res.model.n_parameters(), "run_dir": str(out),
            "budget_s": float(budget_s)}
    return res.model, info


def network_errors(model: Any, data: Dataset, fidelity: str, batch_size: int = 64
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame |ΔE| (meV), Σ|ΔF| (meV/Å) and component counts of a Potential on `data`."""
    from polyfid.analysis.metrics import predict_packed

    packed = PackedData(data, model.cutoff, [fidelity], dtype=next(model.parameters()).dtype)
    head = model.head_index(fidelity) if fidelity in model.fidelities else 0
    pred = predict_packed(model, packed, batch_size=batch_size, forces=True)
    de = 1e3 * np.abs(pred["energy"][:, head] - packed.energy[:, 0].numpy())
    df = 1e3 * np.abs(pred["forces"][:, head] - packed.forces[:, 0].double().numpy()).sum(1)
    frame = np.repeat(np.arange(packed.n_frames), packed.n_atoms)
    fsum = np.bincount(frame, weights=df, minlength=packed.n_frames)
    return de, fsum, 3.0 * packed.n_atoms


def fit_network_features(
    model: Any,
    data: PotentialData,
    n_train: int,
    elements: Sequence[int],
    e_base: torch.Tensor | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
    lambdas: Sequence[float] = LAMBDAS,
    force_weights: Sequence[float] = FORCE_WEIGHTS,
    n_tangents: int | None = 9,
    max_atoms: int = 1000,
    seed: int = 0,
) -> RidgeModel:
    """Ridge readout (energies and forces) of a trained network's last-layer atom features on
    the first `n_train` pool frames; λ and force weight chosen by exact validation errors.
    n_tangents: force rows per training frame (random orthonormal directions; None: all 3n)."""
    nf = NetworkFeatures(model, elements)
    fid = data.fidelity
    pool = PackedData(data.train[np.arange(n_train)], model.cutoff, [fid], dtype=torch.float64)
    val = PackedData(data.val, model.cutoff, [fid], dtype=torch.float64)
    s = len(nf.elements)
    acc = RidgeAccumulator(s * nf.n_features, s, e_base)
    gen = torch.Generator().manual_seed(seed)
    for idx in _batches(pool, np.arange(n_train), max_atoms):
        acc.add(nf.rows(pool, idx, n_tangents, gen))

    def errors(models: Sequence[RidgeModel]) -> list[tuple[float, float]]:
        per = _prediction_errors(list(range(len(models))), lambda idx, ms: nf.predict(val, idx, ms), list(models),
                                 _batches(val, np.arange(len(data.val)), max_atoms))
        return [_mae(*per[k]) for k in range(len(models))]

    return ridge_search(acc, errors, None, lambdas, force_weights, scales)


def network_feature_errors(rm: RidgeModel, model: Any, data: Dataset, fidelity: str, elements: Sequence[int],
                           max_atoms: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame test errors (`_errors`) of a ridge readout of `model`'s features."""
    nf = NetworkFeatures(model, elements)
    packed = PackedData(data, model.cutoff, [fidelity], dtype=torch.float64)
    return _prediction_errors([0], lambda idx, ms: nf.predict(packed, idx, ms), [rm],
                              _batches(packed, np.arange(len(data)), max_atoms))[0]


def _fit_info(m: RidgeModel) -> dict[str, Any]:
    return {"lambda": m.lam, "force_weight": m.force_weight, "n_columns": int(len(m.columns)),
            "val_energy_mae_meV": m.val["energy_mae_meV"], "val_force_mae_meV_A": m.val["force_mae_meV_A"]}


# ======================================================================================
# the diagnostic
# ======================================================================================
@dataclass
class PotentialDiagnosis:
    """What the descriptor diagnostic found. curves: {model: {N: {"energy_mae_meV",
    "force_mae_meV_A", ...}}} on the test frames; verdict "nonlinear", "linear" or "mixed"."""

    name: str
    fidelity: str
    sizes: list[int]
    n_val: int
    n_test: int
    curves: dict[str, dict[int, dict[str, Any]]]
    verdict: str
    evidence: list[str]
    comparison: dict[str, Any]
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "name": self.name, "fidelity": self.fidelity, "sizes": self.sizes,
                "n_val": self.n_val, "n_test": self.n_test, "evidence": self.evidence,
                "comparison": self.comparison,
                "learning_curves": {m: {str(n): v for n, v in c.items()} for m, c in self.curves.items()},
                "settings": self.settings, "timings": self.timings}

    def mae_table(self) -> dict[str, dict[str, dict[str, float]]]:
        """{MODEL: {N_TRAIN: {"energy_mae_meV", "force_mae_meV_A"}}} (the benchmark's JSON shape)."""
        return {m: {str(n): {"energy_mae_meV": v["energy_mae_meV"], "force_mae_meV_A": v["force_mae_meV_A"]}
                    for n, v in c.items()} for m, c in self.curves.items()}


def _summary(de: np.ndarray, fsum: np.ndarray, nc: np.ndarray) -> dict[str, float]:
    return {"energy_mae_meV": float(np.mean(de)), "force_mae_meV_A": float(np.sum(fsum) / np.sum(nc)),
            "energy_rmse_meV": float(np.sqrt(np.mean(de**2)))}


def diagnose_potential(
    data: PotentialData,
    sizes: Sequence[int] = DEFAULT_SIZES,
    budget_s: float = 90.0,
    networks: Sequence[str] = ("hipnn",),
    feature_models: bool = True,
    out: str | Path = "runs/diagnose/potential",
    n_radial: int = 8,
    cutoff: float = 5.0,
    radial: str = "bessel",
    element_channels: str = "pairs",
    n_components: int = 20,
    lambdas: Sequence[float] = LAMBDAS,
    force_weights: Sequence[float] = FORCE_WEIGHTS,
    model_options: dict[str, Any] | None = None,
    training_options: dict[str, Any] | None = None,
    min_gain: float = 0.10,
    feature_tangents: int | None = 9,
    max_atoms: int = 400,
    feature_max_atoms: int = 1000,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
) -> PotentialDiagnosis:
    """Learning curves of the descriptor models and the networks (module docstring).

    sizes: training-set sizes N (first N frames of the pool; sizes above the pool are dropped);
    budget_s: wall-clock training budget of each network at each size (s); networks: among
    "hipnn", "hiphop"; feature_models: refit HIP-NN's last-layer features by ridge (needs
    "hipnn"); radial ("bessel": `BesselRadial(n_radial, cutoff)`, or "gaussian":
    `InverseGaussianRadial(n_radial, 0.85, 4.5, cutoff)`), n_radial, cutoff (Å), element_channels
    ("single", "blind", "pairs"): the descriptor (`MomentInvariants`); n_components: principal components
    per element whose pairwise products the multilinear model adds (0: no multilinear model);
    model_options / training_options: overrides for the networks' ModelConfig / training
    recipe; out: folder for the networks' run folders; feature_tangents: force rows per training
    frame for the feature refit (random directions; None: all 3n); max_atoms, feature_max_atoms:
    atoms per batch of the descriptor and network-feature rows (memory); log: progress messages (None: quiet).
    """
    say = log or (lambda _msg: None)
    t_all = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    sizes = sorted({int(n) for n in sizes if 0 < int(n) <= len(data.train)})
    if not sizes:
        raise DataError(f"no training size fits the {len(data.train)} training frames")
    unknown = set(networks) - set(NETWORKS)
    if unknown:
        raise ConfigError(f"unknown network(s) {sorted(unknown)}; expected among {list(NETWORKS)}")
    out = Path(out)
    elements = data.elements
    fid = data.fidelity
    timings: dict[str, float] = {}

    desc = MomentInvariants(elements, make_radial(radial, n_radial, cutoff), element_channels=element_channels)
    feats = InvariantFeatures(desc, elements)
    pool = PackedData(data.train, cutoff, [fid], dtype=torch.float64)
    val = PackedData(data.val, cutoff, [fid], dtype=torch.float64)
    test = PackedData(data.test, cutoff, [fid], dtype=torch.float64)
    n_pool = sizes[-1]
    if n_components > 0:
        feats.fit_products(pool, np.arange(sizes[0]), n_components)
    s = len(elements)
    n_lin = s * feats.n_linear
    n_cols = n_lin + s * feats.n_products

    # label scales for the validation score, and the energy baseline (numbers only)
    e_pool = pool.energy[:n_pool, 0]
    counts_pool = _counts(pool, elements)[:n_pool]
    e_base = torch.linalg.lstsq(counts_pool, e_pool.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    e_std = float(1e3 * (e_pool - counts_pool @ e_base).std()) or 1.0
    f_std = float(1e3 * pool.forces[: int(pool.atom_ptr[n_pool]), 0].std()) or 1.0
    scales = (e_std, f_std)
    say(f"{data.name}: {len(data.train)} pool / {len(data.val)} validation / {len(data.test)} test frames, "
        f"elements {elements}, {desc.n_descriptors} invariants per atom, sizes {sizes}")

    # ---- descriptor models: one pass over the pool (Grams at each size), validation, fits, test
    t0 = time.perf_counter()
    acc = RidgeAccumulator(n_cols, s, e_base)
    snapshots: dict[int, RidgeAccumulator] = {}
    bounds = [0, *sizes]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for idx in _batches(pool, np.arange(lo, hi), max_atoms):
            acc.add(feats.rows(pool, idx))
        snapshots[hi] = acc.copy()
    val_blocks = [feats.rows(val, idx) for idx in _batches(val, np.arange(len(val)), max_atoms)]
    timings["descriptor_design_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    linear_models = {n: fit_ridge(snapshots[n], val_blocks, torch.arange(n_lin), lambdas, force_weights, scales)
                     for n in sizes}
    multi_models = ({n: fit_ridge(snapshots[n], val_blocks, None, lambdas, force_weights, scales) for n in sizes}
                    if feats.n_components else {})
    timings["ridge_s"] = time.perf_counter() - t0
    del snapshots, acc
    t0 = time.perf_counter()
    fitted = {("linear_invariants", n): m for n, m in linear_models.items()}
    fitted |= {("multilinear_invariants", n): m for n, m in multi_models.items()}
    errors = _prediction_errors(list(fitted), lambda idx, ms: feats.predict(test, idx, ms), list(fitted.values()),
                                _batches(test, np.arange(len(test)), max_atoms))
    timings["descriptor_test_s"] = time.perf_counter() - t0
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    per_frame: dict[str, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for (name, n), m in fitted.items():
        err = errors[(name, n)]
        per_frame.setdefault(name, {})[n] = err
        curves.setdefault(name, {})[n] = _summary(*err) | _fit_info(m)
    for name in curves:
        say("  " + name + ": " + ", ".join(f"N={n} E {v['energy_mae_meV']:.1f} meV F {v['force_mae_meV_A']:.1f} "
                                          f"meV/Å" for n, v in curves[name].items()))

    # ---- networks (and the ridge refit of HIP-NN's features)
    for arch in networks:
        for n in sizes:
            t0 = time.perf_counter()
            model, info = train_network(data, n, arch, budget_s, out / f"{arch}_n{n}", model_options,
                                        training_options, seed, threads)
            err = network_errors(model, data.test, fid)
            per_frame.setdefault(arch, {})[n] = err
            curves.setdefault(arch, {})[n] = _summary(*err) | {k: info[k] for k in ("train_s", "epochs", "params")}
            timings[f"{arch}_n{n}_s"] = time.perf_counter() - t0
            say(f"  {arch} N={n}: E {curves[arch][n]['energy_mae_meV']:.1f} meV, "
                f"F {curves[arch][n]['force_mae_meV_A']:.1f} meV/Å ({info['epochs']} epochs, {info['train_s']:.0f} s)")
            if arch == "hipnn" and feature_models:
                t0 = time.perf_counter()
                name = "linear_hipnn_features"
                rm = fit_network_features(model, data, n, elements, e_base, scales, lambdas, force_weights,
                                          feature_tangents, feature_max_atoms, seed)
                err = network_feature_errors(rm, model, data.test, fid, elements, feature_max_atoms)
                per_frame.setdefault(name, {})[n] = err
                curves.setdefault(name, {})[n] = _summary(*err) | _fit_info(rm) | {"n_tangents": feature_tangents}
                timings[f"{name}_n{n}_s"] = time.perf_counter() - t0
                say(f"  {name} N={n}: E {curves[name][n]['energy_mae_meV']:.1f} meV, "
                    f"F {curves[name][n]['force_mae_meV_A']:.1f} meV/Å ({timings[f'{name}_n{n}_s']:.0f} s)")

    verdict, evidence, comparison = _verdict(curves, per_frame, sizes, min_gain, seed)
    timings["total_s"] = time.perf_counter() - t_all
    settings = {"descriptor": repr(desc), "n_descriptors_per_atom": desc.n_descriptors,
                "invariants": desc.invariant_names, "n_components": feats.n_components,
                "n_products_per_element": feats.n_products, "lambdas": list(lambdas),
                "force_weights": list(force_weights), "budget_s": float(budget_s), "networks": list(networks),
                "network_training": NETWORK_TRAINING | dict(training_options or {}),
                "model_options": dict(model_options or {}), "min_gain": min_gain, "seed": seed,
                "validation_score": "E_MAE/std(E) + F_MAE/std(F) on the validation frames",
                "label_scales": {"energy_std_meV": e_std, "force_std_meV_A": f_std}}
    return PotentialDiagnosis(data.name, fid, sizes, len(data.val), len(data.test), curves, verdict, evidence,
                              comparison, settings, timings)


def _counts(packed: PackedData, elements: Sequence[int]) -> torch.Tensor:
    """Atoms per element of every frame (n_frames, S)."""
    el = element_index(packed.numbers, elements)
    frame = torch.from_numpy(np.repeat(np.arange(packed.n_frames), packed.n_atoms))
    return torch.zeros(packed.n_frames, len(elements), dtype=torch.float64).index_put_(
        (frame, el), torch.ones(len(el), dtype=torch.float64), accumulate=True)


def _block_errors(models: dict[Any, RidgeModel], blocks: Iterator[DesignBlock]
                  ) -> dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per-frame errors (`_errors`) of every model over the blocks; models that share their
    columns are evaluated with one matrix product per block."""
    groups: dict[tuple[int, ...], list[Any]] = {}
    for k, m in models.items():
        groups.setdefault(tuple(m.columns.tolist()), []).append(k)
    parts: dict[Any, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {k: [] for k in models}
    for block in blocks:
        for cols, keys in groups.items():
            idx = torch.tensor(cols)
            full = len(cols) == block.XE.shape[1] and cols[-1] == len(cols) - 1
            xe = block.XE if full else block.XE[:, idx]
            xf = block.XF if full else block.XF[:, idx]
            w = torch.stack([models[k].w for k in keys], 1)
            e0 = torch.stack([models[k].e0 for k in keys], 1)
            energies = xe @ w + block.counts @ e0
            forces = xf @ w
            for j, k in enumerate(keys):
                parts[k].append(_errors(energies[:, j], forces[:, j], block))
    return {k: tuple(np.concatenate([p[i] for p in v]) for i in range(3)) for k, v in parts.items()}


def _prediction_errors(keys: list[Any], predict: Callable, models: list[RidgeModel], batches: Iterator[np.ndarray]
                       ) -> dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per-frame errors (`_errors`) of several models from predict(idx, models) -> (block, [(E, F)])."""
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in models]
    for idx in batches:
        block, preds = predict(idx, models)
        for k, (e, f) in enumerate(preds):
            parts[k].append(_errors(e, f, block))
    return {key: tuple(np.concatenate([p[i] for p in ps]) for i in range(3)) for key, ps in zip(keys, parts)}


# ---- verdict ---------------------------------------------------------------------------
def _bootstrap_gain(lin: tuple[np.ndarray, ...], net: tuple[np.ndarray, ...], quantity: str, seed: int,
                    n_boot: int = 2000) -> tuple[float, float, float]:
    """Relative gain 1 − MAE_net/MAE_lin and its 95% paired-bootstrap interval over test frames."""
    rng = np.random.default_rng(seed)
    n = len(lin[0])
    idx = rng.integers(0, n, size=(n_boot, n))
    if quantity == "energy":
        a, b = lin[0], net[0]
        gain = 1 - b.mean() / a.mean()
        boots = 1 - b[idx].mean(1) / a[idx].mean(1)
    else:
        a, b = lin[1], net[1]
        gain = 1 - b.sum() / a.sum()
        boots = 1 - b[idx].sum(1) / a[idx].sum(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(gain), float(lo), float(hi)


def _slope(curve: dict[int, dict[str, Any]], key: str) -> float:
    """d log(MAE) / d log(N) between the two largest sizes (0 with fewer than two)."""
    ns = sorted(curve)
    if len(ns) < 2:
        return 0.0
    (n0, n1), (e0, e1) = ns[-2:], (curve[ns[-2]][key], curve[ns[-1]][key])
    return float(np.log(e1 / e0) / np.log(n1 / n0)) if min(e0, e1) > 0 else 0.0


def _verdict(curves, per_frame, sizes, min_gain, seed) -> tuple[str, list[str], dict[str, Any]]:
    interp = [m for m in LINEAR_MODELS if m in curves]
    nets = [m for m in NETWORKS if m in curves]
    n_max, n_min = sizes[-1], sizes[0]
    if not interp or not nets:
        return "undecided", ["the verdict needs at least one descriptor model and one network"], {}
    ev, comp, wins = [], {"largest_size": n_max, "min_gain": min_gain}, {}
    for q, key, unit in (("energy", "energy_mae_meV", "meV"), ("forces", "force_mae_meV_A", "meV/Å")):
        bi = min(interp, key=lambda m: curves[m][n_max][key])
        bn = min(nets, key=lambda m: curves[m][n_max][key])
        gain, lo, hi = _bootstrap_gain(per_frame[bi][n_max], per_frame[bn][n_max], q.rstrip("s"), seed)
        g_small = 1 - curves[bn][n_min][key] / curves[bi][n_min][key]
        si, sn = _slope(curves[bi], key), _slope(curves[bn], key)
        win = gain > min_gain and lo > 0
        wins[q] = win
        growing = gain > g_small + 0.02
        ev.append(f"{q} at N = {n_max}: best descriptor model {bi} {curves[bi][n_max][key]:.3g} {unit}, best network "
                  f"{bn} {curves[bn][n_max][key]:.3g} {unit}: the network's relative gain 1 − MAE_net/MAE_desc is "
                  f"{100 * gain:+.1f}% (95% bootstrap interval {100 * lo:+.1f}% to {100 * hi:+.1f}%; a win needs "
                  f"> {100 * min_gain:.0f}% with the interval above 0)")
        if len(sizes) > 1:
            ev.append(f"{q}: the network's relative gain is {100 * g_small:+.1f}% at N = {n_min} and "
                      f"{100 * gain:+.1f}% at N = {n_max}: the network "
                      + ("gains ground with more data" if growing else "does not gain ground with more data")
                      + f"; log-log slopes at the largest sizes {bi} {si:.2f}, {bn} {sn:.2f}")
        comp[q] = {"best_descriptor_model": bi, "best_network": bn, "relative_gain": gain, "gain_ci95": [lo, hi],
                   "gain_smallest_size": g_small, "gap_growing": growing, "slope_descriptor": si,
                   "slope_network": sn, "network_wins": win}
    if "linear_hipnn_features" in curves and "hipnn" in curves:
        lf, hn = curves["linear_hipnn_features"][n_max], curves["hipnn"][n_max]
        ev.append(f"a ridge readout of HIP-NN's own last-layer features reaches E {lf['energy_mae_meV']:.3g} meV and "
                  f"F {lf['force_mae_meV_A']:.3g} meV/Å at N = {n_max} (HIP-NN: {hn['energy_mae_meV']:.3g} meV, "
                  f"{hn['force_mae_meV_A']:.3g} meV/Å): "
                  + ("a linear readout of the learned features does as well as the network's own (the network's "
                     "nonlinearity lies in its features)" if lf["force_mae_meV_A"] <= 1.1 * hn["force_mae_meV_A"] else
                     "a linear readout does not recover the network's accuracy from its last-layer features"))
    verdict = "nonlinear" if all(wins.values()) else ("linear" if not any(wins.values()) else "mixed")
    return verdict, ev, comp


# ---- report ----------------------------------------------------------------------------
def plot_potential_curves(d: PotentialDiagnosis, path: str | Path) -> Path:
    """Test energy and force MAE against N for every model (log-log); descriptor models solid,
    networks dashed, the ridge on network features dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyfid.analysis.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "energy_mae_meV", "energy MAE (meV per molecule)"),
                           (axes[1], "force_mae_meV_A", "force MAE (meV/Å)")):
        for k, (name, c) in enumerate(d.curves.items()):
            ns = sorted(c)
            style = "--" if name in NETWORKS else (":" if name in FEATURE_MODELS else "-")
            ax.plot(ns, [c[n][key] for n in ns], style + "o", ms=3, color=f"C{k}", label=name)
        ax.set(xscale="log", yscale="log", xlabel="training frames N", ylabel=label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{d.name}: verdict {d.verdict}", fontsize=10)
    return save_figure(fig, path)


_VERDICT_TEXT = {
    "nonlinear": "the network is clearly better on both energies and forces at the largest training set.",
    "linear": "a linear/multilinear model on the pruned invariants does as well as the network here.",
    "mixed": "the network is clearly better on one of energies and forces only.",
    "undecided": "not enough models to compare.",
}


def write_potential_report(d: PotentialDiagnosis, out: str | Path, title: str = "") -> Path:
    """Write out/report.md, out/learning_curves.png and out/diagnosis.json; returns the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_potential_curves(d, out / "learning_curves.png")
    (out / "diagnosis.json").write_text(json.dumps(d.to_dict(), indent=2))
    models = list(d.curves)

    def table(key: str) -> list[str]:
        rows = ["| model | " + " | ".join(f"N={n}" for n in d.sizes) + " |", "|---|" + "---|" * len(d.sizes)]
        for m in models:
            rows.append(f"| {m} | " + " | ".join(f"{d.curves[m][n][key]:.4g}" if n in d.curves[m] else "-"
                                                for n in d.sizes) + " |")
        return rows

    st = d.settings
    lines = [
        f"# Is a neural network worth it? {title or d.name} (potential energy surface)",
        "",
        f"**Verdict: {d.verdict}** — {_VERDICT_TEXT.get(d.verdict, '')}",
        "",
        f"Fidelity `{d.fidelity}`; training sizes {d.sizes} (nested: the first N frames of the training pool), "
        f"{d.n_val} validation frames (ridge λ and force weight), {d.n_test} test frames.",
        "",
        "## Evidence",
        "",
        *[f"- {e}" for e in d.evidence],
        "",
        "## Test energy MAE (meV per molecule)",
        "",
        *table("energy_mae_meV"),
        "",
        "## Test force MAE (meV/Å, all Cartesian components)",
        "",
        *table("force_mae_meV_A"),
        "",
        "![learning curves](learning_curves.png)",
        "",
        "## Models",
        "",
        f"- `linear_invariants`: E = Σ_i w_Z·D_i + e0_Z with D_i the {st['n_descriptors_per_atom']} moment-tensor "
        f"invariants per atom ({', '.join(st['invariants'])} per channel; {st['descriptor']}); ridge on energy "
        "and force rows.",
        f"- `multilinear_invariants`: the same plus the {st['n_products_per_element']} pairwise products of the "
        f"first {st['n_components']} principal components of D per element (principal axes from the smallest "
        "training subset's geometries).",
        "- `linear_hipnn_features`: HIP-NN trained on the same N frames, frozen; ridge readout of its last "
        "layer's atom features per element (energies and forces).",
        f"- networks {st['networks']}: `polyfid.api.train_model`, {st['budget_s']:.0f} s of training per size, "
        "final EMA weights.",
        "",
        "Method: ridge strength and force weight by the validation score "
        f"{st['validation_score']}; the verdict compares the best descriptor model with the best network at the "
        f"largest N, a win needing a gain above {100 * st['min_gain']:.0f}% whose paired bootstrap 95% interval "
        "(over test frames) excludes zero.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
