"""The multi-fidelity demo (``polyfid demo``): cheap forces for many structures plus expensive
energies for a few give a far better high-level potential than the expensive energies alone.

1. Sample: GFN2-xTB Langevin MD of ethanol at several temperatures (a training pool) and, from
   other seeds, a held-out set (:mod:`polyfid.sample`).
2. Label, through the resumable store (:mod:`polyfid.label`): GFN2-xTB energies and forces for
   the pool; MP2/cc-pVDZ energies (PySCF) for N pool structures picked by farthest-point
   sampling; MP2/cc-pVDZ energies and forces for the held-out set. A cost estimate comes first.
3. Train, on the same wall-clock budget and at the same time (one process and thread each):
   the multi-fidelity model (``transfer``: a HIP-NN trained on the xTB forces, fine-tuned on
   the N MP2 energies) and a HIP-NN trained on the N MP2 energies alone.
4. Test both against MP2 energies and forces of the held-out structures, next to GFN2-xTB
   itself and the xTB-trained network; a table, ``summary.json`` and plots.

Everything lands in the output folder; a rerun reuses the sampled structures and every label
already in the store, and retrains.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyfid.data.readers.label_store import fidelity_name


@dataclass
class MultiFidelityDemoSettings:
    """Sizes and budgets of the demo (see :func:`demo_settings` for the two presets)."""

    molecule: str = "CH3CH2OH"
    temperatures_K: list[float] = field(default_factory=lambda: [300.0, 600.0, 1000.0])
    pool_per_temperature: int = 100  # xTB-labelled training structures per temperature
    heldout_per_temperature: int = 12  # held-out test structures per temperature
    stride: int = 10  # MD steps between samples
    equilibration: int = 200
    n_high: int = 100  # pool structures with high-level energies
    low_level: str = "gfn2-xtb"
    high_level: str = "mp2/cc-pvdz"
    low_budget_s: float = 150.0  # multi-fidelity model: xTB stage
    finetune_budget_s: float = 60.0  # multi-fidelity model: high-level stage
    workers: int = 2  # labelling processes and concurrent trainings
    seed: int = 0
    model: dict = field(
        default_factory=lambda: {"n_features": 64, "n_sensitivities": 20, "soft_min": 0.85, "soft_max": 4.5,
                                 "cutoff": 5.0, "n_interactions": 2, "n_atom_layers": 2}
    )

    @property
    def budget_s(self) -> float:
        """Wall-clock training budget of each model (the energies-only model gets all of it)."""
        return self.low_budget_s + self.finetune_budget_s


def demo_settings(quick: bool = False) -> MultiFidelityDemoSettings:
    """Default: 300 pool structures, 100 with MP2 energies, 36 held out, 210 s per model
    (about 10 minutes on 2 cores). Quick: 120 / 30 / 9 and 50 s (under 3 minutes)."""
    if quick:
        return MultiFidelityDemoSettings(pool_per_temperature=40, heldout_per_temperature=3, stride=5,
                                         equilibration=100, n_high=30, low_budget_s=35.0, finetune_budget_s=15.0)
    return MultiFidelityDemoSettings()


# ---- steps -------------------------------------------------------------------------------------
def sample_sets(s: MultiFidelityDemoSettings, out: Path) -> tuple[list, list, bool]:
    """(pool, held-out) structures (Frames without labels) from xTB MD, cached as extxyz in
    `out`; True if generated now."""
    import ase.io

    from polyfid.data.readers.ase_io import frame_from_atoms
    from polyfid.sample import SampleSettings, load_structures, sample, write_structures

    files = out / "pool.extxyz", out / "heldout.extxyz"

    def frames(path: Path) -> list:
        return [frame_from_atoms(a, f"{path}:{i}") for i, a in enumerate(ase.io.read(path, ":"))]

    if all(f.exists() for f in files):
        return frames(files[0]), frames(files[1]), False
    start = load_structures(s.molecule)
    common = dict(temperatures_K=s.temperatures_K, stride=s.stride, equilibration=s.equilibration,
                  method=s.low_level)
    pool = sample(start, SampleSettings(md_frames=s.pool_per_temperature, seed=s.seed, **common))
    held = sample(start, SampleSettings(md_frames=s.heldout_per_temperature, seed=s.seed + 1000, **common))
    write_structures(files[0], pool)
    write_structures(files[1], held)
    # read back: the structures' keys (positions to 1e-8 Å) must be those of the cached files
    return frames(files[0]), frames(files[1]), True


def label_sets(s: MultiFidelityDemoSettings, pool: list, held: list, store_path: Path) -> dict[str, Any]:
    """Low-level E+F of pool and held-out; high-level energies of the farthest-point subset
    and high-level E+F of the held-out set (`pool`, `held`: Frames). Returns what was done."""
    from polyfid.label import LabelStore, estimate_cost, label_frames
    from polyfid.label.cluster import executor_for
    from polyfid.sample import farthest_point

    chosen = farthest_point(pool, s.n_high, seed=s.seed)
    info: dict[str, Any] = {"high_indices": chosen}
    with LabelStore(store_path) as st, executor_for(None, s.workers) as (ex, _):
        jobs = [
            ("low", pool + held, s.low_level, True),
            ("high_energies", [pool[i] for i in chosen], s.high_level, False),
            ("heldout_high", held, s.high_level, True),
        ]
        for name, frames, level, forces in jobs:
            est = estimate_cost(frames, level, st, forces=forces, sample=2, workers=s.workers, executor=ex)
            print(f"      estimate: {est}", flush=True)
            rep = label_frames(frames, level, st, forces=forces, executor=ex, progress=True)
            print(f"      {rep}", flush=True)
            info[name] = {"level": level, "forces": forces, "n": len(frames), "computed": rep.computed,
                          "cached": rep.cached, "failed": len(rep.failed), "seconds": rep.seconds,
                          "estimate_s": est.seconds}
    return info


def training_config(s: MultiFidelityDemoSettings, out: Path, strategy: dict, budget_s: float) -> dict:
    """Configuration of one demo network (the keys of a `polyfid train` YAML file)."""
    return {
        "model": {"architecture": "hipnn", **s.model},
        "training": {
            "epochs": 1_000_000, "max_time_s": budget_s, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-6,
            "scheduler": "cosine", "energy_weight": 1.0, "force_weight": 100.0, "final_energy_weight": 1000.0,
            "final_fraction": 0.25, "ema_decay": 0.99, "grad_clip": 100.0, "early_stopping_patience": None,
            "num_threads": 1, "seed": s.seed,
        },
        "strategy": strategy,
        "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False},
    }


def _train(cfg: dict, train, out: str) -> dict[str, Any]:
    """One training in a worker process (one torch thread)."""
    import torch

    from polyfid.train.config import load_config
    from polyfid.train.strategies import fit_strategy

    torch.set_num_threads(1)
    res = fit_strategy(load_config(cfg), train, None, out)
    return {"path": str(res.path), "train_s": res.train_s, "epochs": res.epochs,
            "stages": {k: {"epochs": v.epoch, "train_s": v.elapsed_s} for k, v in res.stages.items()}}


def train_models(s: MultiFidelityDemoSettings, train, runs: Path) -> dict[str, dict[str, Any]]:
    """The multi-fidelity (transfer) and the high-level energies-only networks, trained side
    by side in two processes on the same budget."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from polyfid.train.strategies import restrict

    low, high = fidelity_name(s.low_level), fidelity_name(s.high_level)
    mf_cfg = training_config(s, runs / "multi_fidelity", {
        "name": "transfer", "target": high, "base": low,
        "second_stage": {"lr": 1e-4, "max_time_s": s.finetune_budget_s}}, s.low_budget_s)
    sf_cfg = training_config(s, runs / "energies_only", {"name": "single", "target": high}, s.budget_s)
    sf_train = restrict(train, [high])
    for d in ("multi_fidelity", "energies_only"):
        shutil.rmtree(runs / d, ignore_errors=True)
    with ProcessPoolExecutor(max_workers=min(2, s.workers), mp_context=mp.get_context("spawn")) as ex:
        jobs = {"multi_fidelity": ex.submit(_train, mf_cfg, train, str(runs / "multi_fidelity")),
                "energies_only": ex.submit(_train, sf_cfg, sf_train, str(runs / "energies_only"))}
        return {k: f.result() for k, f in jobs.items()}


