"""The diagnostic's report: a Markdown file with the table, formula, tests, verdict and plots."""

from __future__ import annotations

import json
from pathlib import Path

from polyfid.diagnose.tabular import INTERPRETABLE, Diagnosis


def plot_learning_curves(d: Diagnosis, path: str | Path, unit: str = "") -> Path:
    """MAE against training-set size for every model (log-log); interpretable solid, nonlinear dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyfid.analysis.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, c) in enumerate(d.curves.items()):
        style = "-" if name in INTERPRETABLE else "--"
        ax.errorbar(c["train_size"], c["mae"], yerr=c["mae_std"], fmt=style + "o", ms=3, capsize=2,
                    color=f"C{k}", label=name)
    ax.set(xscale="log", yscale="log", xlabel="training set size", ylabel=f"MAE of {d.target} {unit}".strip(),
           title=f"{d.target}: verdict {d.verdict}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_report(d: Diagnosis, out: str | Path, title: str = "", unit: str = "") -> Path:
    """Write out/report.md, out/learning_curves.png and out/diagnosis.json; returns the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(d, out / "learning_curves.png", unit)
    (out / "diagnosis.json").write_text(json.dumps(d.to_dict(), indent=2))
    u = f" ({unit})" if unit else ""
    lines = [
        f"# Is a neural network worth it? {title or d.target}",
        "",
        f"**Verdict: {d.verdict}** — " + ("a nonlinear model is clearly better here."
                                           if d.verdict == "nonlinear" else
                                           "an interpretable linear model does as well; no network needed."),
        "",
        f"{d.n_samples} samples, {len(d.features)} variables ({', '.join(d.features)}), target `{d.target}`.",
        "",
        "## Evidence",
        "",
        *[f"- {e}" for e in d.evidence],
        "",
        "## Selected interpretable formula (SISSO-like search on transforms and products, all data)",
        "",
        f"`{d.formula}`",
        "",
        f"## Cross-validated errors{u}",
        "",
        "| model | kind | MAE | ± s.e. | RMSE |",
        "|---|---|---|---|---|",
        *[f"| {n} | {m['kind']} | {m['mae']:.4g} | {m['mae_se']:.2g} | {m['rmse']:.4g} |"
          for n, m in sorted(d.models.items(), key=lambda kv: kv[1]["mae"])],
        "",
        "## Learning curves",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "| model | " + " | ".join(f"n={n}" for n in next(iter(d.curves.values()))["train_size"]) + " |",
        "|---|" + "---|" * len(next(iter(d.curves.values()))["train_size"]),
        *[f"| {n} | " + " | ".join(f"{v:.4g}" for v in c["mae"]) + " |" for n, c in d.curves.items()],
        "",
        "## RESET (Ramsey) tests for neglected nonlinearity",
        "",
        *[f"- {k}: F = {v['F']:.3g}, p = {v['p_value']:.3g} (powers 2..{v['power']} of the fitted values)"
          for k, v in d.reset.items()],
        "",
        "Method: every model is fitted on the same repeated K-fold training folds (hyper-parameters by inner "
        "cross-validation on the training fold only) and at nested subsets of them for the learning curves. "
        "The verdict is nonlinear when the best nonlinear model's MAE is lower by more than the threshold and "
        "significantly so (corrected resampled t-test).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
