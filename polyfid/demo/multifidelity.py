"""The multi-fidelity demo (``polyfid demo``): cheap forces for many structures plus expensive
energies for a few give a far better high-level potential than the expensive energies alone.

1. Sample: Langevin MD of ethanol with the low level (GFN1-xTB) at several temperatures (a training pool) and, from
   other seeds, a held-out set (:mod:`polyfid.sample`).
2. Label, through the resumable store (:mod:`polyfid.label`): low-level energies and forces for
   the pool; MP2/cc-pVDZ energies (PySCF) for N pool structures picked by farthest-point
   sampling; MP2/cc-pVDZ energies and forces for the held-out set. A cost estimate comes first.
   What the engines print goes to ``demo.log``.
3. Train, side by side (one process and thread each) on budgets of optimiser steps, so that
   the same seed gives the same table on any machine: the multi-fidelity model (polyfid's
   multi-head: the low level first, then every level, each with its own last interaction block
   and energy head) and a HIP-NN trained on the N MP2 energies alone, for as many steps.
4. Test both against MP2 energies and forces of the held-out structures, next to the low level
   itself and the network trained on the low level only; a table, ``summary.json`` and plots.

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
    pool_per_temperature: int = 100  # low-level-labelled training structures per temperature
    heldout_per_temperature: int = 12  # held-out test structures per temperature
    stride: int = 10  # MD steps between samples
    equilibration: int = 200
    n_high: int = 100  # pool structures with high-level energies
    low_level: str = "gfn1-xtb"  # the smallest force gap to MP2 of the cheap levels: benchmarks/low_level_choice.py
    high_level: str = "mp2/cc-pvdz"
    low_steps: int = 6000  # multi-fidelity model: optimiser steps on the low level alone
    own_steps: int = 1000  # multi-fidelity model: then on every level
    batch_size: int = 16
    workers: int = 2  # labelling processes and concurrent trainings
    seed: int = 0
    model: dict = field(
        default_factory=lambda: {"n_features": 64, "n_sensitivities": 20, "soft_min": 0.85, "soft_max": 4.5,
                                 "cutoff": 5.0, "n_interactions": 2, "n_atom_layers": 2}
    )

    @property
    def steps(self) -> int:
        """Optimiser steps of each model (the energies-only model gets all of them in one stage)."""
        return self.low_steps + self.own_steps


def demo_settings(quick: bool = False) -> MultiFidelityDemoSettings:
    """Default: 300 pool structures, 100 with MP2 energies, 36 held out, 7000 steps per model.
    Quick: 120 / 30 / 9 and 2000 steps."""
    if quick:
        return MultiFidelityDemoSettings(pool_per_temperature=40, heldout_per_temperature=3, stride=5,
                                         equilibration=100, n_high=30, low_steps=1600, own_steps=400)
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


def label_sets(s: MultiFidelityDemoSettings, pool: list, held: list, store_path: Path,
               log: Path | None = None) -> dict[str, Any]:
    """Low-level E+F of pool and held-out; high-level energies of the farthest-point subset
    and high-level E+F of the held-out set (`pool`, `held`: Frames). What the engines print
    goes to `log` (default: beside the store). Returns what was done."""
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
            est = estimate_cost(frames, level, st, forces=forces, sample=2, workers=s.workers, executor=ex, log=log)
            print(f"      estimate: {est}", flush=True)
            rep = label_frames(frames, level, st, forces=forces, executor=ex, progress=True, log=log)
            print(f"      {rep}", flush=True)
            info[name] = {"level": level, "forces": forces, "n": len(frames), "computed": rep.computed,
                          "cached": rep.cached, "failed": len(rep.failed), "seconds": rep.seconds,
                          "estimate_s": est.seconds}
    return info


def training_config(s: MultiFidelityDemoSettings, out: Path, strategy: dict, steps: int) -> dict:
    """Configuration of one demo network (the keys of a `polyfid train` YAML file): a budget of
    `steps` optimiser steps (of the first stage, for two-stage strategies)."""
    return {
        "model": {"architecture": "hipnn", **s.model},
        "training": {
            "epochs": 1_000_000, "max_steps": steps, "batch_size": s.batch_size, "lr": 1e-3, "min_lr": 1e-6,
            "scheduler": "cosine", "energy_weight": 1.0, "force_weight": 100.0, "final_energy_weight": 1000.0,
            "final_fraction": 0.25, "ema_decay": 0.99, "grad_clip": 100.0, "early_stopping_patience": None,
            "num_threads": 1, "seed": s.seed, "checkpoint_interval_s": 60.0,
        },
        "strategy": strategy,
        "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False},
    }


def _train(cfg: dict, train, out: str, log: str | None = None) -> dict[str, Any]:
    """One training in a worker process (one torch thread); its warnings go to `log`."""
    import torch

    from polyfid.label.runner import engine_output
    from polyfid.train.config import load_config
    from polyfid.train.strategies import fit_strategy

    torch.set_num_threads(1)
    with engine_output(log):
        res = fit_strategy(load_config(cfg), train, None, out)
    return {"path": str(res.path), "train_s": res.train_s, "epochs": res.epochs,
            "stages": {k: {"epochs": v.epoch, "steps": v.step, "train_s": v.elapsed_s} for k, v in res.stages.items()}}


def train_models(s: MultiFidelityDemoSettings, train, runs: Path, log: Path | None = None) -> dict[str, dict[str, Any]]:
    """The multi-fidelity (multi-head) and the high-level energies-only networks, trained side
    by side in two processes, for the same number of optimiser steps."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor


    low, high = fidelity_name(s.low_level), fidelity_name(s.high_level)
    mf_cfg = training_config(s, runs / "multi_fidelity", {
        "name": "multi-head", "target": high, "base": low, "second_stage": {"max_steps": s.own_steps}}, s.low_steps)
    sf_cfg = training_config(s, runs / "energies_only", {"name": "single", "target": high}, s.steps)
    sf_train = train.restrict([high])
    for d in ("multi_fidelity", "energies_only"):
        shutil.rmtree(runs / d, ignore_errors=True)
    log_s = None if log is None else str(Path(log).absolute())
    with ProcessPoolExecutor(max_workers=min(2, s.workers), mp_context=mp.get_context("spawn")) as ex:
        jobs = {"multi_fidelity": ex.submit(_train, mf_cfg, train, str(runs / "multi_fidelity"), log_s),
                "energies_only": ex.submit(_train, sf_cfg, sf_train, str(runs / "energies_only"), log_s)}
        return {k: f.result() for k, f in jobs.items()}