def evaluate_models(s: MultiFidelityDemoSettings, models: dict[str, str], test) -> dict[str, dict[str, Any]]:
    """High-level errors on the held-out set of each model file (name -> path), plus GFN2-xTB
    itself (forces only: its energies have another zero)."""
    from polyfid.analysis.metrics import public
    from polyfid.api import evaluate
    from polyfid.train.strategies import restrict

    low, high = fidelity_name(s.low_level), fidelity_name(s.high_level)
    out: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        mapping = {high: low} if name == "xtb_network" else None
        # restrict gives fresh label dicts: the renaming for the xTB head stays in this copy
        m = evaluate(path, restrict(test, [high]), mapping)
        fid = low if name == "xtb_network" else high
        out[name] = public(m)[fid] | {"_arrays": m["_arrays"][fid]}
        if name == "xtb_network":  # an xTB-level head: its energy zero is not MP2's
            for k in ("energy_mae_meV", "energy_rmse_meV"):
                out[name][k] = None
    both = [f for f in test if high in f.labels and low in f.labels and f.labels[low].forces is not None]
    err = np.concatenate([(f.labels[low].forces - f.labels[high].forces).ravel() for f in both])
    out["gfn2_xtb"] = {"energy_mae_meV": None, "force_mae_meV_A": 1e3 * float(np.mean(np.abs(err))),
                       "force_rmse_meV_A": 1e3 * float(np.sqrt(np.mean(err**2))), "n_frames": len(both)}
    return out


