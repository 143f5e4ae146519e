"""Greedy selection of a functionally independent invariant set, completeness tables and
degenerate points.

A candidate is kept when it raises the numerical rank of the Jacobian of the kept set at
every test point: its unit-normalised Jacobian row must stick out of the row space of the
kept rows (numerical rank by SVD with a relative tolerance) by more than `tol`. Every
decision records that length, so the report shows the gap between the smallest value kept
and the largest rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polyfid.errors import ConfigError
from polyfid.invariants.graphs import Contraction, TensorType, enumerate_contractions
from polyfid.invariants.jacobian import DTYPE, coordinates_from_tensors, jacobian, n_coordinates, orbit_dimension
from polyfid.models.layers.tensors import cartesian_harmonics, split_orders

TOL = 1e-8


def hiphop_types(l_max: int) -> list[TensorType]:
    """s, v, Q, T: one tensor of each order 0..l_max (a HIP-HOP-NN channel)."""
    return [TensorType(n, l_) for n, l_ in zip("svQT", range(l_max + 1))]


def random_points(types: list[TensorType], n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n_coordinates(types), generator=g, dtype=DTYPE) for _ in range(n)]


def _row_space(rows: torch.Tensor, tol: float) -> torch.Tensor:
    """(r, D) orthonormal basis of the numerical row space of unit-norm rows."""
    if rows.shape[0] == 0:
        return rows
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    return vh[s > tol * max(float(s[0]), 1.0)]


def _new_direction(basis: torch.Tensor, row: torch.Tensor) -> float:
    """Length of the part of a unit row outside the span of `basis`: 0 if dependent, 1 if orthogonal."""
    if float(row.norm()) == 0.0:
        return 0.0
    return float((row - basis.T @ (basis @ row)).norm()) if basis.shape[0] else float(row.norm())


@dataclass
class Selection:
    """The outcome of a greedy selection; `decisions` has one entry per candidate, in order,
    with `new_direction`: the length of the candidate's unit Jacobian row outside the span of
    the rows kept before it (the smallest over the test points)."""

    types: list[TensorType]
    candidates: list[Contraction]
    selected: list[int]
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return len(self.selected)

    def names(self) -> list[str]:
        return [self.candidates[i].name(self.types) for i in self.selected]

    @property
    def smallest_kept(self) -> float:
        return min((d["new_direction"] for d in self.decisions if d["kept"]), default=float("nan"))

    @property
    def largest_rejected(self) -> float:
        return max((d["new_direction"] for d in self.decisions if not d["kept"]), default=0.0)


def select_independent(candidates: list[Contraction], types: list[TensorType], points: list[torch.Tensor],
                       tol: float = TOL, start: list[int] | None = None,
                       max_rank: int | None = None) -> Selection:
    """Keep, in order, each candidate that raises the Jacobian rank at all `points`.

    start: indices already kept (their rank is taken as given); max_rank: stop once reached.
    """
    jacs = [jacobian(candidates, p, types) for p in points]  # (M, D) each, unit rows
    kept = list(start or [])
    bases = [_row_space(j[kept], tol) for j in jacs]
    sel = Selection(types, candidates, kept)
    for i, c in enumerate(candidates):
        if i in kept:
            continue
        if max_rank is not None and min(b.shape[0] for b in bases) >= max_rank:
            break
        new = min(_new_direction(b, j[i]) for b, j in zip(bases, jacs))
        keep = new > tol
        if keep:
            kept.append(i)
            bases = [_row_space(j[kept], tol) for j in jacs]
        sel.decisions.append({"candidate": c.name(types), "n_tensors": c.n_tensors, "new_direction": new,
                              "kept": keep})
    return sel


def rank_of(indices: list[int], candidates: list[Contraction], types: list[TensorType], point: torch.Tensor,
            tol: float = TOL) -> int:
    if not indices:
        return 0
    return _row_space(jacobian([candidates[i] for i in indices], point, types), tol).shape[0]


def required_rank(types: list[TensorType], point: torch.Tensor) -> int:
    """Degrees of freedom minus the dimension of the rotation orbit through `point`."""
    return n_coordinates(types) - orbit_dimension(point, types)


def completeness_table(l_values: list[int], n_values: list[int], n_points: int = 2, seed: int = 0,
                       tol: float = TOL) -> list[dict[str, Any]]:
    """For each (L, N): candidates enumerated, selected, and the rank completeness requires."""
    rows = []
    for l_max in l_values:
        types = hiphop_types(l_max)
        points = random_points(types, n_points, seed)
        required = required_rank(types, points[0])
        for n in n_values:
            cands = enumerate_contractions(types, n)
            sel = select_independent(cands, types, points, tol)
            rows.append({"l_max": l_max, "max_tensors": n, "candidates": len(cands), "selected": sel.rank,
                         "required": required, "complete": sel.rank == required,
                         "smallest_kept": sel.smallest_kept, "largest_rejected": sel.largest_rejected,
                         "selected_names": sel.names()})
    return rows


# ---- degenerate points -------------------------------------------------------------------
def environment_point(directions: torch.Tensor, weights: torch.Tensor, types: list[TensorType]) -> torch.Tensor:
    """Coordinates of the moment tensors Σ_j w_j Y^l(r̂_j) of a neighbour environment (one per type)."""
    u = torch.nn.functional.normalize(directions.to(DTYPE), dim=1)
    lmax = max(t.order for t in types)
    y = (weights.to(DTYPE)[:, None] * cartesian_harmonics(u, lmax)).sum(0, keepdim=True)  # (1, Σ 3^l)
    by_order = [p[0, ..., 0] for p in split_orders(y.unsqueeze(-1), lmax)]  # s (), v (3,), Q (3, 3), ...
    return coordinates_from_tensors([by_order[t.order] for t in types], types)


def _rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DTYPE))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def degenerate_points(types: list[TensorType], seed: int = 1) -> dict[str, torch.Tensor]:
    """Named special points: some tensors zero, and symmetric neighbour environments
    (randomly rotated so that nothing depends on the axes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_coordinates(types), generator=g, dtype=DTYPE)
    order_of = [t.order for t in types]

    def zero(orders: tuple[int, ...]) -> torch.Tensor:
        x, start = base.clone(), 0
        for o in order_of:
            if o in orders:
                x[start:start + 2 * o + 1] = 0
            start += 2 * o + 1
        return x

    rot = _rotation(seed)
    tet = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=DTYPE) @ rot.T
    axis = torch.tensor([[0.0, 0, 1], [0, 0, -1]], dtype=DTYPE) @ rot.T
    tri = torch.tensor([[1.0, 0, 0], [-0.5, 0.75**0.5, 0], [-0.5, -0.75**0.5, 0]], dtype=DTYPE) @ rot.T
    points = {}
    if 1 in order_of:
        points["vector zero"] = zero((1,))
    if 2 in order_of:
        points["quadrupole zero"] = zero((2,))
    if 1 in order_of and 2 in order_of:
        points["vector and quadrupole zero"] = zero((1, 2))
    points["tetrahedral environment"] = environment_point(tet, torch.ones(4), types)
    points["linear environment"] = environment_point(axis, torch.tensor([1.0, 0.6]), types)
    points["trigonal planar environment"] = environment_point(tri, torch.ones(3), types)
    return points


