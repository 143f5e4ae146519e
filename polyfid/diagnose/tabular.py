"""Is a neural network worth it? Interpretable and nonlinear regressions compared on the same
repeated cross-validation splits, with learning curves, a RESET test and a verdict.

Interpretable models: linear; linear on per-variable transforms; multilinear (products of 2 and
3 variables, ridge); Lasso and a SISSO-like ℓ0 search on the library of transforms and
products. Nonlinear: kernel ridge (RBF), gradient boosting, a small neural network. Every model
tunes its hyper-parameters by inner cross-validation on its training fold only.

The verdict is "nonlinear" when the best nonlinear model's error is more than `min_gain`
(default 10%) below the best interpretable model's and the difference is significant over the
outer folds (one-sided corrected resampled t-test, Nadeau & Bengio 2003, p < 0.05); otherwise
"linear". The evidence: errors with standard errors, where the learning curves cross, whether
the nonlinear curve is still falling faster at the largest size (more data would help it), and
the RESET test for neglected nonlinearity (statsmodels) of the linear and selected models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import LassoCV, LinearRegression, RidgeCV
from sklearn.model_selection import GridSearchCV, RepeatedKFold
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from polyfid.diagnose.features import FeatureLibrary, PerVariableTransform
from polyfid.diagnose.sisso import SissoRegressor

INTERPRETABLE = ("linear", "linear_transforms", "multilinear", "lasso", "sisso")
NONLINEAR = ("kernel_ridge", "gradient_boosting", "neural_network")
ALPHAS = np.logspace(-6, 3, 19)


def model_zoo(names: tuple[str, ...], quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """The scikit-learn estimators of the diagnostic, hyper-parameters tuned by inner CV."""
    inner = 3
    names = tuple(names)
    zoo: dict[str, Any] = {
        "linear": LinearRegression(),
        "linear_transforms": make_pipeline(PerVariableTransform(names=names), StandardScaler(), RidgeCV(ALPHAS)),
        "multilinear": make_pipeline(StandardScaler(), PolynomialFeatures(3, interaction_only=True, include_bias=False),
                                     RidgeCV(ALPHAS)),
        "lasso": make_pipeline(FeatureLibrary(names=names), StandardScaler(),
                               LassoCV(cv=inner, alphas=30, max_iter=3000, tol=1e-3, selection="random",
                                       random_state=seed)),
        "sisso": make_pipeline(FeatureLibrary(names=names), SissoRegressor(max_dim=3, n_screen=12,
                                                                            cv=inner, random_state=seed)),
        "kernel_ridge": make_pipeline(StandardScaler(), GridSearchCV(
            KernelRidge(kernel="rbf"),
            {"alpha": [1e-3, 1e-2, 1e-1, 1.0], "gamma": [0.01, 0.03, 0.1, 0.3, 1.0]}, cv=inner,
            scoring="neg_mean_absolute_error")),
        "gradient_boosting": GridSearchCV(
            HistGradientBoostingRegressor(max_iter=200 if quick else 300, random_state=seed),
            {"learning_rate": [0.05, 0.15], "max_leaf_nodes": [15]} if not quick else {"learning_rate": [0.1]},
            cv=inner, scoring="neg_mean_absolute_error"),
        "neural_network": TransformedTargetRegressor(make_pipeline(StandardScaler(), GridSearchCV(
            MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=1000, random_state=seed, learning_rate_init=3e-3),
            {"alpha": [1e-4, 1e-2] if not quick else [1e-3]},
            cv=inner, scoring="neg_mean_absolute_error")), transformer=StandardScaler()),
    }
    return zoo


@dataclass
class Diagnosis:
    """What the diagnostic found (errors in the target's unit)."""

    target: str
    features: list[str]
    n_samples: int
    models: dict[str, dict[str, Any]]
    curves: dict[str, dict[str, list[float]]]
    reset: dict[str, dict[str, float]]
    formula: str
    verdict: str
    evidence: list[str]
    comparison: dict[str, Any] = field(default_factory=dict)
    formula_terms: dict[str, float] = field(default_factory=dict)  # term -> coefficient (intercept: "1")

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "target": self.target, "features": self.features,
                "n_samples": self.n_samples, "formula": self.formula, "formula_terms": self.formula_terms,
                "evidence": self.evidence,
                "comparison": self.comparison, "models": self.models, "learning_curves": self.curves,
                "reset": self.reset}