def plot(results: dict[str, dict[str, Any]], s: MultiFidelityDemoSettings, out: Path) -> list[Path]:
    """Bar chart of the test errors and force parity plots of the two trained models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyfid.analysis.plots import save_figure

    names = [n for n in ROWS if n in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, unit in ((axes[0], "force_mae_meV_A", "meV/Å"), (axes[1], "energy_mae_meV", "meV")):
        vals = [results[n].get(key) for n in names]
        ax.bar(range(len(names)), [v if v is not None else 0.0 for v in vals],
               color=["C2", "C3", "C0", "C7"][: len(names)])
        for k, v in enumerate(vals):
            ax.text(k, (v or 0.0), "n/a" if v is None else f"{v:.0f}", ha="center", va="bottom")
        ax.set_xticks(range(len(names)), [LABELS[n] for n in names], rotation=15, fontsize=8)
        ax.set_ylabel(f"{key.split('_')[0]} MAE vs {s.high_level} ({unit})")
    fig.suptitle(f"{s.molecule}: held-out {s.high_level} errors; {s.n_high} high-level energies")
    bars = save_figure(fig, out / "mf_errors.png")

    trained = [n for n in ("multi_fidelity", "energies_only") if n in results]
    fig, axes = plt.subplots(1, len(trained), figsize=(5 * len(trained), 4.5), squeeze=False)
    for ax, n in zip(axes[0], trained):
        a = results[n]["_arrays"]
        ref, pred = a["forces_ref"].ravel(), a["forces_pred"].ravel()
        ax.scatter(ref, pred, s=2, alpha=0.4)
        lim = float(np.abs(np.concatenate([ref, pred])).max())
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        ax.set(xlabel=f"{s.high_level} force (eV/Å)", ylabel="predicted force (eV/Å)",
               title=f"{LABELS[n]}: MAE {results[n]['force_mae_meV_A']:.0f} meV/Å")
    return [bars, save_figure(fig, out / "mf_force_parity.png")]


ROWS = ("multi_fidelity", "energies_only", "xtb_network", "gfn2_xtb")
LABELS = {
    "multi_fidelity": "multi-fidelity (xTB forces + MP2 energies)",
    "energies_only": "MP2 energies only",
    "xtb_network": "network trained on xTB only",
    "gfn2_xtb": "GFN2-xTB itself",
}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    def cell(v):
        return "   n/a" if v is None else f"{v:6.1f}"

    lines = [f"{'model':46s} {'F MAE meV/Å':>12s} {'E MAE meV':>10s}"]
    for n in ROWS:
        if n in results:
            r = results[n]
            lines.append(f"{LABELS[n]:46s} {cell(r.get('force_mae_meV_A')):>12s} {cell(r.get('energy_mae_meV')):>10s}")
    return "\n".join(lines)


# ---- the whole demo ------------------------------------------------------------------------------
def run_demo(out: str | Path = "runs/demo", quick: bool = False,
             settings: MultiFidelityDemoSettings | None = None) -> dict[str, Any]:
    """Sample, label, train both models, test; print the table and return the summary (also
    written to ``out/summary.json``)."""
    from polyfid.data.readers.label_store import read_label_store
    from polyfid.label import frame_key

    t_start = time.perf_counter()
    s = settings if settings is not None else demo_settings(quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "default"
    work = out / tag
    work.mkdir(exist_ok=True)
    print(f"polyfid demo ({tag}): multi-fidelity {s.molecule}, {s.low_level} forces + {s.n_high} {s.high_level} "
          f"energies; output in {work.resolve()}", flush=True)

    t0 = time.perf_counter()
    pool, held, generated = sample_sets(s, work)
    t_sample = time.perf_counter() - t0
    print(f"[1/4] {'sampled' if generated else 'reused'} {len(pool)} pool + {len(held)} held-out structures "
          f"({s.low_level} Langevin MD at {', '.join(f'{t:g}' for t in s.temperatures_K)} K) in {t_sample:.0f} s",
          flush=True)

    print(f"[2/4] labels (store {work / 'labels.sqlite'}; {s.workers} worker processes)", flush=True)
    t0 = time.perf_counter()
    labels = label_sets(s, pool, held, work / "labels.sqlite")
    t_label = time.perf_counter() - t0

    ds = read_label_store(work / "labels.sqlite", [s.low_level, s.high_level])
    pool_keys = {frame_key(f) for f in pool}
    held_keys = {frame_key(f) for f in held}
    train = type(ds)([f for f in ds if frame_key(f) in pool_keys])
    test = type(ds)([f for f in ds if frame_key(f) in held_keys])
    high = fidelity_name(s.high_level)
    n_hi = train.count(high, "energy")
    print(f"[3/4] training side by side, {s.budget_s:g} s each, 1 thread each: multi-fidelity "
          f"({s.low_budget_s:g} s on {train.count(fidelity_name(s.low_level), 'forces')} xTB force frames, then "
          f"{s.finetune_budget_s:g} s on {n_hi} MP2 energies) and MP2 energies only ({n_hi} frames)", flush=True)
    t0 = time.perf_counter()
    runs = work / "runs"
    trained = train_models(s, train, runs)
    t_train = time.perf_counter() - t0

    models = {k: v["path"] for k, v in trained.items()}
    models["xtb_network"] = str(runs / "multi_fidelity" / "base" / "model.pt")
    results = evaluate_models(s, models, test)
    print(f"[4/4] errors against {s.high_level} on {len(test)} held-out structures")
    print("      " + format_table(results).replace("\n", "\n      "))
    mf, sf = results["multi_fidelity"]["force_mae_meV_A"], results["energies_only"]["force_mae_meV_A"]
    plots = plot(results, s, work)
    summary = {
        "mode": tag, "molecule": s.molecule, "settings": asdict(s),
        "seconds": {"sampling": t_sample, "labelling": t_label, "training": t_train,
                    "total": time.perf_counter() - t_start},
        "labels": labels, "training": trained,
        "test": {k: {kk: vv for kk, vv in v.items() if kk != "_arrays"} for k, v in results.items()},
        "force_mae_ratio_energies_only_over_multi_fidelity": sf / mf,
        "plots": [str(p) for p in plots],
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nthe multi-fidelity model's {s.high_level} force error is {sf / mf:.1f}x smaller than that of the model "
          f"trained on the {n_hi} {s.high_level} energies alone ({mf:.0f} vs {sf:.0f} meV/Å)")
    print(f"plots: {', '.join(p.name for p in plots)}; summary: {work / 'summary.json'}; "
          f"total {summary['seconds']['total']:.0f} s")
    return summary
