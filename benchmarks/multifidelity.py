"""Multi-fidelity benchmark: cheap low-level forces + N_high expensive energies, on real data.

Cases (see `CASES`):
  rmd17_mp2_ethanol   low = rMD17 PBE/def2-SVP E+F of the 950 training frames of
                      rmd17_ethanol_train_01.npz; high = MP2/cc-pVDZ energies of N_high of them;
                      test = 200 frames of rmd17_ethanol_test_01.npz (seed 0) with MP2 E+F.
  rmd17_xtb_ethanol,  low = GFN2-xTB E+F (tblite) on the 950 training geometries; high = the
  rmd17_xtb_aspirin   PBE/def2-SVP energies of N_high of them; test = all 1000 test frames (PBE).
  pyseqm              20% of the molecular formulas held out as test (DFT E+F); of the rest,
                      low = PM6 E+F of one half of the configurations, high = DFT energies of
                      N_high configurations of the other half (no configuration has both).
High-level subsets are nested (50 ⊂ 100 ⊂ …), drawn with the seed from the training frames.

Strategies, all on the same HIP-NN: sf_energy (high energies only), sf_energy_forces (high
energies and forces on the same frames: the ceiling), low_as_high (low-level reference forces
as the prediction; energies shifted by per-element offsets fitted on the N_high frames),
multi_head and embedding (warm-started from the low-level model), delta (low-level model +
a smaller Δ network on high − low where frames have both), transfer (low-level model
fine-tuned on the high energies). No high-level force enters training or validation apart
from sf_energy_forces; there is no validation or early stopping: every model is evaluated
with its final EMA weights after a fixed wall-clock budget.

Budget: the low-level model of each case is trained once (--low-budget-s, shared by the
multi-fidelity strategies as their pre-training); every other network gets --budget-s.
Jobs run as 1-thread processes, --jobs at a time. Labels (MP2, xTB) are computed with
polyfid.label and cached in --store, outside the repository; finished jobs are kept in the
work folder, so an interrupted benchmark continues where it stopped.

  python benchmarks/multifidelity.py [--quick] [--cases ...] [--store PATH] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CASES = ["rmd17_mp2_ethanol", "rmd17_xtb_ethanol", "rmd17_xtb_aspirin", "pyseqm"]
STRATEGIES = ["sf_energy", "sf_energy_forces", "low_as_high", "multi_head", "embedding", "delta", "transfer"]
TRAINED = [s for s in STRATEGIES if s != "low_as_high"]
MP2, XTB, PBE = "mp2/cc-pvdz", "gfn2-xtb", "pbe_def2svp"
DEFAULT_STORE = Path.home() / ".cache" / "polyfid" / "multifidelity_labels.sqlite"

#: the HIP-NN of every model (the PEERS.md size)
MODEL = dict(common.ARCH)
#: training recipe of every network (wall-clock cosine schedule; final EMA weights)
TRAINING = {
    "epochs": 1_000_000, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-6, "scheduler": "cosine",
    "energy_weight": 1.0, "force_weight": 100.0, "final_energy_weight": 1000.0, "final_fraction": 0.25,
    "ema_decay": 0.99, "grad_clip": 100.0, "early_stopping_patience": None, "num_threads": 1,
    "checkpoint_interval_s": 30.0,
}
#: strategy settings, chosen before any test error was seen
STRATEGY = {
    "multi_head": {"name": "multi-head", "warm_start": True},
    "embedding": {"name": "embedding", "warm_start": True, "embedding_dim": 8},
    "delta": {"name": "delta", "delta_model": {"n_features": 32}},
    "transfer": {"name": "transfer", "second_stage": {"lr": 1e-4}},
}
SAMPLING_HIGH = 0.25  # share of training draws from the high-level frames (multi-head, embedding)


# ---- protocol ---------------------------------------------------------------------------------
N_HIGH = (50, 100, 200, 500)


def grid(quick: bool, n_high: tuple[int, ...] = N_HIGH) -> list[tuple[int, int]]:
    """(N_high, seed) pairs: N = 100 with three seeds, the others with one."""
    if quick:
        return [(20, 0)]
    return [(n, s) for n, s in [(50, 0), (100, 0), (100, 1), (100, 2), (200, 0), (500, 0)] if n in n_high]


def high_subset(n_pool: int, n_high: int, seed: int) -> np.ndarray:
    """Nested subsets: the first n_high of one permutation per seed."""
    return np.random.default_rng(seed).permutation(n_pool)[:n_high]


def levels(case: str) -> tuple[str, str]:
    return {"rmd17_mp2_ethanol": (PBE, MP2), "rmd17_xtb_ethanol": (XTB, PBE),
            "rmd17_xtb_aspirin": (XTB, PBE), "pyseqm": ("pm6", "dft")}[case]


def _rmd17(data_dir: Path, molecule: str):
    from polyfid.data.readers import read
    from polyfid.train.strategies import restrict

    train_f, test_f = common.rmd17_files(data_dir, molecule)
    train = restrict(read(train_f), [PBE])
    tr_idx, _ = common.train_val_split(len(train), 50, 0)
    return train[np.sort(tr_idx)], restrict(read(test_f), [PBE])


def _relabel(ds, store, level: str, name: str, forces: bool):
    """Frames of `ds` with their `level` labels from the store added as fidelity `name`."""
    from polyfid.data.frame import Labels

    missing = []
    for k, f in enumerate(ds):
        got = store.get(f, level)
        if got is None or (forces and got[1] is None):
            missing.append(k)
            continue
        f.labels[name] = Labels(energy=got[0], forces=got[1] if forces else None)
    if missing:
        raise SystemExit(f"{len(missing)} frames lack {level} labels in {store.path}: run the labels phase")
    return ds


def case_frames(case: str, data_dir: Path, quick: bool) -> dict[str, Any]:
    """Pools of a case before labels: train geometries (pool for high subsets), test frames."""
    if case.startswith("rmd17"):
        mol = case.rsplit("_", 1)[1]
        train, test = _rmd17(data_dir, mol)
        if case == "rmd17_mp2_ethanol":
            test = test[np.sort(np.random.default_rng(0).choice(len(test), 200, replace=False))]
        if quick:
            test = test[np.arange(20)]
        return {"train": train, "test": test}
    from polyfid.data.readers import read

    ds = read(data_dir / "pyseqm_pm6_dft")
    formulas = sorted({f.formula() for f in ds})
    rng = np.random.default_rng(0)
    held = set(rng.choice(formulas, size=int(round(0.2 * len(formulas))), replace=False).tolist())
    test_idx = [k for k, f in enumerate(ds) if f.formula() in held]
    rest = np.array([k for k, f in enumerate(ds) if f.formula() not in held])
    perm = rng.permutation(rest)
    low_idx, high_pool = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
    test = ds[np.array(test_idx)]
    if quick:
        test = test[np.arange(40)]
        low_idx = low_idx[:300]
    return {"low": ds[low_idx], "high_pool": ds[high_pool], "test": test}


def needed_labels(case: str, frames: dict, quick: bool, n_high=N_HIGH) -> list[tuple[str, list, bool]]:
    """(level, frames, forces) the case needs from the store."""
    if case == "rmd17_mp2_ethanol":
        idx = sorted({int(i) for n, s in grid(quick, n_high) for i in high_subset(len(frames["train"]), n, s)})
        # E+F for the high frames: the ceiling (sf_energy_forces) trains on their forces
        return [(MP2, [frames["train"][i] for i in idx], True), (MP2, list(frames["test"]), True)]
    if case.startswith("rmd17_xtb"):
        return [(XTB, list(frames["train"]), True), (XTB, list(frames["test"]), True)]
    return []


def build(case: str, data_dir: Path, store_path: Path, n_high: int, seed: int, quick: bool):
    """(low-level data set, high-level subset with E+F, test set with high E+F and low labels)."""
    from polyfid.data.frame import Dataset, Frame
    from polyfid.label import LabelStore
    from polyfid.train.strategies import restrict

    low, high = levels(case)
    fr = case_frames(case, data_dir, quick)
    if case == "pyseqm":
        hi = fr["high_pool"][high_subset(len(fr["high_pool"]), n_high, seed)]
        return restrict(fr["low"], [low]), restrict(hi, [high]), fr["test"]
    with LabelStore(store_path) as st:
        train, test = fr["train"], fr["test"]
        if case == "rmd17_mp2_ethanol":
            idx = high_subset(len(train), n_high, seed)
            hi = _relabel(Dataset([Frame(f.numbers, f.positions, source=f.source) for f in train[idx]]), st,
                          MP2, MP2, True)
            test = _relabel(test, st, MP2, MP2, True)
            return restrict(train, [PBE]), hi, test
        train = _relabel(train, st, XTB, XTB, True)
        test = _relabel(test, st, XTB, XTB, True)
        idx = high_subset(len(train), n_high, seed)
        return restrict(train, [XTB]), restrict(train[idx], [PBE]), test


def merged(low_ds, high_ds, high: str, forces: bool = False):
    """Low frames plus the high-level energies (forces only if asked): a frame at both levels
    when the geometry is shared, separate frames otherwise."""
    from polyfid.data.frame import Dataset, Labels
    from polyfid.label import frame_key

    out = [replace(f, labels=dict(f.labels)) for f in low_ds]
    index = {frame_key(f): i for i, f in enumerate(low_ds)}
    extra = []
    for f in high_ds:
        lab = Labels(energy=f.labels[high].energy, forces=f.labels[high].forces if forces else None)
        k = frame_key(f)
        if k in index:
            out[index[k]].labels[high] = lab
        else:
            extra.append(replace(f, labels={high: lab}))
    return Dataset(out + extra)


# ---- labels ------------------------------------------------------------------------------------
def compute_labels(cases: list[str], data_dir: Path, store: Path, quick: bool, workers: int,
                   n_high=N_HIGH) -> dict[str, Any]:
    from polyfid.label import label_frames

    out = {}
    for case in cases:
        fr = case_frames(case, data_dir, quick)
        for level, frames, forces in needed_labels(case, fr, quick, n_high):
            t0 = time.perf_counter()
            rep = label_frames(frames, level, store, forces=forces, workers=workers)
            print(f"  [{case}] {rep}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            out.setdefault(case, []).append({"level": level, "frames": len(frames), "computed": rep.computed,
                                             "cached": rep.cached, "failed": len(rep.failed),
                                             "seconds": rep.seconds})
            if rep.failed:
                raise SystemExit(f"{case}: {len(rep.failed)} {level} calculations failed: {rep.failed[:3]}")
    return out


# ---- one job (a worker process) --------------------------------------------------------------------
def job_name(case: str, strategy: str, n_high: int | None, seed: int | None) -> str:
    return f"{case}__low" if strategy == "low" else f"{case}__{strategy}__{n_high}__{seed}"


def _config(out: Path, budget: float, seed: int, strategy: dict | None = None, training: dict | None = None) -> dict:
    return {
        "model": MODEL,
        "training": TRAINING | {"max_time_s": budget, "seed": seed} | (training or {}),
        "strategy": strategy or {"name": "single"},
        "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False},
    }


def run_job(args, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from polyfid.analysis.metrics import error_metrics, public
    from polyfid.data.batch import PackedData
    from polyfid.models import load_model
    from polyfid.train.config import load_config
    from polyfid.train.strategies import fit_strategy, restrict

    torch.set_num_threads(1)
    case, strategy, n_high, seed = spec["case"], spec["strategy"], spec.get("n_high"), spec.get("seed")
    low, high = levels(case)
    work = Path(args.work_dir)
    out = work / "runs" / job_name(case, strategy, n_high, seed)
    low_model_dir = work / "runs" / job_name(case, "low", None, None)
    budget = args.low_budget_s if strategy == "low" else args.budget_s
    low_ds, high_ds, test = build(case, args.data_dir, args.store, n_high or 1, seed or 0, args.quick)
    t0 = time.perf_counter()
    if strategy == "low":
        cfg = load_config(_config(out, budget, 0, {"name": "single", "target": low}))
        res = fit_strategy(cfg, low_ds, None, out, resume=True)
        model, target = res.model, low
    elif strategy in ("sf_energy", "sf_energy_forces"):
        train = restrict(high_ds, [high])
        if strategy == "sf_energy":
            for f in train:
                f.labels[high].forces = None
        cfg = load_config(_config(out, budget, seed, {"name": "single", "target": high}))
        res = fit_strategy(cfg, train, None, out, resume=True)
        model, target = res.model, high
    else:
        base = load_model(low_model_dir / "model.pt")
        train = merged(low_ds, high_ds, high)
        st = STRATEGY[strategy] | {"target": high, "base": low}
        training = {"sampling": {high: SAMPLING_HIGH}} if strategy in ("multi_head", "embedding") else {}
        cfg = load_config(_config(out, budget, seed, st, training))
        res = fit_strategy(cfg, train, None, out, resume=True, base_model=base)
        model, target = res.model, high
    wall = time.perf_counter() - t0
    test_hi = restrict(test, [target])
    m = public(error_metrics(model, PackedData(test_hi, model.cutoff, model.fidelities), device="cpu"))[target]
    return {"case": case, "strategy": strategy, "n_high": n_high, "seed": seed,
            "energy_mae_meV": m["energy_mae_meV"], "force_mae_meV_A": m["force_mae_meV_A"],
            "energy_rmse_meV": m["energy_rmse_meV"], "force_rmse_meV_A": m["force_rmse_meV_A"],
            "train_s": res.train_s, "epochs": res.epochs, "wall_s": wall,
            "stages": {k: {"epochs": s.epoch, "train_s": s.elapsed_s} for k, s in res.stages.items()},
            "n_train_frames": len(train) if strategy != "low" else len(low_ds), "n_test": len(test_hi)}


def low_as_high(case: str, args, n_high: int, seed: int) -> dict[str, Any]:
    """The low level's reference labels as the high-level prediction, energies shifted by
    per-element offsets fitted (least squares, minimum norm) on the N_high frames."""
    from polyfid.data.frame import Dataset

    low, high = levels(case)
    low_ds, high_ds, test = build(case, args.data_dir, args.store, n_high, seed, args.quick)
    if case == "pyseqm":  # the high frames' own low-level labels (cheap; never used in training)
        pool = case_frames(case, args.data_dir, args.quick)["high_pool"]
        lows = [pool[int(i)].labels[low].energy for i in high_subset(len(pool), n_high, seed)]
    elif case == "rmd17_mp2_ethanol":
        by_pos = {f.positions.tobytes(): f for f in low_ds}
        lows = [by_pos[f.positions.tobytes()].labels[low].energy for f in high_ds]
    else:  # the same geometries: the low-level labels of the chosen frames
        lows = [f.labels[low].energy for f in low_ds[high_subset(len(low_ds), n_high, seed)]]
    elements = sorted(set(Dataset(list(test) + list(high_ds)).elements))

    def counts(ds):
        return np.array([[np.sum(f.numbers == z) for z in elements] for f in ds], float)

    diff = np.array([f.labels[high].energy for f in high_ds]) - np.array(lows)
    offs, *_ = np.linalg.lstsq(counts(high_ds), diff, rcond=None)
    e_pred = np.array([f.labels[low].energy for f in test]) + counts(test) @ offs
    e_ref = np.array([f.labels[high].energy for f in test])
    f_pred = np.concatenate([f.labels[low].forces.ravel() for f in test])
    f_ref = np.concatenate([f.labels[high].forces.ravel() for f in test])
    return {"case": case, "strategy": "low_as_high", "n_high": n_high, "seed": seed,
            "energy_mae_meV": 1e3 * float(np.mean(np.abs(e_pred - e_ref))),
            "force_mae_meV_A": 1e3 * float(np.mean(np.abs(f_pred - f_ref))),
            "energy_rmse_meV": 1e3 * float(np.sqrt(np.mean((e_pred - e_ref) ** 2))),
            "force_rmse_meV_A": 1e3 * float(np.sqrt(np.mean((f_pred - f_ref) ** 2))),
            "train_s": 0.0, "n_test": len(test)}


# ---- scheduling ---------------------------------------------------------------------------------
def jobs_for(cases: list[str], quick: bool, n_high=N_HIGH, strategies=tuple(TRAINED)) -> list[dict[str, Any]]:
    jobs = []
    for case in cases:
        if set(strategies) - {"sf_energy", "sf_energy_forces"}:
            jobs.append({"case": case, "strategy": "low"})
        for n, s in grid(quick, n_high):
            for strat in strategies:
                if strat == "delta" and case == "pyseqm":
                    continue  # no configuration carries both levels
                jobs.append({"case": case, "strategy": strat, "n_high": n, "seed": s})
    return jobs


def fragment_path(work: Path, spec: dict) -> Path:
    return work / "fragments" / f"{job_name(spec['case'], spec['strategy'], spec.get('n_high'), spec.get('seed'))}.json"


def run_jobs(args, jobs: list[dict[str, Any]]) -> None:
    """Run the jobs not yet done, --jobs processes at a time; a job that needs the case's
    low-level model waits for it."""
    work = Path(args.work_dir)
    (work / "fragments").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not fragment_path(work, j).exists()]
    running: list[tuple[dict, subprocess.Popen, float]] = []
    n_total, t_start = len(todo), time.perf_counter()
    print(f"{n_total} training jobs to run ({len(jobs) - n_total} done before), {args.jobs} at a time", flush=True)
    while todo or running:
        for item in list(running):
            spec, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                ok = proc.returncode == 0 and fragment_path(work, spec).exists()
                name = job_name(spec["case"], spec["strategy"], spec.get("n_high"), spec.get("seed"))
                print(f"  {'done' if ok else 'FAILED'} {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
                if not ok:
                    raise SystemExit(f"job {name} failed; see {work / 'logs' / (name + '.log')}")
        while len(running) < args.jobs:
            ready = [j for j in todo if j["strategy"] in ("low", "sf_energy", "sf_energy_forces")
                     or fragment_path(work, {"case": j["case"], "strategy": "low"}).exists()]
            if not ready:
                break
            spec = ready[0]
            todo.remove(spec)
            name = job_name(spec["case"], spec["strategy"], spec.get("n_high"), spec.get("seed"))
            cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--work-dir", str(work),
                   "--data-dir", str(args.data_dir), "--store", str(args.store),
                   "--budget-s", str(args.budget_s), "--low-budget-s", str(args.low_budget_s)]
            if args.quick:
                cmd.append("--quick")
            log = open(work / "logs" / f"{name}.log", "w")
            running.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                   env=common.thread_env(1)), time.perf_counter()))
        time.sleep(0.5)
    print(f"all jobs done in {time.perf_counter() - t_start:.0f} s", flush=True)


# ---- report ---------------------------------------------------------------------------------------
def aggregate(work: Path, cases: list[str], args) -> dict[str, Any]:
    frags = [json.loads(p.read_text()) for p in sorted((work / "fragments").glob("*.json"))]
    result: dict[str, Any] = {}
    for case in cases:
        done = {(f["n_high"], f["seed"]) for f in frags if f["case"] == case and f["strategy"] != "low"}
        for n, s in grid(args.quick):
            if (n, s) not in done:
                continue
            frags.append(low_as_high(case, args, n, s))
        per: dict[int, dict[str, list]] = {}
        for f in frags:
            if f["case"] != case or f["strategy"] == "low":
                continue
            per.setdefault(f["n_high"], {}).setdefault(f["strategy"], []).append(f)
        out = {}
        for n in sorted(per):
            out[str(n)] = {}
            for strat in STRATEGIES:
                runs = per[n].get(strat, [])
                if not runs:
                    continue
                e = np.array([r["energy_mae_meV"] for r in runs])
                fo = np.array([r["force_mae_meV_A"] for r in runs])
                out[str(n)][strat] = {"force_mae_meV_A": float(fo.mean()), "force_mae_meV_A_std": float(fo.std()),
                                      "energy_mae_meV": float(e.mean()), "energy_mae_meV_std": float(e.std()),
                                      "seeds": sorted(r["seed"] for r in runs),
                                      "train_s": float(np.mean([r["train_s"] for r in runs]))}
            ceil = out[str(n)].get("sf_energy_forces")
            for v in out[str(n)].values():
                if ceil:
                    v["force_ratio_to_ceiling"] = v["force_mae_meV_A"] / ceil["force_mae_meV_A"]
                    v["energy_ratio_to_ceiling"] = v["energy_mae_meV"] / ceil["energy_mae_meV"]
        low = next((f for f in frags if f["case"] == case and f["strategy"] == "low"), None)
        if low:
            out["low_level_model"] = {k: low[k] for k in ("energy_mae_meV", "force_mae_meV_A", "train_s", "epochs")}
            out["low_level_model"]["note"] = ("the shared low-level model, scored against the low-level labels "
                                              "of the test frames")
        result[case] = out
    return result


def checks(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    mf = ("multi_head", "embedding", "delta", "transfer")
    for case, per in result.items():
        r = per.get("100")
        if not r or "sf_energy" not in r or not any(s in r for s in mf):
            continue
        best = min((s for s in mf if s in r), key=lambda s: r[s]["force_mae_meV_A"])
        out[f"{case}_best_mf_at_100"] = best
        out[f"{case}_best_mf_force_vs_energy_only"] = r[best]["force_mae_meV_A"] / r["sf_energy"]["force_mae_meV_A"]
        out[f"{case}_far_more_accurate(<=0.5)"] = bool(out[f"{case}_best_mf_force_vs_energy_only"] <= 0.5)
        if case == "rmd17_mp2_ethanol" and "sf_energy_forces" in r:
            c = r["sf_energy_forces"]
            out[f"{case}_force_vs_ceiling(<=1.3)"] = r[best]["force_mae_meV_A"] / c["force_mae_meV_A"]
            out[f"{case}_energy_vs_ceiling(<=1.3)"] = r[best]["energy_mae_meV"] / c["energy_mae_meV"]
            out[f"{case}_beats_low_as_high"] = bool(r[best]["force_mae_meV_A"] < r["low_as_high"]["force_mae_meV_A"])
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for case, per in result.items():
        ns = sorted(int(n) for n in per if n.isdigit())
        if not ns:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for strat in STRATEGIES:
            xs = [n for n in ns if strat in per[str(n)]]
            if not xs:
                continue
            for ax, key in zip(axes, ("force_mae_meV_A", "energy_mae_meV")):
                ys = [per[str(n)][strat][key] for n in xs]
                es = [per[str(n)][strat][key + "_std"] for n in xs]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=strat)
        for ax, lab in zip(axes, ("force MAE (meV/Å)", "energy MAE (meV)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N_high (frames with high-level energies)")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{case}: test error at the high level")
        fig.tight_layout()
        fig.savefig(path.parent / f"{path.stem}_{case}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--phase", choices=["labels", "train", "report", "all"], default="all")
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="label store (SQLite), outside the repo")
    p.add_argument("--work-dir", type=Path, default=None, help="default benchmarks/runs/multifidelity[_quick]")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                   "with --quick the work folder)")
    p.add_argument("--budget-s", type=float, default=None, help="training budget of each network (default 30 s)")
    p.add_argument("--low-budget-s", type=float, default=None,
                   help="training budget of each case's shared low-level model (default 240 s)")
    p.add_argument("--jobs", type=int, default=2, help="1-thread training processes at a time")
    p.add_argument("--label-workers", type=int, default=2, help="processes computing labels")
    p.add_argument("--quick", action="store_true", help="N_high = 20, one seed, 10/20 s budgets, small test sets")
    p.add_argument("--n-high", type=int, nargs="+", default=list(N_HIGH), choices=N_HIGH,
                   help="the N_high values to run (labels and jobs); the report shows every one done so far")
    p.add_argument("--strategies", nargs="+", default=TRAINED, choices=TRAINED,
                   help="the trained strategies to run (e.g. the baselines alone at another --budget-s, "
                   "with another --work-dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # the whole grid (142 networks, two at a time) and the MP2 labels fit about two hours
    # of this 2-core machine with these budgets
    args.budget_s = args.budget_s or (10.0 if args.quick else 30.0)
    args.low_budget_s = args.low_budget_s or (20.0 if args.quick else 240.0)
    stem = "multifidelity_quick" if args.quick else "multifidelity"
    args.work_dir = args.work_dir or (common.DEFAULT_WORK / stem)

    if args.worker:
        spec = json.loads(args.worker)
        frag = run_job(args, spec)
        path = fragment_path(Path(args.work_dir), spec)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(frag, indent=1))
        tmp.replace(path)
        return 0

    out = args.out or (args.work_dir if args.quick else common.DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / f"{stem}.json"
    t0 = time.perf_counter()
    label_info = None
    if args.phase in ("labels", "all"):
        print(f"labels -> {args.store}", flush=True)
        label_info = compute_labels(args.cases, args.data_dir, args.store, args.quick, args.label_workers,
                                    tuple(args.n_high))
    t_labels = time.perf_counter() - t0
    if args.phase in ("train", "all"):
        run_jobs(args, jobs_for(args.cases, args.quick, tuple(args.n_high), tuple(args.strategies)))
    if args.phase in ("report", "train", "all"):
        result = aggregate(Path(args.work_dir), args.cases, args)
        update: dict[str, Any] = {"device": "cpu", **result, "checks": checks(result),
                                  "protocol": {"budget_s": args.budget_s, "low_budget_s": args.low_budget_s,
                                               "jobs": args.jobs, "threads_per_job": 1, "grid": grid(args.quick),
                                               "model": MODEL, "training": TRAINING, "strategies": STRATEGY,
                                               "sampling_high": SAMPLING_HIGH, "quick": args.quick},
                                  "machine": common.machine_info("cpu")}
        if args.phase == "all":
            update["wall_s"] = {"labels": t_labels, "total": time.perf_counter() - t0}
        if label_info:
            update["labels"] = label_info
        res = common.merge_json(results_path, update)
        plot(result, results_path)
        print_summary(res, args.cases)
        print(f"\n{results_path}")
    return 0


def print_summary(res: dict[str, Any], cases: list[str]) -> None:
    for case in cases:
        per = res.get(case, {})
        rows = []
        for n in sorted((k for k in per if k.isdigit()), key=int):
            for strat, v in per[n].items():
                rows.append([n, strat, common.fmt(v["force_mae_meV_A"]), common.fmt(v["force_mae_meV_A_std"]),
                             common.fmt(v["energy_mae_meV"]), common.fmt(v.get("force_ratio_to_ceiling")),
                             len(v["seeds"])])
        print(f"\n{case}")
        common.print_table(["N_high", "strategy", "F MAE meV/Å", "± std", "E MAE meV", "F / ceiling", "seeds"], rows)
    for k, v in res.get("checks", {}).items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    raise SystemExit(main())
