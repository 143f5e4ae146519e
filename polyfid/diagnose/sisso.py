"""A SISSO-like sparse regression: sure independence screening plus exhaustive ℓ0 search.

For dimension d = 1, 2, ...: the `n_screen` library columns most correlated with the current
residual join the candidate pool; every d-subset of the pool is fitted by least squares (all
at once, batched normal equations) and the best kept, then improved by single-term swaps
against the whole library while the error falls. The dimension is chosen by inner K-fold
cross-validation (the smallest d within 2% of the best error), as in SISSO (Ouyang et al.,
Phys. Rev. Mater. 2, 083802, 2018), without its recursive operator-built feature space: the
library here is the fixed one of :class:`~polyfid.diagnose.features.FeatureLibrary`.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.model_selection import KFold


def _best_subset(F: np.ndarray, y: np.ndarray, pool: list[int], d: int) -> tuple[tuple[int, ...], np.ndarray]:
    """The d-subset of `pool` with the least squared error (intercept included); (subset, coef)."""
    return _best_of(F, y, np.array(list(combinations(pool, d))))[:2]


def _best_of(F: np.ndarray, y: np.ndarray, combos: np.ndarray) -> tuple[tuple[int, ...], np.ndarray, float]:
    """The least-squares best of the column subsets `combos` (n_combos, d): (subset, coef, rss)."""
    d = combos.shape[1]
    best_rss, best, best_coef = np.inf, None, None
    for chunk in np.array_split(combos, max(1, len(combos) // 4000 + 1)):
        X = np.concatenate([np.ones((len(chunk), len(y), 1)), F[:, chunk].transpose(1, 0, 2)], axis=2)
        G = np.einsum("cni,cnj->cij", X, X) + 1e-10 * np.eye(d + 1)
        b = np.einsum("cni,n->ci", X, y)
        coef = np.linalg.solve(G, b[..., None])[..., 0]
        rss = ((y[None] - np.einsum("cni,ci->cn", X, coef)) ** 2).sum(axis=1)
        k = int(np.argmin(rss))
        if rss[k] < best_rss:
            best_rss, best, best_coef = float(rss[k]), tuple(int(i) for i in chunk[k]), coef[k]
    return best, best_coef, best_rss


def _refine(F: np.ndarray, y: np.ndarray, subset: tuple[int, ...], usable: np.ndarray, n_pair: int = 20):
    """ℓ0 local search: replace one term by any library column, or two terms by one of the
    `n_pair` columns most correlated with the residual and any other, while that lowers the error
    (screening can leave the right terms out of the pool; swaps bring them back)."""
    cand = np.flatnonzero(usable)
    Fz = (F[:, cand] - F[:, cand].mean(0)) / F[:, cand].std(0)
    best, coef, rss = _best_of(F, y, np.array([subset]))
    for _ in range(20):
        trials = []
        for k in range(len(best)):  # single swaps, whole library
            rest = [i for j, i in enumerate(best) if j != k]
            others = cand[~np.isin(cand, best)]
            trials.append(np.column_stack([np.repeat([rest], len(others), axis=0), others]) if rest
                          else others[:, None])
        if len(best) >= 2 and n_pair:  # pair swaps among the columns that explain the residual best
            resid = y - coef[0] - F[:, list(best)] @ coef[1:]
            top = cand[np.argsort(-np.abs(Fz.T @ (resid - resid.mean())))[:n_pair]]
            top = top[~np.isin(top, best)]
            others = cand[~np.isin(cand, best)]
            pairs = np.array([(a, b) for a in top for b in others if a != b])
            for k1, k2 in combinations(range(len(best)), 2):
                rest = [i for j, i in enumerate(best) if j not in (k1, k2)]
                if len(pairs):
                    trials.append(np.column_stack([np.repeat([rest], len(pairs), axis=0), pairs]) if rest
                                  else pairs)
        s_new, c_new, r = _best_of(F, y, np.concatenate(trials))
        if r >= rss * (1 - 1e-9):
            break
        best, coef, rss = s_new, c_new, r
    return best, coef


def _rss(F, y, subset, coef) -> float:
    return float(((y - coef[0] - F[:, list(subset)] @ coef[1:]) ** 2).sum())


def _path(F: np.ndarray, y: np.ndarray, max_dim: int, n_screen: int,
          pair_swaps: bool = True) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Best models of dimension 1..max_dim on (F, y); pair swaps off: single swaps only (faster)."""
    n_pair = 20 if pair_swaps else 0
    std = F.std(axis=0)
    usable = std > 1e-12
    Fz = np.where(usable, (F - F.mean(axis=0)) / np.where(usable, std, 1.0), 0.0)
    resid = y - y.mean()
    pool: list[int] = []
    models = []
    greedy: tuple[int, ...] = ()
    cand = np.flatnonzero(usable)
    for d in range(1, max_dim + 1):
        score = np.abs(Fz.T @ (resid - resid.mean()))
        score[~usable] = -1
        score[pool] = -1
        new = [int(i) for i in np.argsort(-score)[:n_screen] if score[i] >= 0]
        pool += new
        if len(pool) < d:
            break
        subset, _ = _best_subset(F, y, pool, d)
        subset, coef = _refine(F, y, subset, usable, n_pair)
        # a second start: forward selection over the whole library (then the same swaps)
        others = cand[~np.isin(cand, greedy)]
        add = _best_of(F, y, np.column_stack([np.repeat([list(greedy)], len(others), axis=0), others])
                       if greedy else others[:, None])[0]
        greedy, g_coef = _refine(F, y, tuple(add), usable, n_pair)
        if _rss(F, y, greedy, g_coef) < _rss(F, y, subset, coef):
            subset, coef = greedy, g_coef
        models.append((subset, coef))
        resid = y - coef[0] - F[:, list(subset)] @ coef[1:]
    return models