def evaluate_models(s: MultiFidelityDemoSettings, models: dict[str, str], test) -> dict[str, dict[str, Any]]:
    """High-level errors on the held-out set of each model file (name -> path), plus the low
    level itself. The low level and the network trained on it alone get forces only: their
    energies have another zero (an energy MAE of hundreds of eV would mean nothing)."""
    from polyfid.analysis.metrics import public
    from polyfid.api import evaluate

    low, high = fidelity_name(s.low_level), fidelity_name(s.high_level)
    out: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        low_head = name == "low_level_network"
        # restrict gives fresh label dicts: the renaming for the low-level head stays in this copy
        m = evaluate(path, test.restrict([high]), {high: low} if low_head else None)
        fid = low if low_head else high
        out[name] = public(m)[fid] | {"_arrays": m["_arrays"][fid]}
        if low_head:
            out[name] = {k: (None if k.startswith("energy") else v) for k, v in out[name].items()}
    both = [f for f in test if high in f.labels and low in f.labels and f.labels[low].forces is not None]
    err = np.concatenate([(f.labels[low].forces - f.labels[high].forces).ravel() for f in both])
    out["low_level"] = {"energy_mae_meV": None, "force_mae_meV_A": 1e3 * float(np.mean(np.abs(err))),
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
        ax.set_xticks(range(len(names)), [row_labels(s)[n] for n in names], rotation=15, fontsize=8)
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
               title=f"{row_labels(s)[n]}: MAE {results[n]['force_mae_meV_A']:.0f} meV/Å")
    return [bars, save_figure(fig, out / "mf_force_parity.png")]


ROWS = ("multi_fidelity", "energies_only", "low_level_network", "low_level")


def row_labels(s: MultiFidelityDemoSettings) -> dict[str, str]:
    """The table's row names, with the levels of `s`."""
    lo, hi = _short(s.low_level), _short(s.high_level)
    return {
        "multi_fidelity": f"multi-fidelity ({lo} forces + {hi} energies)",
        "energies_only": f"{hi} energies only",
        "low_level_network": f"network trained on {lo} only",
        "low_level": f"{lo} itself",
    }


def _short(level: str) -> str:
    names = {"gfn1-xtb": "GFN1-xTB", "gfn2-xtb": "GFN2-xTB"}
    return names.get(level.lower(), level.split("/")[0].upper())


def format_table(results: dict[str, dict[str, Any]], s: MultiFidelityDemoSettings) -> str:
    def cell(v):
        return "   n/a" if v is None else f"{v:6.1f}"

    labels = row_labels(s)
    lines = [f"{'model':46s} {'F MAE meV/Å':>12s} {'E MAE meV':>10s}"]
    for n in ROWS:
        if n in results:
            r = results[n]
            lines.append(f"{labels[n]:46s} {cell(r.get('force_mae_meV_A')):>12s} "
                         f"{cell(r.get('energy_mae_meV')):>10s}")
    return "\n".join(lines)