def degenerate_report(l_max: int, max_tensors: int, extra_tensors: int = 1, seed: int = 0,
                      tol: float = TOL, generic: Selection | None = None) -> dict[str, Any]:
    """At each degenerate point: the rank of the generic selection, the rank all candidates
    reach (up to max_tensors + extra_tensors factors), and the candidates that restore it.

    A selection that is complete at generic points may lose rank at a special point although
    other invariants still separate the directions there; the extra ones, added to the generic
    set, make a "flexible" set that stays complete at that point. `generic`: the selection at
    (l_max, max_tensors) when the caller already has it.
    """
    types = hiphop_types(l_max)
    if generic is None:
        generic = select_independent(enumerate_contractions(types, max_tensors), types,
                                     random_points(types, 2, seed), tol)
    pool = enumerate_contractions(types, max_tensors + extra_tensors)
    index = {c: i for i, c in enumerate(pool)}
    base = [index[generic.candidates[i]] for i in generic.selected]
    out = {"l_max": l_max, "max_tensors": max_tensors, "pool_max_tensors": max_tensors + extra_tensors,
           "generic_selected": generic.names(), "points": {}}
    for name, point in degenerate_points(types, seed + 1).items():
        have = rank_of(base, pool, types, point, tol)
        reach = rank_of(list(range(len(pool))), pool, types, point, tol)
        restore = select_independent(pool, types, [point], tol, start=base, max_rank=reach) if have < reach else None
        extras = [pool[i].name(types) for i in restore.selected[len(base):]] if restore else []
        out["points"][name] = {"rank_selected": have, "rank_all_candidates": reach,
                               "dof_minus_orbit": required_rank(types, point), "complete": have == reach,
                               "restoring_candidates": extras}
    return out


def invariant_report(l_max: int = 3, max_tensors: int = 4, n_points: int = 2, seed: int = 0, tol: float = TOL,
                     check: list[str] | None = None, degenerate: bool = True) -> dict[str, Any]:
    """Everything `polyfid invariants` prints: the selection at (l_max, max_tensors) with every
    decision, the table for all smaller (L, N), the degenerate points, and optionally the rank
    of a user's set written in index notation (`check`)."""
    from polyfid.invariants.graphs import parse_contraction

    if not 0 <= l_max <= 3:
        raise ConfigError(f"l_max must be 0..3 (Cartesian harmonics are built up to l = 3), got {l_max}")
    if not 1 <= max_tensors <= 6:
        raise ConfigError(f"max_tensors must be 1..6, got {max_tensors}")
    types = hiphop_types(l_max)
    points = random_points(types, n_points, seed)
    cands = enumerate_contractions(types, max_tensors)
    sel = select_independent(cands, types, points, tol)
    out: dict[str, Any] = {
        "l_max": l_max, "max_tensors": max_tensors, "tensors": {t.name: t.order for t in types},
        "candidates": len(cands), "selected": sel.rank, "required": required_rank(types, points[0]),
        "selected_invariants": sel.names(), "tolerance": tol,
        "gap": {"smallest_kept": sel.smallest_kept, "largest_rejected": sel.largest_rejected},
        "decisions": sel.decisions,
        "table": completeness_table(list(range(l_max + 1)), list(range(1, max_tensors + 1)), n_points, seed, tol),
    }
    out["complete"] = out["selected"] == out["required"]
    if check:
        graphs = [parse_contraction(text, types) for text in check]
        pool = cands + [g for g in graphs if g not in cands]
        idx = [pool.index(g) for g in graphs]
        out["check"] = {"invariants": check, "rank": rank_of(idx, pool, types, points[0], tol),
                        "required": out["required"]}
    if degenerate and l_max >= 1:
        out["degenerate"] = degenerate_report(l_max, max_tensors, seed=seed, tol=tol, generic=sel)
    return out