class SissoRegressor(RegressorMixin, BaseEstimator):
    """Sparse linear model on a feature library: y ≈ c0 + Σ_k c_k F[:, s_k], |s| ≤ max_dim."""

    def __init__(self, max_dim: int = 3, n_screen: int = 10, cv: int = 3, random_state: int = 0) -> None:
        self.max_dim = max_dim
        self.n_screen = n_screen
        self.cv = cv
        self.random_state = random_state

    def fit(self, F, y):
        F = np.asarray(F, dtype=float)
        y = np.asarray(y, dtype=float)
        errors = np.zeros(self.max_dim)
        counts = np.zeros(self.max_dim)
        for tr, te in KFold(self.cv, shuffle=True, random_state=self.random_state).split(F):
            # the inner folds only choose the dimension: single swaps suffice there
            for d, (s, c) in enumerate(_path(F[tr], y[tr], self.max_dim, self.n_screen, pair_swaps=False)):
                errors[d] += np.mean((y[te] - c[0] - F[te][:, list(s)] @ c[1:]) ** 2)
                counts[d] += 1
        cv_mse = np.where(counts > 0, errors / np.maximum(counts, 1), np.inf)
        self.cv_mse_ = cv_mse
        self.dim_ = int(np.flatnonzero(cv_mse <= cv_mse.min() * 1.02)[0]) + 1
        path = _path(F, y, self.dim_, self.n_screen)
        self.support_, coef = path[-1]
        self.intercept_, self.coef_ = float(coef[0]), np.asarray(coef[1:])
        return self

    def predict(self, F):
        F = np.asarray(F, dtype=float)
        return self.intercept_ + F[:, list(self.support_)] @ self.coef_

    def formula(self, names, target: str = "y") -> str:
        terms = [f"{c:+.4g}*{names[i]}" for c, i in zip(self.coef_, self.support_)]
        return f"{target} = {self.intercept_:.4g} " + " ".join(terms)