def in_order(ds, frames: list):
    """The labelled frames of `ds` (a Dataset read from the store) whose structures are in
    `frames`, in the order of `frames`, not of the store's rows, which is the order in which the
    workers happened to finish: the batches, hence the trained models, must not depend on it."""
    from polyfid.label import frame_key

    by_key = {frame_key(f): f for f in ds}
    return type(ds)([by_key[k] for k in dict.fromkeys(frame_key(f) for f in frames) if k in by_key])


# ---- the whole demo ------------------------------------------------------------------------------
def run_demo(out: str | Path = "runs/demo", quick: bool = False,
             settings: MultiFidelityDemoSettings | None = None) -> dict[str, Any]:
    """Sample, label, train both models, test; print the table and return the summary (also
    written to ``out/summary.json``). What the engines print goes to ``demo.log`` there."""
    from polyfid.data.readers.label_store import read_label_store
    from polyfid.label.runner import engine_output

    t_start = time.perf_counter()
    s = settings if settings is not None else demo_settings(quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "default"
    work = out / tag
    work.mkdir(exist_ok=True)
    log = work / "demo.log"
    lo, hi = _short(s.low_level), _short(s.high_level)
    print(f"polyfid demo ({tag}): multi-fidelity {s.molecule}, {s.low_level} forces + {s.n_high} {s.high_level} "
          f"energies; output in {work.resolve()}; engine messages in {log.name}", flush=True)

    t0 = time.perf_counter()
    with engine_output(log):
        pool, held, generated = sample_sets(s, work)
    t_sample = time.perf_counter() - t0
    print(f"[1/4] {'sampled' if generated else 'reused'} {len(pool)} pool + {len(held)} held-out structures "
          f"({lo} Langevin MD at {', '.join(f'{t:g}' for t in s.temperatures_K)} K) in {t_sample:.0f} s",
          flush=True)

    print(f"[2/4] labels (store {work / 'labels.sqlite'}; {s.workers} worker processes)", flush=True)
    t0 = time.perf_counter()
    labels = label_sets(s, pool, held, work / "labels.sqlite", log)
    t_label = time.perf_counter() - t0

    ds = read_label_store(work / "labels.sqlite", [s.low_level, s.high_level])
    train, test = in_order(ds, pool), in_order(ds, held)
    high = fidelity_name(s.high_level)
    n_hi = train.count(high, "energy")
    print(f"[3/4] training side by side, {s.steps} optimiser steps each, 1 thread each: multi-fidelity "
          f"({s.low_steps} steps on {train.count(fidelity_name(s.low_level), 'forces')} {lo} force frames, then "
          f"{s.own_steps} on every level) and {hi} energies only ({n_hi} frames)", flush=True)
    t0 = time.perf_counter()
    runs = work / "runs"
    trained = train_models(s, train, runs, log)
    t_train = time.perf_counter() - t0

    models = {k: v["path"] for k, v in trained.items()}
    models["low_level_network"] = str(runs / "multi_fidelity" / "base" / "model.pt")
    results = evaluate_models(s, models, test)
    print(f"[4/4] errors against {s.high_level} on {len(test)} held-out structures")
    print("      " + format_table(results, s).replace("\n", "\n      "))
    f_mae = {k: results[k]["force_mae_meV_A"] for k in ROWS}
    plots = plot(results, s, work)
    summary = {
        "mode": tag, "molecule": s.molecule, "settings": asdict(s),
        "seconds": {"sampling": t_sample, "labelling": t_label, "training": t_train,
                    "total": time.perf_counter() - t_start},
        "labels": labels, "training": trained,
        "test": {k: {kk: vv for kk, vv in v.items() if kk != "_arrays"} for k, v in results.items()},
        "force_mae_ratios": {f"multi_fidelity_over_{k}": f_mae["multi_fidelity"] / f_mae[k] for k in ROWS[1:]},
        "plots": [str(p) for p in plots],
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    mf = f_mae["multi_fidelity"]
    def than(other: float) -> str:
        return f"{other / mf:.2f}x smaller than" if other >= mf else f"{mf / other:.2f}x larger than"

    print(f"\n{s.high_level} force error of the multi-fidelity model: {mf:.0f} meV/Å; "
          f"{than(f_mae['energies_only'])} the {n_hi} {hi} energies alone give, {than(f_mae['low_level'])} {lo} "
          f"itself, {than(f_mae['low_level_network'])} the network trained on {lo} only")
    print(f"plots: {', '.join(p.name for p in plots)}; summary: {work / 'summary.json'}; "
          f"total {summary['seconds']['total']:.0f} s")
    return summary
