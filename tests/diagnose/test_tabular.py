"""The linear-versus-nonlinear diagnostic on tables with known laws."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polyfid.diagnose import diagnose, read_table, reset_test, write_report
from polyfid.diagnose.features import FeatureLibrary, PerVariableTransform
from polyfid.diagnose.sisso import SissoRegressor
from polyfid.errors import DataError


def additive_table(n: int = 200, noise: float = 0.05, seed: int = 0):
    """y = 2 x1 + 3 log(x2) - 1.5 x1 x3 + noise, x in [1, 4]; x4 is irrelevant."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(1.0, 4.0, size=(n, 4))
    y = 2 * X[:, 0] + 3 * np.log(X[:, 1]) - 1.5 * X[:, 0] * X[:, 2] + noise * rng.normal(size=n)
    return X, y, ["x1", "x2", "x3", "x4"]


def nonlinear_table(n: int = 300, seed: int = 1):
    """y = sin(3 x1) cos(2 x2) + 0.5 exp(-4 x3^2): no transform or product of the library fits it."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.5, 1.5, size=(n, 3))
    y = np.sin(3 * X[:, 0]) * np.cos(2 * X[:, 1]) + 0.5 * np.exp(-4 * X[:, 2] ** 2) + 0.02 * rng.normal(size=n)
    return X, y, ["a", "b", "c"]


def test_per_variable_transform_picks_the_right_one_and_stays_finite() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.uniform(0.1, 5, 300), rng.uniform(-2, 2, 300)])
    y = np.log(X[:, 0]) + X[:, 1] ** 2
    t = PerVariableTransform(names=("u", "v")).fit(X, y)
    assert list(t.get_feature_names_out()) == ["log(u)", "v^2"]
    out = t.transform(np.array([[-1.0, 10.0]]))  # outside the training domain: clipped, finite
    assert np.all(np.isfinite(out))


def test_feature_library_terms() -> None:
    X = np.random.default_rng(0).uniform(1, 2, size=(50, 3))
    lib = FeatureLibrary(names=("a", "b", "c")).fit(X)
    names = list(lib.get_feature_names_out())
    assert "log(a)" in names and "a*1/b" in names and "a*b*c" in names
    pairs = [t for t in lib.terms_ if len(t) == 2]
    assert pairs and all(p[0][0] != p[1][0] for p in pairs)  # a product never repeats a variable
    F = lib.transform(X)
    np.testing.assert_allclose(F[:, names.index("a*b*c")], X.prod(axis=1))
    assert F.shape == (50, len(names))


def test_sisso_finds_the_law() -> None:
    X, y, names = additive_table(noise=0.0)
    lib = FeatureLibrary(names=tuple(names)).fit(X)
    F = lib.transform(X)
    s = SissoRegressor(max_dim=3).fit(F, y)
    terms = {lib.get_feature_names_out()[i]: c for i, c in zip(s.support_, s.coef_)}
    assert set(terms) == {"x1", "log(x2)", "x1*x3"}
    assert terms["x1"] == pytest.approx(2.0, abs=1e-6) and terms["log(x2)"] == pytest.approx(3.0, abs=1e-6)
    assert terms["x1*x3"] == pytest.approx(-1.5, abs=1e-6)


def test_reset_flags_a_neglected_square() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (200, 1))
    assert reset_test(x, 1 + 2 * x[:, 0] + 0.05 * rng.normal(size=200))["p_value"] > 0.01
    assert reset_test(x, x[:, 0] ** 2 + 0.05 * rng.normal(size=200))["p_value"] < 1e-6


def test_additive_law_with_interactions_needs_no_network(tmp_path) -> None:
    X, y, names = additive_table()
    d = diagnose(X, y, names, quick=True, n_jobs=2)
    assert d.verdict == "linear", d.evidence
    terms = d.formula_terms
    assert set(terms) == {"1", "x1", "log(x2)", "x1*x3"}, d.formula
    assert terms["x1"] == pytest.approx(2.0, rel=0.05) and terms["x1*x3"] == pytest.approx(-1.5, rel=0.05)
    best = d.comparison["best_interpretable"]
    assert best in ("lasso", "sisso", "multilinear")
    assert d.models[best]["mae"] < 0.1
    report = write_report(d, tmp_path)
    assert "**Verdict: linear**" in report.read_text() and (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_strong_nonlinearity_needs_a_network() -> None:
    X, y, names = nonlinear_table()
    d = diagnose(X, y, names, quick=True, n_jobs=2)
    assert d.verdict == "nonlinear", d.evidence
    assert d.comparison["best_nonlinear"] in ("kernel_ridge", "neural_network", "gradient_boosting")
    assert d.comparison["relative_gain"] > 0.3 and d.comparison["p_value"] < 0.05
    sizes = d.curves["kernel_ridge"]["train_size"]
    assert len(sizes) == 3 and sizes[0] < sizes[1] < sizes[2]


def test_bad_tables_are_named(tmp_path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("a,b,y\n" + "\n".join(f"{i},{i % 3},{2 * i}" for i in range(30)) + "\n")
    X, y, names = read_table(f, "y")
    assert names == ["a", "b"] and X.shape == (30, 2)
    with pytest.raises(DataError, match="no column 'z'"):
        read_table(f, "z")
    g = tmp_path / "g.csv"
    g.write_text("a,b,y\n" + "\n".join(f"{i},{'x' if i == 3 else i},{i}" for i in range(30)) + "\n")
    with pytest.raises(DataError, match="column 'b' is not numeric"):
        read_table(g, "y")
    h = tmp_path / "h.csv"
    h.write_text("a,y\n" + "\n".join(f"{'' if i == 4 else i},{i}" for i in range(30)) + "\n")
    with pytest.raises(DataError, match="column 'a' has a missing or non-finite value in data row 5"):
        read_table(h, "y")


def test_cli_prints_the_verdict_as_json(tmp_path, capsys) -> None:
    from polyfid.cli.main import main

    X, y, names = additive_table(n=120)
    f = tmp_path / "law.csv"
    f.write_text("x1,x2,x3,x4,y\n" + "\n".join(",".join(f"{v:.8g}" for v in [*row, t]) for row, t in zip(X, y)))
    assert main(["diagnose", str(f), "--target", "y", "--json", "--quick", "--out", str(tmp_path / "r"),
                 "--jobs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "linear" and (tmp_path / "r" / "report.md").is_file()
