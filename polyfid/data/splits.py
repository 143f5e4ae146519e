"""Deterministic index splits and subsets (numpy ``default_rng``; same seed, same indices)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polyfid.errors import DataError


def _sizes(n: int, parts: Sequence[float] | Sequence[int]) -> list[int]:
    parts = list(parts)
    if not parts:
        raise DataError("split: give at least one fraction or size")
    if any(p < 0 for p in parts):
        raise DataError(f"split: negative fraction or size in {parts}")
    if all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in parts):
        sizes = [int(p) for p in parts]
    elif all(p <= 1 for p in parts):
        total = float(sum(parts))
        if total > 1 + 1e-9:
            raise DataError(f"split: fractions {parts} sum to {total:.6g} > 1")
        sizes = [int(np.floor(p * n + 1e-9)) for p in parts]
        if abs(total - 1) <= 1e-9:  # fractions cover everything: the last part takes the rounding remainder
            sizes[-1] = n - sum(sizes[:-1])
    else:
        raise DataError(f"split: give either all fractions (<= 1) or all integer sizes, got {parts}")
    if sum(sizes) > n:
        raise DataError(f"split: sizes {sizes} need {sum(sizes)} items but there are only {n}")
    return sizes


def split_indices(n: int, parts: Sequence[float] | Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Split ``range(n)`` into disjoint random parts.

    `parts` are fractions (floats, sum <= 1; if they sum to 1 the last part takes the rounding
    remainder so every index is used) or integer sizes (sum <= n). One permutation from
    ``np.random.default_rng(seed)`` is cut into consecutive pieces; each returned array is sorted.
    """
    sizes = _sizes(n, parts)
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def random_subset(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Sorted random `k` of ``range(n)``; for a fixed seed, a smaller `k` gives a subset of a larger one."""
    if not 0 <= k <= n:
        raise DataError(f"random_subset: cannot take {k} of {n} items")
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def nested_subsets(indices: Sequence[int] | np.ndarray, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Nested random subsets of `indices` (e.g. sizes 50, 100, 200: 50 ⊂ 100 ⊂ 200).

    One permutation of `indices` (``default_rng(seed)``) and its prefixes of the given sizes; each
    subset is returned sorted, in the order of `sizes`.
    """
    indices = np.asarray(indices)
    bad = [s for s in sizes if not 0 <= int(s) <= len(indices)]
    if bad:
        raise DataError(f"nested_subsets: size(s) {bad} outside 0..{len(indices)}")
    perm = indices[np.random.default_rng(seed).permutation(len(indices))]
    return [np.sort(perm[: int(s)]) for s in sizes]


def parse_slice(text: str, where: str = "") -> slice:
    """A Python slice from text: ``'0:100'``, ``'::10'``, or one index ``'5'``; `where` names the
    file or option in the error."""
    try:
        parts = [int(p) if p.strip() else None for p in text.split(":")]
        if len(parts) == 3 and parts[2] == 0:
            raise ValueError("step 0")  # slice() takes it, indexing with it fails
        if len(parts) == 1:
            return slice(parts[0], parts[0] + 1 if parts[0] != -1 else None)
        return slice(*parts)
    except (TypeError, ValueError):
        raise DataError(f"{where + ': ' if where else ''}select {text!r} is not a slice such as '0:100' or '::10'") \
            from None
