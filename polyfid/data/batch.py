"""Packing frames into flat tensors and gathering batches without Python loops over atoms.

A packed data set holds, for all frames at once, the atoms, the neighbour pairs (computed
once with vesin at the model's cutoff) and the labels of each fidelity with masks. A batch
is a disjoint union of frames: atoms and pairs concatenated, pair indices offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from polyfid.data.frame import Dataset
from polyfid.errors import DataError
from polyfid.neighbors import neighbor_pairs
from polyfid.neighbors.checks import (
    FAR,
    MAX_EXTENT,
    MIN_DISTANCE,
    SAFE_EXTENT,
    check_pairs,
    pair_distances,
    recentred,
)


@dataclass
class Batch:
    """A batch of B frames with N atoms and P directed pairs; F fidelities.

    numbers (N,) int64; positions (N, 3) Å; frame (N,) frame index of each atom;
    n_atoms (B,); pair_i, pair_j (P,); shifts (P, 3) integer cell shifts (float);
    cell (B, 3, 3) Å (zeros if open); energy (B, F) eV, float64, with energy_mask (B, F);
    forces (N, F, 3) eV/Å with forces_mask (B, F); stress (B, F, 3, 3) eV/Å³ with stress_mask.
    pair_slot (P,) = pair_i · max_neighbors + rank of the pair among i's pairs: the place of
    each pair in a padded (N, max_neighbors) layout, which turns neighbour sums into bmm.
    nbr_j (N · max_neighbors,): j of each slot, 0 in empty slots. Pairs are sorted by slot, so
    when P = N · max_neighbors the pairs are the padded layout itself and need no padding.
    """

    numbers: torch.Tensor
    positions: torch.Tensor
    frame: torch.Tensor
    n_atoms: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    shifts: torch.Tensor
    cell: torch.Tensor
    energy: torch.Tensor
    energy_mask: torch.Tensor
    forces: torch.Tensor
    forces_mask: torch.Tensor
    stress: torch.Tensor
    stress_mask: torch.Tensor
    pair_slot: torch.Tensor
    nbr_j: torch.Tensor
    max_neighbors: int
    periodic: bool = False

    @property
    def n_frames(self) -> int:
        return int(self.n_atoms.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Move to a device; floating tensors (not masks) to `dtype`."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                cast = dtype is not None and v.is_floating_point() and f.name != "energy"  # energy stays float64
                v = v.to(device=device, dtype=dtype if cast else None)
            out[f.name] = v
        return Batch(**out)


def sorted_pairs(
    i: np.ndarray, j: np.ndarray, s: np.ndarray, n_atoms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The pairs sorted by i (stably), with their rank among i's pairs and the largest
    neighbour count: (i, j, shifts, rank, k_max)."""
    counts = np.bincount(i, minlength=n_atoms)
    if len(i) > 1 and not bool(np.all(i[1:] >= i[:-1])):
        order = np.argsort(i, kind="stable")
        i, j, s = i[order], j[order], s[order]
    rank = np.arange(len(i)) - np.repeat(np.cumsum(counts) - counts, counts)
    return i, j, s, rank, int(counts.max(initial=0))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c), vectorised."""
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    return np.arange(total) - np.repeat(offsets, counts) + np.repeat(starts, counts)


class PackedData:
    """All frames of a data set as flat tensors, with neighbour pairs within `cutoff` (Å).

    `fidelities` fixes the order of the label columns (the model's head order); label
    sets of other fidelities are ignored. Every frame passes the geometry checks of
    `polyfid.neighbors.neighbor_pairs` (atoms at least `min_distance` Å apart, spanning at most
    `max_extent` Å, finite positions, a regular cell): a GeometryError names the first that
    does not, by its source (or "frame k", 0-based), and its atoms.
    """

    def __init__(self, dataset: Dataset, cutoff: float, fidelities: Sequence[str], dtype=torch.float64,
                 min_distance: float = MIN_DISTANCE, max_extent: float = MAX_EXTENT) -> None:
        if len(dataset) == 0:
            raise DataError(f"data set {dataset.name!r} is empty")
        self.fidelities = list(fidelities)
        self.cutoff = float(cutoff)
        frames = dataset.frames
        n_fid = len(self.fidelities)
        n_atoms = np.array([f.n_atoms for f in frames], dtype=np.int64)
        pi, pj, ps, pk, n_pairs, max_nbr = [], [], [], [], [], []
        prefix = f"{dataset.name}: " if dataset.name else ""
        #: where each frame came from (its source, else "frame k"), for messages
        self.sources = [f.source or f"{prefix}frame {k}" for k, f in enumerate(frames)]
        positions = np.concatenate([f.positions for f in frames])
        starts = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
        # the checks for all frames at once (µs per frame count over 1e5 frames): open frames of
        # finite positions within max_extent skip neighbor_pairs' own; the others take it, and
        # it raises or wraps; distances are checked after the loop
        span = np.maximum.reduceat(positions, starts, axis=0) - np.minimum.reduceat(positions, starts, axis=0)
        periodic = np.array([bool(f.pbc.any()) for f in frames])
        checked = np.all(span <= min(max_extent, SAFE_EXTENT), axis=1) & ~periodic  # NaN compares False
        for f, where, done in zip(frames, self.sources, checked.tolist()):
            ijs = neighbor_pairs(f.positions, cutoff, f.cell, f.pbc, numbers=f.numbers, where=where,
                                 min_distance=None, max_extent=None if done else max_extent)
            i, j, s, rank, kmax = sorted_pairs(*ijs, f.n_atoms)
            pk.append(rank)
            max_nbr.append(kmax)
            pi.append(i)
            pj.append(j)
            ps.append(s)
            n_pairs.append(len(i))
        self.n_frames = len(frames)
        self.n_atoms = n_atoms
        self.n_pairs = np.array(n_pairs, dtype=np.int64)
        self.max_neighbors = np.array(max_nbr, dtype=np.int64)
        self.pair_rank = torch.from_numpy(np.concatenate(pk))
        self.atom_ptr = np.concatenate([[0], np.cumsum(n_atoms)])
        self.pair_ptr = np.concatenate([[0], np.cumsum(self.n_pairs)])
        self.periodic = bool(periodic.any())

        self.numbers = torch.from_numpy(np.concatenate([f.numbers for f in frames]))
        self._check_distances(frames, positions, np.concatenate(pi), np.concatenate(pj), np.concatenate(ps),
                              min_distance)
        far = np.flatnonzero(np.abs(positions).max(1) > FAR)
        if len(far):  # frames far from the origin, moved near it before float32 rounds them away
            positions = positions.copy()
            for b in np.unique(np.searchsorted(starts, far, side="right") - 1):
                f, sl = frames[b], slice(starts[b], starts[b] + n_atoms[b])
                positions[sl] = recentred(positions[sl], f.cell, f.pbc)
        self.positions = torch.from_numpy(positions).to(dtype)
        self.pair_i = torch.from_numpy(np.concatenate(pi))
        self.pair_j = torch.from_numpy(np.concatenate(pj))
        self.shifts = torch.from_numpy(np.concatenate(ps).astype(np.float64)).to(dtype)
        cell = np.zeros((self.n_frames, 3, 3))
        energy = np.zeros((self.n_frames, n_fid))
        e_mask = np.zeros((self.n_frames, n_fid), dtype=bool)
        forces = np.zeros((int(self.atom_ptr[-1]), n_fid, 3))
        f_mask = np.zeros((self.n_frames, n_fid), dtype=bool)
        stress = np.zeros((self.n_frames, n_fid, 3, 3))
        s_mask = np.zeros((self.n_frames, n_fid), dtype=bool)
        for b, f in enumerate(frames):
            if f.cell is not None:
                cell[b] = f.cell
            for k, fid in enumerate(self.fidelities):
                lab = f.labels.get(fid)
                if lab is None:
                    continue
                if lab.energy is not None:
                    energy[b, k] = lab.energy
                    e_mask[b, k] = True
                if lab.forces is not None:
                    forces[self.atom_ptr[b] : self.atom_ptr[b + 1], k] = lab.forces
                    f_mask[b, k] = True
                if lab.stress is not None:
                    stress[b, k] = lab.stress
                    s_mask[b, k] = True
        self.cell = torch.from_numpy(cell).to(dtype)
        self.energy = torch.from_numpy(energy)  # float64 always: absolute energies need it
        self.energy_mask = torch.from_numpy(e_mask)
        self.forces = torch.from_numpy(forces).to(dtype)
        self.forces_mask = torch.from_numpy(f_mask)
        self.stress = torch.from_numpy(stress).to(dtype)
        self.stress_mask = torch.from_numpy(s_mask)

    #: pairs per block of the distance check (bounds its memory on large data sets)
    _CHECK_BLOCK = 1 << 20

    def _check_distances(self, frames: Sequence, positions: np.ndarray, pi: np.ndarray, pj: np.ndarray,
                         ps: np.ndarray, min_distance: float) -> None:
        """GeometryError for the first frame with two atoms closer than `min_distance` Å: one
        vectorised pass over all pairs (frame-local indices pi, pj (P,), shifts ps (P, 3)) of
        positions (N, 3) Å, a few percent of building the lists."""
        if not len(pi):
            return
        pair_frame = np.repeat(np.arange(self.n_frames), self.n_pairs)
        start = self.atom_ptr[:-1][pair_frame]
        if self.periodic:
            cells = np.zeros((self.n_frames, 3, 3))
            for b, f in enumerate(frames):
                if f.cell is not None and f.pbc.any():
                    cells[b] = f.cell
        bad = None
        for a in range(0, len(pi), self._CHECK_BLOCK):
            sl = slice(a, a + self._CHECK_BLOCK)
            d = positions[pj[sl] + start[sl]] - positions[pi[sl] + start[sl]]
            if self.periodic:
                d += np.einsum("pk,pkl->pl", ps[sl].astype(np.float64), cells[pair_frame[sl]])
            close = np.flatnonzero(np.einsum("pk,pk->p", d, d) < min_distance**2)
            if len(close):
                bad = a + int(close[0])
                break
        if bad is None:
            return
        b = int(pair_frame[bad])
        f, lo, hi = frames[b], self.pair_ptr[b], self.pair_ptr[b + 1]
        i, j, s = pi[lo:hi], pj[lo:hi], ps[lo:hi]
        cell = f.cell if f.cell is not None and f.pbc.any() else None
        check_pairs(i, j, pair_distances(f.positions, i, j, s, cell), min_distance, self.sources[b], f.numbers)

    def __len__(self) -> int:
        return self.n_frames

    def batch(self, index: Sequence[int] | np.ndarray) -> Batch:
        """Gather frames `index` into one Batch."""
        idx = np.asarray(index, dtype=np.int64)
        na = self.n_atoms[idx]
        npairs = self.n_pairs[idx]
        atoms = torch.from_numpy(_ranges(self.atom_ptr[idx], na))
        pairs = torch.from_numpy(_ranges(self.pair_ptr[idx], npairs))
        # pair indices are stored local to their frame: offset by the frame's start in the batch
        new_start = np.cumsum(na) - na
        pair_offset = torch.from_numpy(np.repeat(new_start, npairs))
        tidx = torch.from_numpy(idx)
        pair_i = self.pair_i[pairs] + pair_offset
        pair_j = self.pair_j[pairs] + pair_offset
        kmax = max(int(self.max_neighbors[idx].max()), 1)
        n = int(na.sum())
        # pairs are sorted by i within each frame, so by slot in the batch
        dense = len(pairs) == n * kmax
        pair_slot = pair_i * kmax + self.pair_rank[pairs]
        return Batch(
            numbers=self.numbers[atoms],
            positions=self.positions[atoms],
            frame=torch.from_numpy(np.repeat(np.arange(len(idx)), na)),
            n_atoms=torch.from_numpy(na),
            pair_i=pair_i,
            pair_j=pair_j,
            shifts=self.shifts[pairs],
            cell=self.cell[tidx],
            energy=self.energy[tidx],
            energy_mask=self.energy_mask[tidx],
            forces=self.forces[atoms],
            forces_mask=self.forces_mask[tidx],
            stress=self.stress[tidx],
            stress_mask=self.stress_mask[tidx],
            pair_slot=pair_slot,
            max_neighbors=kmax,
            periodic=self.periodic,
            nbr_j=pair_j if dense else pair_j.new_zeros(n * kmax).index_copy_(0, pair_slot, pair_j),
        )


_EMPTY: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _empty_labels(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Zero-size label tensors of a one-frame batch (shared: they hold no data)."""
    e = _EMPTY.get(dtype)
    if e is None:
        e = _EMPTY[dtype] = (
            torch.zeros((1, 0), dtype=dtype),
            torch.zeros((1, 0), dtype=torch.bool),
            torch.zeros((1, 0, 3, 3), dtype=dtype),
        )
    return e


def single_frame_batch(
    numbers: np.ndarray,
    positions: np.ndarray,
    cutoff: float,
    cell: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    min_distance: float = MIN_DISTANCE,
    max_extent: float = MAX_EXTENT,
    where: str = "structure",
) -> Batch:
    """A label-free Batch of one structure (the MD / calculator path): numbers (N,), positions
    (N, 3) Å, cell (3, 3) Å with pbc (3,) bool, or None for an open structure.

    Raises GeometryError naming `where` and the atoms for a frame that fails the geometry
    checks (`polyfid.neighbors.neighbor_pairs`: `min_distance`, `max_extent` in Å)."""
    n = len(numbers)
    cell_in = cell
    ijs = neighbor_pairs(positions, cutoff, cell, pbc, numbers=np.asarray(numbers), where=where,
                         min_distance=min_distance, max_extent=max_extent)
    i, j, s, rank, kmax = sorted_pairs(*ijs, n)
    kmax = max(kmax, 1)
    periodic = pbc is not None and bool(np.any(pbc))
    slot = i * kmax + rank
    if len(i) == n * kmax:  # every atom has kmax neighbours: the pairs are the padded layout
        nbr = j
    else:
        nbr = np.zeros(n * kmax, dtype=np.int64)
        nbr[slot] = j
    np_dtype = _NP_DTYPES.get(dtype) or torch.empty((), dtype=dtype).numpy().dtype
    cell = np.zeros((1, 3, 3), dtype=np_dtype) if cell is None else np.asarray(cell, dtype=np_dtype).reshape(1, 3, 3)
    empty, nomask, empty_stress = _empty_labels(dtype)
    return Batch(
        numbers=torch.from_numpy(np.asarray(numbers, dtype=np.int64)),
        positions=torch.from_numpy(np.array(recentred(np.asarray(positions, dtype=np.float64), cell_in, pbc),
                                             dtype=np_dtype)),
        frame=torch.zeros(n, dtype=torch.int64),
        n_atoms=torch.tensor([n]),
        pair_i=torch.from_numpy(i),
        pair_j=torch.from_numpy(j),
        shifts=torch.from_numpy(s.astype(np_dtype)),
        cell=torch.from_numpy(cell),
        energy=empty,
        energy_mask=nomask,
        forces=torch.zeros((n, 0, 3), dtype=dtype),
        forces_mask=nomask,
        stress=empty_stress,
        stress_mask=nomask,
        pair_slot=torch.from_numpy(slot),
        max_neighbors=kmax,
        periodic=periodic,
        nbr_j=torch.from_numpy(nbr),
    )
