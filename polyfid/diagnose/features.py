"""Feature libraries for interpretable regression: per-variable transforms and products.

Transforms of a variable x: ``x``, ``log(x)`` (x > 0), ``sqrt(x)`` (x ≥ 0), ``x^2``, ``1/x``
(x of one sign, away from 0). A transform is available for a variable only where the
training data lie in its domain; at prediction time inputs are clipped into the training
domain so that an unseen value never produces NaN.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

TRANSFORMS = ("x", "log", "sqrt", "x^2", "1/x")


def _valid(kind: str, x: np.ndarray) -> bool:
    lo, hi = float(np.min(x)), float(np.max(x))
    if kind != "x" and len(np.unique(x)) < 3:
        return False  # a binary variable: any transform is an affine map of it (or a constant)
    if kind == "log":
        return lo > 0
    if kind == "sqrt":
        return lo >= 0
    if kind == "1/x":
        return lo > 0 or hi < 0
    if kind == "x^2":
        return hi > lo  # constant columns carry nothing
    return True


def _apply(kind: str, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if kind == "x":
        return x
    x = np.clip(x, lo, hi)
    if kind == "log":
        return np.log(x)
    if kind == "sqrt":
        return np.sqrt(x)
    if kind == "x^2":
        return x**2
    return 1.0 / x


def _name(kind: str, var: str) -> str:
    return {"x": var, "log": f"log({var})", "sqrt": f"sqrt({var})", "x^2": f"{var}^2", "1/x": f"1/{var}"}[kind]


class PerVariableTransform(TransformerMixin, BaseEstimator):
    """One transform per variable: the valid one whose output correlates best (|Pearson r|)
    with the target on the training data."""

    def __init__(self, candidates: tuple[str, ...] = TRANSFORMS, names: tuple[str, ...] | None = None) -> None:
        self.candidates = candidates
        self.names = names

    def fit(self, X, y):
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float)
        self.lo_, self.hi_ = X.min(axis=0), X.max(axis=0)
        self.kinds_ = []
        for j in range(X.shape[1]):
            best, score = "x", -1.0
            for kind in self.candidates:
                if not _valid(kind, X[:, j]):
                    continue
                t = _apply(kind, X[:, j], self.lo_[j], self.hi_[j])
                r = abs(np.corrcoef(t, y)[0, 1]) if np.std(t) > 0 else 0.0
                if np.isfinite(r) and r > score + 1e-12:
                    best, score = kind, r
            self.kinds_.append(best)
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        return np.column_stack([_apply(k, X[:, j], self.lo_[j], self.hi_[j]) for j, k in enumerate(self.kinds_)])

    def get_feature_names_out(self, input_features=None):
        names = self.names or [f"x{j}" for j in range(len(self.kinds_))]
        return np.array([_name(k, n) for k, n in zip(self.kinds_, names)])


class FeatureLibrary(TransformerMixin, BaseEstimator):
    """Candidate terms for sparse regression: every valid transform of every variable, products
    of two such terms of different variables, and products of three raw variables."""

    def __init__(self, names: tuple[str, ...] | None = None, triples: bool = True) -> None:
        self.names = names
        self.triples = triples

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=float)
        self.lo_, self.hi_ = X.min(axis=0), X.max(axis=0)
        names = self.names or [f"x{j}" for j in range(X.shape[1])]
        self.primary_ = [(j, k) for j in range(X.shape[1]) for k in TRANSFORMS
                         if _valid(k, X[:, j]) and X[:, j].std() > 0]
        terms: list[tuple[tuple[int, str], ...]] = [(p,) for p in self.primary_]
        terms += [(a, b) for a, b in combinations(self.primary_, 2) if a[0] != b[0]]
        if self.triples:
            raw = [(j, "x") for j in range(X.shape[1]) if X[:, j].std() > 0]
            terms += list(combinations(raw, 3))
        self.terms_ = terms
        self.feature_names_ = np.array(["*".join(_name(k, names[j]) for j, k in t) for t in terms])
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        cache = {p: _apply(p[1], X[:, p[0]], self.lo_[p[0]], self.hi_[p[0]]) for p in self.primary_}
        cache.update({(j, "x"): X[:, j] for j in range(X.shape[1])})
        out = np.empty((len(X), len(self.terms_)))
        for c, t in enumerate(self.terms_):
            v = cache[t[0]]
            for p in t[1:]:
                v = v * cache[p]
            out[:, c] = v
        return out

    def get_feature_names_out(self, input_features=None):
        return self.feature_names_
