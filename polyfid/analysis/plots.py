"""Loss curves and parity plots, saved as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from polyfid.errors import ConfigError  # noqa: E402


def figure_formats() -> list[str]:
    """File suffixes (no dot) matplotlib can write a figure as: png, pdf, svg, ..."""
    from matplotlib.figure import Figure

    return sorted(Figure().canvas.get_supported_filetypes())


def check_figure_path(path: str | Path, flag: str | None = None) -> Path:
    """`path` as a Path if matplotlib can write a figure with its suffix (none: PNG); else a
    ConfigError naming `flag` (if given), the path and the formats there are."""
    path = Path(path)
    suffix = path.suffix.lower().removeprefix(".")
    if suffix and suffix not in figure_formats():
        where = f"{flag} {path}" if flag else str(path)
        raise ConfigError(f"{where}: cannot save a figure as '.{suffix}'; use one of "
                          + ", ".join(f".{s}" for s in figure_formats()))
    return path


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay out `fig`, write it at `path` (format from the suffix, PNG without one; folders made)
    and close it; returns the path. An unsupported suffix is a ConfigError."""
    try:
        path = check_figure_path(path)
    except ConfigError:
        plt.close(fig)
        raise
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_loss_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Training loss and validation errors against epoch, log scale."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in sorted({k for h in history for k in h}):
        if key.startswith("train_") and key != "train_steps":
            axes[0].plot(epochs, [h.get(key, np.nan) for h in history], label=key)
        if key.startswith("val_") and ("mae" in key and "per_atom" not in key):
            axes[1].plot(epochs, [h.get(key, np.nan) for h in history], label=key.removeprefix("val_"))
    axes[0].set(xlabel="epoch", ylabel="loss term (eV², (eV/Å)²)", yscale="log", title="training")
    axes[1].set(xlabel="epoch", ylabel="MAE (meV, meV/Å)", yscale="log", title="validation")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_parity(metrics: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Predicted vs reference energies per atom and force components, one row per fidelity."""
    arrays = metrics["_arrays"]
    fids = [f for f in arrays if arrays[f]]
    fig, axes = plt.subplots(max(len(fids), 1), 2, figsize=(9, 4 * max(len(fids), 1)), squeeze=False)
    for row, fid in zip(axes, fids):
        a, m = arrays[fid], metrics[fid]
        for ax, kind, unit, mae_key in (
            (row[0], "energy", "eV/atom", "energy_mae_meV"),
            (row[1], "forces", "eV/Å", "force_mae_meV_A"),
        ):
            if f"{kind}_ref" not in a:
                ax.set_visible(False)
                continue
            ref, pred = a[f"{kind}_ref"], a[f"{kind}_pred"]
            if kind == "energy":
                ref, pred = ref - ref.mean(), pred - ref.mean()
            ax.scatter(ref, pred, s=2, alpha=0.4)
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            unit_mae = "meV" if kind == "energy" else "meV/Å"
            ax.set(xlabel=f"reference {kind} ({unit})", ylabel=f"predicted {kind} ({unit})",
                   title=f"{title} {fid}: MAE {m[mae_key]:.3g} {unit_mae}".strip())
    return save_figure(fig, path)
