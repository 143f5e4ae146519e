"""Neighbour lists (vesin), open and periodic boundaries."""

from __future__ import annotations

import numpy as np
import vesin

_NL_CACHE: dict[float, vesin.NeighborList] = {}


def neighbor_pairs(
    positions: np.ndarray,
    cutoff: float,
    cell: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full (both directions) neighbour list within `cutoff` (Å).

    Returns (i, j, shifts): int64 arrays of shape (P,), (P,) and (P, 3); the displacement
    of a pair is ``positions[j] - positions[i] + shifts @ cell``. Works for open boundaries
    (cell None or pbc all False) and any mix of periodic directions.
    """
    nl = _NL_CACHE.get(cutoff)
    if nl is None:
        nl = _NL_CACHE[cutoff] = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    periodic = pbc is not None and bool(np.any(pbc))
    box = np.zeros((3, 3)) if cell is None or not periodic else np.asarray(cell, dtype=np.float64)
    flags = [bool(p) for p in pbc] if periodic else False
    i, j, s = nl.compute(points=positions, box=box, periodic=flags, quantities="ijS")
    return i.astype(np.int64), j.astype(np.int64), s.astype(np.int64)