def _fit_score(model, X, y, tr, te) -> tuple[float, float]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # tuned models visit poorly converging settings on the way; their scores show it
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = clone(model).fit(X[tr], y[tr])
    err = m.predict(X[te]) - y[te]
    return float(np.mean(np.abs(err))), float(np.sqrt(np.mean(err**2)))


def corrected_ttest(d: np.ndarray, n_train: int, n_test: int) -> tuple[float, float]:
    """One-sided corrected resampled t-test (Nadeau & Bengio) of mean(d) > 0; (t, p)."""
    from scipy import stats

    j = len(d)
    var = np.var(d, ddof=1) * (1.0 / j + n_test / n_train)
    if var <= 0:
        return (np.inf if d.mean() > 0 else 0.0), (0.0 if d.mean() > 0 else 1.0)
    t = float(d.mean() / np.sqrt(var))
    return t, float(stats.t.sf(t, j - 1))


def reset_test(X: np.ndarray, y: np.ndarray, power: int = 3) -> dict[str, float]:
    """Ramsey's RESET on an OLS fit of y on X (statsmodels): F statistic and p-value; a small p
    says powers of the fitted values explain what the linear model misses."""
    import statsmodels.api as sm
    from statsmodels.stats.diagnostic import linear_reset

    res = sm.OLS(y, sm.add_constant(X, has_constant="add")).fit()
    r = linear_reset(res, power=power, use_f=True)
    return {"F": float(r.fvalue), "p_value": float(r.pvalue), "power": power}


def diagnose(
    X: np.ndarray,
    y: np.ndarray,
    feature_names: list[str] | None = None,
    target: str = "y",
    quick: bool = False,
    n_repeats: int | None = None,
    n_splits: int = 5,
    train_fractions: tuple[float, ...] | None = None,
    min_gain: float = 0.10,
    models: tuple[str, ...] = INTERPRETABLE + NONLINEAR,
    n_jobs: int = 1,
    seed: int = 0,
) -> Diagnosis:
    """Run every model on the same repeated K-fold splits and at several training sizes.

    X: (n_samples, n_features); y: (n_samples,). Training sizes are nested subsets of each
    outer training fold (`train_fractions` of it); the errors at fraction 1 are the models'
    cross-validated errors.
    """
    from joblib import Parallel, delayed

    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    names = list(feature_names or [f"x{j}" for j in range(X.shape[1])])
    n_repeats = n_repeats or (1 if quick else 3)
    fractions = tuple(train_fractions or ((0.2, 0.5, 1.0) if quick else (0.1, 0.2, 0.35, 0.6, 1.0)))
    if fractions[-1] != 1.0:
        fractions += (1.0,)
    zoo = model_zoo(tuple(names), quick=quick, seed=seed)
    zoo = {k: zoo[k] for k in models}
    splits = list(RepeatedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed).split(X))
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(tr) for tr, _ in splits]  # nested training subsets per split
    jobs = [(name, s, f) for name in zoo for s in range(len(splits)) for f in fractions]

    def run(name, s, f):
        tr = orders[s][: _n_train(f, len(orders[s]))]
        return _fit_score(zoo[name], X, y, tr, splits[s][1])

    scores = Parallel(n_jobs=n_jobs)(delayed(run)(*j) for j in jobs)
    table = {j: sc for j, sc in zip(jobs, scores)}
    n_tr_full = len(splits[0][0])
    result_models: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for name in zoo:
        fold_mae = np.array([table[(name, s, 1.0)][0] for s in range(len(splits))])
        fold_rmse = np.array([table[(name, s, 1.0)][1] for s in range(len(splits))])
        result_models[name] = {
            "kind": "interpretable" if name in INTERPRETABLE else "nonlinear",
            "mae": float(fold_mae.mean()), "mae_se": float(fold_mae.std(ddof=1) / np.sqrt(len(fold_mae))),
            "rmse": float(fold_rmse.mean()), "fold_mae": fold_mae.tolist(),
        }
        curves[name] = {
            "train_size": [_n_train(f, n_tr_full) for f in fractions],
            "mae": [float(np.mean([table[(name, s, f)][0] for s in range(len(splits))])) for f in fractions],
            "mae_std": [float(np.std([table[(name, s, f)][0] for s in range(len(splits))])) for f in fractions],
        }

    formula, terms, sel_features = _formula(X, y, names, target, seed)
    reset = {"linear": reset_test(X, y)}
    if sel_features is not None and sel_features.shape[1]:
        reset["selected_formula"] = reset_test(sel_features, y)
    verdict, evidence, comparison = _verdict(result_models, curves, reset, len(splits), n_tr_full,
                                             len(X) - n_tr_full, min_gain)
    return Diagnosis(target, names, len(X), result_models, curves, reset, formula, verdict, evidence, comparison,
                     terms)


