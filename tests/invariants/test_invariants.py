"""The invariant tooling: enumeration against brute force, rank selection, orbit dimensions,
degenerate points, index notation and the command."""

from __future__ import annotations

import json

import pytest
import torch

from polyfid.cli.main import main
from polyfid.invariants import (
    TensorType,
    brute_force_count,
    completeness_table,
    degenerate_report,
    enumerate_contractions,
    evaluate,
    hiphop_types,
    orbit_dimension,
    parse_contraction,
    random_points,
    rank_of,
    select_independent,
)
from polyfid.invariants.jacobian import coordinates_from_tensors, tensors_from_coordinates
from polyfid.models.layers.tensors import INDEX_NOTATION, INVARIANTS, invariants


def _rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def _rotate(tensors: list[torch.Tensor], rot: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in tensors:
        for slot in range(t.dim()):
            t = torch.movedim(torch.tensordot(rot, t, dims=([1], [slot])), 0, slot)
        out.append(t)
    return out


@pytest.mark.parametrize("l_max,max_tensors", [(l_, n) for l_ in range(4) for n in range(1, 5)])
def test_enumeration_matches_brute_force(l_max, max_tensors):
    types = hiphop_types(l_max)
    assert len(enumerate_contractions(types, max_tensors)) == brute_force_count(types, max_tensors)


def test_enumeration_with_two_vectors_matches_brute_force():
    types = [TensorType("u", 1), TensorType("w", 1), TensorType("Q", 2)]
    cands = enumerate_contractions(types, 3)
    assert len(cands) == brute_force_count(types, 3)
    # u·u, u·w, w·w, Q:Q, and the five of three factors: uQu, uQw, wQw, trQ³ (no u·u·w: odd order)
    assert len(cands) == 8


def test_isomorphic_notations_give_one_graph():
    types = hiphop_types(3)
    a = parse_contraction("v_a Q_ab v_b", types)
    assert a == parse_contraction("Q_ba v_b v_a", types) == parse_contraction("v_x v_y Q_xy", types)
    assert a in enumerate_contractions(types, 3)
    assert parse_contraction("T_abc T_abd Q_cd", types) != parse_contraction("v_a Q_bc T_abc", types)


@pytest.mark.parametrize("text,problem", [
    ("v_a v_a v_a", "exactly twice"), ("Q_aa", "exactly twice"), ("v_ab v_ab", "indices"),
    ("X_a X_a", "unknown tensor"), ("v_a v_a Q_bc Q_bc", "disconnected"),
])
def test_parse_errors_name_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_contraction(text, hiphop_types(3))


def test_candidates_are_rotation_invariant_and_not_identically_zero():
    types = hiphop_types(3)
    cands = enumerate_contractions(types, 4)
    x = random_points(types, 1, seed=3)[0]
    rotated = coordinates_from_tensors(_rotate(tensors_from_coordinates(x, types), _rotation(5)), types)
    v0, v1 = evaluate(cands, x, types), evaluate(cands, rotated, types)
    torch.testing.assert_close(v0, v1, rtol=1e-10, atol=1e-10)
    assert (v0.abs() > 1e-6).all()


def test_design_invariants_match_the_model_and_are_complete():
    """The 13 invariants HIP-HOP-NN computes (einsum code) equal their index-notation graphs
    evaluated here, and those graphs have full rank 13."""
    types = hiphop_types(3)
    names = list(INVARIANTS)
    graphs = [parse_contraction(INDEX_NOTATION[k], types) for k in names]
    x = random_points(types, 1, seed=7)[0]
    tensors = tensors_from_coordinates(x, types)
    parts = [tensors[0].reshape(1, 1)] + [t.unsqueeze(0).unsqueeze(-1) for t in tensors[1:]]
    model = invariants(parts, names)[0, :, 0]
    torch.testing.assert_close(model, evaluate(graphs, x, types), rtol=1e-10, atol=1e-10)
    assert rank_of(list(range(13)), graphs, types, x) == 13


def test_table_reproduces_thirteen_of_thirteen():
    rows = {(r["l_max"], r["max_tensors"]): r for r in completeness_table([1, 2, 3], [2, 3, 4])}
    assert (rows[3, 4]["candidates"], rows[3, 4]["selected"], rows[3, 4]["required"]) == (20, 13, 13)
    assert rows[1, 2]["required"] == 2 and rows[1, 2]["selected"] == 2  # only l ≤ 1: orbit of dimension 2
    assert rows[2, 4]["selected"] == rows[2, 4]["required"] == 6
    assert rows[3, 3]["selected"] < 13  # three factors are not enough at l = 3
    # a clear gap separates what was kept from what was rejected
    assert rows[3, 4]["smallest_kept"] > 1e-4
    assert rows[3, 4]["largest_rejected"] < 1e-10


def test_dependent_candidates_are_rejected():
    types = hiphop_types(2)
    # tr Q⁴ = ½ (tr Q²)² for traceless symmetric 3×3 Q (Cayley–Hamilton)
    cands = [parse_contraction(t, types) for t in ("Q_ab Q_ab", "Q_ab Q_bc Q_cd Q_da", "Q_ab Q_bc Q_ca")]
    sel = select_independent(cands, types, random_points(types, 2))
    assert [d["kept"] for d in sel.decisions] == [True, False, True]


def test_orbit_dimensions():
    vec = [TensorType("s", 0), TensorType("v", 1)]
    assert orbit_dimension(torch.tensor([1.0, 0.3, -0.2, 0.5], dtype=torch.float64), vec) == 2
    assert orbit_dimension(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), vec) == 0
    types = hiphop_types(3)
    assert orbit_dimension(random_points(types, 1)[0], types) == 3


def test_degenerate_points_lose_rank_and_extras_restore_it():
    r = degenerate_report(3, 4)
    types = hiphop_types(3)
    pool = enumerate_contractions(types, 5)
    from polyfid.invariants.select import degenerate_points

    point = degenerate_points(types, 1)["vector zero"]
    d = r["points"]["vector zero"]
    assert d["rank_selected"] < d["rank_all_candidates"] and not d["complete"]
    chosen = [parse_contraction(t, types) for t in r["generic_selected"] + d["restoring_candidates"]]
    assert rank_of([pool.index(c) for c in chosen], pool, types, point) == d["rank_all_candidates"]
    # a tetrahedral environment has v = Q = 0; every invariant's gradient lies in its 2 symmetric directions
    assert r["points"]["tetrahedral environment"]["rank_all_candidates"] == 2
    assert r["points"]["linear environment"]["complete"]


def test_command_prints_the_counts(capsys):
    assert main(["invariants", "--l-max", "3", "--max-tensors", "4", "--json", "--no-degenerate",
                 "--check", *INDEX_NOTATION.values()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["candidates"], out["selected"], out["required"]) == (20, 13, 13)
    assert out["check"]["rank"] == 13
    assert main(["invariants", "--check", "v_a v_a v_a"]) == 2
