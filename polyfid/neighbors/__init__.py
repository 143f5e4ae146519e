"""Neighbour lists (vesin), open and periodic boundaries, behind geometry checks."""

from __future__ import annotations

import numpy as np
import vesin

from polyfid.neighbors.checks import MAX_EXTENT, MIN_DISTANCE, check_before, check_pairs, completed_cell

_NL_CACHE: dict[float, vesin.NeighborList] = {}


def neighbor_pairs(
    positions: np.ndarray,
    cutoff: float,
    cell: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
    *,
    numbers: np.ndarray | None = None,
    where: str = "frame",
    min_distance: float | None = MIN_DISTANCE,
    max_extent: float | None = MAX_EXTENT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full (both directions) neighbour list within `cutoff` (Å) of positions (N, 3) Å.

    Returns (i, j, shifts): int64 arrays of shape (P,), (P,) and (P, 3); the displacement
    of a pair is ``positions[j] - positions[i] + shifts @ cell``. Works for open boundaries
    (cell None or pbc all False) and any mix of periodic directions; cell (3, 3) Å, rows are
    lattice vectors; pbc (3,) bool.

    The only door to vesin: the frame is checked first (polyfid.neighbors.checks), and a
    GeometryError naming `where` and the atoms (elements from `numbers` (N,), if given) is
    raised for non-finite positions or cell, a singular periodic cell, atoms spanning more than
    `max_extent` Å, or two atoms closer than `min_distance` Å (None: the caller checks the
    distances itself, as PackedData does for all frames at once). max_extent None: the caller
    has found the positions finite and within SAFE_EXTENT on an open frame (PackedData, for all
    frames at once); never pass it unchecked, vesin would kill the process.
    """
    nl = _NL_CACHE.get(cutoff)
    if nl is None:
        nl = _NL_CACHE[cutoff] = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    periodic = pbc is not None and bool(np.any(pbc))
    box = np.zeros((3, 3)) if cell is None or not periodic else np.asarray(cell, dtype=np.float64)
    offsets = None if max_extent is None and not periodic else check_before(
        positions, box if periodic else None, pbc if periodic else None,
        MAX_EXTENT if max_extent is None else max_extent, where, numbers)
    if offsets is not None:  # far outside a periodic cell: list the wrapped positions (vesin's grid, precision)
        positions = np.ascontiguousarray(positions - offsets @ box)
    if periodic:  # rows of open directions, often zero or arbitrary, replaced: shifts along them are 0
        box = completed_cell(box, np.asarray(pbc, dtype=bool))
    flags = [bool(p) for p in pbc] if periodic else False
    if min_distance is None:
        i, j, s = nl.compute(points=positions, box=box, periodic=flags, quantities="ijS")
    else:  # vesin's distances: free beside the list, where numpy's cost 2.5x the list on a large cell
        i, j, s, d = nl.compute(points=positions, box=box, periodic=flags, quantities="ijSd")
        if len(i):
            check_pairs(i, j, d, min_distance, where, numbers)
    i, j, s = i.astype(np.int64), j.astype(np.int64), s.astype(np.int64)
    if offsets is not None:  # the same displacements from the caller's positions
        s = s - offsets[j] + offsets[i]
    return i, j, s
