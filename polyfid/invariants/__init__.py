"""Optimal (functionally independent) invariant sets of Cartesian tensors.

graphs: candidates as contraction multigraphs, enumerated up to isomorphism; jacobian: their
values and Jacobian on the tensors' coordinates, and rotation-orbit dimensions; select: the
greedy rank selection, the (L, N) completeness table and the degenerate-point analysis.
"""

from polyfid.invariants.graphs import (
    Contraction,
    TensorType,
    brute_force_count,
    enumerate_contractions,
    parse_contraction,
)
from polyfid.invariants.jacobian import evaluate, jacobian, orbit_dimension
from polyfid.invariants.select import (
    Selection,
    completeness_table,
    degenerate_report,
    hiphop_types,
    invariant_report,
    random_points,
    rank_of,
    required_rank,
    select_independent,
)

__all__ = [
    "Contraction", "TensorType", "brute_force_count", "enumerate_contractions", "parse_contraction",
    "evaluate", "jacobian", "orbit_dimension", "Selection", "completeness_table", "degenerate_report",
    "hiphop_types", "invariant_report", "random_points", "rank_of", "required_rank", "select_independent",
]