def _n_train(fraction: float, n: int) -> int:
    """Training-set size at `fraction` of an outer training fold of `n` (at least 8)."""
    return max(8, int(round(fraction * n)))


def _formula(X, y, names, target, seed) -> tuple[str, dict[str, float], np.ndarray]:
    """The SISSO-like model of the zoo (the one cross-validated) fitted on all data: formula,
    {term: coefficient}, selected columns."""
    pipe = clone(model_zoo(tuple(names), seed=seed)["sisso"]).fit(X, y)
    lib, sis = pipe[0], pipe[-1]
    F = lib.transform(X)
    fn = lib.get_feature_names_out()
    terms = {"1": sis.intercept_} | {str(fn[i]): float(c) for i, c in zip(sis.support_, sis.coef_)}
    return sis.formula(fn, target), terms, F[:, list(sis.support_)]


def _slope(curve: dict[str, list[float]]) -> float:
    """d log(MAE) / d log(n) between the two largest training sizes."""
    n, e = curve["train_size"][-2:], curve["mae"][-2:]
    return float(np.log(e[1] / e[0]) / np.log(n[1] / n[0])) if n[1] > n[0] and min(e) > 0 else 0.0


def _verdict(models, curves, reset, n_folds, n_train, n_test, min_gain):
    interp = [m for m in models if m in INTERPRETABLE]
    nonlin = [m for m in models if m in NONLINEAR]
    if not interp or not nonlin:
        raise ValueError("the diagnostic needs at least one interpretable and one nonlinear model")
    bi = min(interp, key=lambda m: models[m]["mae"])
    bn = min(nonlin, key=lambda m: models[m]["mae"])
    d = np.array(models[bi]["fold_mae"]) - np.array(models[bn]["fold_mae"])
    t, p = corrected_ttest(d, n_train, n_test)
    gain = float(d.mean() / models[bi]["mae"])
    nonlinear = gain > min_gain and p < 0.05
    ci, cn = curves[bi], curves[bn]
    cross = None
    for k in range(1, len(ci["mae"])):
        before = cn["mae"][k - 1] - ci["mae"][k - 1]
        after = cn["mae"][k] - ci["mae"][k]
        if before * after < 0:
            cross = int(ci["train_size"][k - 1] + (ci["train_size"][k] - ci["train_size"][k - 1])
                        * before / (before - after))
    si, sn = _slope(ci), _slope(cn)
    more_data = sn < si - 0.05 and sn < -0.05
    ev = [
        f"best interpretable model: {bi}, MAE {models[bi]['mae']:.4g} ± {models[bi]['mae_se']:.2g}; "
        f"best nonlinear model: {bn}, MAE {models[bn]['mae']:.4g} ± {models[bn]['mae_se']:.2g} "
        f"({n_folds} outer folds, same splits)",
        f"the nonlinear model's error is {100 * gain:+.1f}% lower (corrected t = {t:.2f}, one-sided p = {p:.3g}); "
        f"the threshold is {100 * min_gain:.0f}% and p < 0.05",
        ("the learning curves cross near n = " + str(cross)) if cross is not None
        else "the learning curves of the two best models do not cross over the sizes tried",
        f"log-log slopes at the largest sizes: {bi} {si:.2f}, {bn} {sn:.2f}: "
        + ("more data is expected to help the nonlinear model more" if more_data
           else "more data is not expected to change the ranking much"),
        f"RESET on the linear model: p = {reset['linear']['p_value']:.3g}"
        + (" (neglected nonlinearity)" if reset["linear"]["p_value"] < 0.05
           else " (no neglected nonlinearity detected)"),
    ]
    if "selected_formula" in reset:
        p_sel = reset["selected_formula"]["p_value"]
        ev.append(f"RESET on the selected formula's terms: p = {p_sel:.3g}"
                  + (" (nonlinearity left)" if p_sel < 0.05 else " (no nonlinearity left detected)"))
    comparison = {"best_interpretable": bi, "best_nonlinear": bn, "relative_gain": gain, "t": t, "p_value": p,
                  "crossing_train_size": cross, "slope_interpretable": si, "slope_nonlinear": sn,
                  "more_data_helps_nonlinear": more_data}
    return ("nonlinear" if nonlinear else "linear"), ev, comparison
