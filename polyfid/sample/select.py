"""De-duplication and farthest-point selection of structures.

Structures are compared through a rotation-, translation- and permutation-invariant
descriptor: for each pair of elements (Z_i ≤ Z_j), the inverse distances 1/r (1/Å) of all such
atom pairs, sorted; blocks are zero-padded to the longest over the set, so structures of
different composition compare too (a single atom has no distances: its descriptor is empty,
and single atoms are all alike). Selection is greedy farthest-point sampling in that space
(each pick maximises its distance to those already picked), which spreads expensive labels
over the sampled configurations instead of the densest region of an MD trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polyfid.errors import ConfigError


def inverse_distance_descriptor(structures: Sequence) -> np.ndarray:
    """(n_structures, D) sorted inverse distances per element pair (1/Å) of ASE Atoms or Frames."""
    blocks: list[dict[tuple[int, int], np.ndarray]] = []
    for s in structures:
        z = np.asarray(s.numbers)
        r = np.asarray(s.positions, dtype=float)
        i, j = np.triu_indices(len(z), k=1)
        inv = 1.0 / np.linalg.norm(r[i] - r[j], axis=1)
        a, b = np.minimum(z[i], z[j]), np.maximum(z[i], z[j])
        per: dict[tuple[int, int], np.ndarray] = {}
        for pair in set(zip(a.tolist(), b.tolist())):
            m = (a == pair[0]) & (b == pair[1])
            per[pair] = np.sort(inv[m])[::-1]
        blocks.append(per)
    keys = sorted({k for per in blocks for k in per})
    width = {k: max(len(per.get(k, ())) for per in blocks) for k in keys}
    out = np.zeros((len(blocks), sum(width.values())))
    for n, per in enumerate(blocks):
        col = 0
        for k in keys:
            v = per.get(k, ())
            out[n, col:col + len(v)] = v
            col += width[k]
    return out


def deduplicate(structures: Sequence, tolerance: float = 1e-3) -> list[int]:
    """Indices of the structures kept, in order: a structure whose descriptor lies within
    `tolerance` (RMS over the descriptor, 1/Å) of an earlier kept one is dropped."""
    x = inverse_distance_descriptor(structures)
    if x.shape[1] == 0:  # single atoms only: no distances, every structure is the same
        x = np.zeros((len(x), 1))
    kept: list[int] = []
    for n in range(len(x)):
        if kept:
            d = np.sqrt(np.mean((x[kept] - x[n]) ** 2, axis=1))
            if d.min() < tolerance:
                continue
        kept.append(n)
    return kept


def farthest_point(structures: Sequence, k: int, first: int | None = None, seed: int = 0,
                   exclude: Sequence[int] = ()) -> list[int]:
    """Indices of `k` structures chosen by greedy farthest-point sampling (descriptor space).

    first: the starting structure (default: a seeded random one); exclude: indices never picked.
    """
    x = inverse_distance_descriptor(structures)
    allowed = np.ones(len(x), dtype=bool)
    allowed[list(exclude)] = False
    n_allowed = int(allowed.sum())
    if k > n_allowed:
        raise ConfigError(f"cannot select {k} structures from {n_allowed} available")
    if k <= 0:
        return []
    if first is None:
        first = int(np.random.default_rng(seed).choice(np.flatnonzero(allowed)))
    elif not allowed[first]:
        raise ConfigError(f"first structure {first} is excluded")
    picked = [first]
    dmin = np.linalg.norm(x - x[first], axis=1)
    dmin[~allowed] = -np.inf
    for _ in range(k - 1):
        dmin[picked[-1]] = -np.inf
        nxt = int(np.argmax(dmin))
        picked.append(nxt)
        dmin = np.minimum(dmin, np.linalg.norm(x - x[nxt], axis=1))
    return picked
