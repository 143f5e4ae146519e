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
Every case runs N_high = 100 at seeds 0, 1, 2; the MP2 case also N_high = 50, 200, 500 (seed 0).

The two levels are given as two data sets, one per level, and merged with `Dataset.merge`, as
`polyfid train` merges the files of a configuration: a geometry at both levels is one frame.

Strategies, all on the same HIP-NN: sf_energy (high energies only), sf_energy_forces (high
energies and forces on the same frames: the ceiling), low_as_high (low-level reference forces
as the prediction; energies shifted by per-element offsets fitted on the N_high frames),
multi_head, embedding (one network for both levels, warm-started from the low-level model),
delta (low-level model + a smaller Δ network on high − low where frames have both), transfer
(low-level model fine-tuned on the high energies). No high-level force enters training or
validation apart from sf_energy_forces; there is no validation or early stopping: every model is
evaluated with its final EMA weights.

Budgets are optimiser steps (batch 16), so a rerun reproduces on any machine. Each case's
low-level model is trained once (--low-steps) and shared by the multi-fidelity strategies as
their pre-training; each strategy then takes --stage-steps of its own. Its budget counts the
shared pre-training in full: every strategy and every baseline gets --low-steps + --stage-steps
(`protocol.budget_steps` in the JSON). Each multi-fidelity model is also scored at the low level
against the test frames' low-level labels where it predicts that level (`low_force_mae_meV_A`,
and `low_force_ratio` to the low-level-only model's figure).

Multi-head settings were chosen with `--phase select` (`results/multifidelity_selection.json`):
variants of the joint multi-head on rmd17_xtb_ethanol at N_high = 100 (seeds 0, 1, 2), scored on
the PBE energies and forces of 100 training-pool frames that are in no high-level subset of the
grid, never on test frames. The chosen variant became `strategy: multi-head`'s default.

Jobs run as 1-thread processes, --jobs at a time. Labels (MP2, xTB) are computed with
polyfid.label and cached in --store, outside the repository; finished jobs are kept in the
work folder, so an interrupted benchmark continues where it stopped.

  python benchmarks/multifidelity.py [--quick] [--cases ...] [--store PATH] [--jobs 2] [--phase select]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CASES = ["rmd17_mp2_ethanol", "rmd17_xtb_ethanol", "rmd17_xtb_aspirin", "pyseqm"]
STRATEGIES = ["sf_energy", "sf_energy_forces", "low_as_high", "multi_head", "embedding", "delta", "transfer"]
TRAINED = [s for s in STRATEGIES if s != "low_as_high"]
MULTI_FIDELITY = ("multi_head", "embedding", "delta", "transfer")
MP2, XTB, PBE = "mp2/cc-pvdz", "gfn2-xtb", "pbe_def2svp"
DEFAULT_STORE = Path.home() / ".cache" / "polyfid" / "multifidelity_labels.sqlite"

#: the HIP-NN of every model (the PEERS.md size)
MODEL = dict(common.ARCH)
#: training recipe of every network (cosine schedule over the step budget; final EMA weights)
TRAINING = {
    "epochs": 1_000_000, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-6, "scheduler": "cosine",
    "energy_weight": 1.0, "force_weight": 100.0, "final_energy_weight": 1000.0, "final_fraction": 0.25,
    "ema_decay": 0.99, "grad_clip": 100.0, "early_stopping_patience": None, "num_threads": 1,
    "checkpoint_interval_s": 30.0,
}
#: step budgets: the shared low-level pre-training and each strategy's own stage(s)
LOW_STEPS, STAGE_STEPS = 6000, 1000
QUICK_LOW_STEPS, QUICK_STAGE_STEPS = 300, 100
SAMPLING_HIGH = 0.25  # share of training draws from the high-level frames (embedding; multi-head's default)
#: strategy settings (their second stage also gets max_steps = --stage-steps)
STRATEGY = {
    "multi_head": {"name": "multi-head"},
    "embedding": {"name": "embedding", "warm_start": True, "embedding_dim": 8},
    "delta": {"name": "delta", "delta_model": {"n_features": 32}},
    "transfer": {"name": "transfer", "second_stage": {"lr": 1e-4}},
}
#: --phase select: multi-head variants (and the other strategies for reference) compared on validation
#: frames of rmd17_xtb_ethanol; "scratch": no shared pre-training, all steps joint from random weights
VARIANTS: dict[str, dict[str, Any]] = {
    "mh_previous": {"strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": 1e-3}},
                    "sampling": SAMPLING_HIGH},
    "mh_lr1e-4": {"strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": 1e-4}},
                  "sampling": SAMPLING_HIGH},
    "mh_lr3e-4": {"strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": 3e-4}},
                  "sampling": SAMPLING_HIGH},
    "mh_scratch": {"strategy": {"name": "multi-head", "warm_start": False}, "sampling": SAMPLING_HIGH,
                   "scratch": True},
    "mh_tie": {"strategy": {"name": "multi-head", "warm_start": True, "head_tie": 1.0, "second_stage": {"lr": 1e-3}},
               "sampling": SAMPLING_HIGH},
    "mh_lr1e-4_share0.5": {"strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": 1e-4}},
                           "sampling": 0.5},
    "transfer": {"strategy": STRATEGY["transfer"]},
    "delta": {"strategy": STRATEGY["delta"]},
}
for _w in (10, 100, 1000):  # the high level's energies weighted up (per-fidelity loss balancing)
    VARIANTS[f"mh_lr3e-4_ew{_w}"] = {
        "strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": 3e-4}},
        "sampling": SAMPLING_HIGH, "fidelity_weights": {"energy": _w}}
for _lr, _w, _share, _final in ((3e-4, 1e4, 0.25, True), (3e-4, 1e5, 0.25, True), (1e-4, 1e4, 0.25, True),
                                 (3e-4, 1000, 0.5, True), (3e-4, 1000, 0.25, False), (3e-4, 1e4, 0.5, True)):
    VARIANTS[f"mh_lr{_lr:.0e}_ew{_w:.0e}_share{_share}{'' if _final else '_nofinal'}".replace("e-0", "e-")
             .replace("e+0", "e")] = {
        "strategy": {"name": "multi-head", "warm_start": True,
                     "second_stage": {"lr": _lr} | ({} if _final else {"final_energy_weight": None})},
        "sampling": _share, "fidelity_weights": {"energy": _w}}
for _name, _second, _share, _scratch in (("", {"lr": 3e-4}, 0.25, False), ("_share0.5", {"lr": 3e-4}, 0.5, False),
                                         ("_lr1e-3", {"lr": 1e-3}, 0.25, False), ("_scratch", {}, 0.25, True)):
    VARIANTS[f"mh_rms{_name}"] = {"strategy": {"name": "multi-head", "warm_start": not _scratch,
                                               "second_stage": _second}, "sampling": _share, "scratch": _scratch,
                                  "training": {"loss_balance": "rms"}}
for _lr in (3e-4, 1e-4):
    VARIANTS[f"mh_lr{_lr:.0e}_ew1e5_share0.5".replace("e-0", "e-")] = {
        "strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": _lr}}, "sampling": 0.5,
        "fidelity_weights": {"energy": 1e5}}
for _part in ("last", "head"):  # which part of the network transfer needs to move
    VARIANTS[f"transfer_{_part}"] = {"strategy": STRATEGY["transfer"] | {"trainable": _part}}
VARIANTS["mh_lr1e-3_ew100"] = {"strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": 1e-3}},
                               "sampling": SAMPLING_HIGH, "fidelity_weights": {"energy": 100}}
VARIANTS["mh_lr3e-4_ew100_share0.5"] = {
    "strategy": {"name": "multi-head", "warm_start": True, "second_stage": {"lr": 3e-4}}, "sampling": 0.5,
    "fidelity_weights": {"energy": 100}}
# The recipes name every setting whose library default changed after they ran (second-stage learning rate,
# warm start, target share), so that each reproduces its fragment.
for _v in VARIANTS.values():  # the variants above: one linear head per level on shared blocks
    if _v["strategy"]["name"] == "multi-head":
        _v["strategy"]["fidelity_blocks"] = 0
# each level its own last interaction block (BranchedPotential), which transfer_last showed is what moves
for _name, _second, _share, _extra in (("", {"lr": 1e-3}, 0.25, {}), ("_lr3e-4", {"lr": 3e-4}, 0.25, {}),
                                       ("_lr1e-4", {"lr": 1e-4}, 0.25, {}), ("_share0.5", {"lr": 1e-3}, 0.5, {}),
                                       ("_lr3e-4_share0.5", {"lr": 3e-4}, 0.5, {}),
                                       ("_ew10", {"lr": 1e-3}, 0.25, {"fidelity_weights": {"energy": 10}}),
                                       ("_scratch", {}, 0.25, {"scratch": True}),
                                       ("_lr1e-4_share0.5", {"lr": 1e-4}, 0.5, {}),
                                       ("_lr1e-4_nosampling", {"lr": 1e-4}, None, {}),
                                       ("_lr3e-5", {"lr": 3e-5}, 0.25, {}),
                                       ("_lr1e-4_ew10", {"lr": 1e-4}, 0.25, {"fidelity_weights": {"energy": 10}})):
    VARIANTS[f"mhb{_name}"] = {"strategy": {"name": "multi-head", "warm_start": not _extra.get("scratch"),
                                            "fidelity_blocks": 1, "second_stage": _second, "target_share": None},
                               "sampling": _share, **_extra}
# embedding (one head, the level a learned input vector): the benchmark's recipe, and from scratch
VARIANTS["emb_previous"] = {"strategy": {"name": "embedding", "warm_start": True, "embedding_dim": 8},
                            "sampling": SAMPLING_HIGH}
VARIANTS["emb_lr1e-4"] = {"strategy": {"name": "embedding", "warm_start": True, "embedding_dim": 8,
                                       "second_stage": {"lr": 1e-4}}, "sampling": SAMPLING_HIGH}
VARIANTS["emb_scratch"] = {"strategy": {"name": "embedding", "warm_start": False, "embedding_dim": 8},
                           "sampling": SAMPLING_HIGH, "scratch": True}
# the library's multi-head as chosen: strategy {name: multi-head} and nothing else (warm start, each level its own
# last block, second stage at training.lr / 10, the target level at least a quarter of the joint stage's draws)
VARIANTS["mh_default"] = {"strategy": {"name": "multi-head"}}
SELECT_CASE, SELECT_N, SELECT_SEEDS, N_VALIDATION = "rmd17_xtb_ethanol", 100, (0, 1, 2), 100


# ---- protocol ---------------------------------------------------------------------------------
N_HIGH = (50, 100, 200, 500)


def grid(case: str, quick: bool, n_high: tuple[int, ...] = N_HIGH) -> list[tuple[int, int]]:
    """(N_high, seed) pairs: N = 100 with three seeds for every case; the MP2 case also 50, 200 and
    500 with one."""
    if quick:
        return [(20, 0)]
    pts = [(100, 0), (100, 1), (100, 2)] + ([(50, 0), (200, 0), (500, 0)] if case == "rmd17_mp2_ethanol" else [])
    return [(n, s) for n, s in pts if n in n_high]


def high_subset(n_pool: int, n_high: int, seed: int) -> np.ndarray:
    """Nested subsets: the first n_high of one permutation per seed."""
    return np.random.default_rng(seed).permutation(n_pool)[:n_high]


def validation_indices(n_pool: int, quick: bool) -> np.ndarray:
    """N_VALIDATION pool frames of the selection case in none of its high-level subsets: the
    selection's validation set (their high-level labels never enter training)."""
    used = {int(i) for n, s in grid(SELECT_CASE, quick) for i in high_subset(n_pool, n, s)}
    free = np.array([i for i in range(n_pool) if i not in used])
    return np.sort(np.random.default_rng(7).choice(free, size=min(N_VALIDATION, len(free)), replace=False))


def levels(case: str) -> tuple[str, str]:
    return {"rmd17_mp2_ethanol": (PBE, MP2), "rmd17_xtb_ethanol": (XTB, PBE),
            "rmd17_xtb_aspirin": (XTB, PBE), "pyseqm": ("pm6", "dft")}[case]


def _rmd17(data_dir: Path, molecule: str):
    from polyfid.data.readers import read

    train_f, test_f = common.rmd17_files(data_dir, molecule)
    train = read(train_f).restrict([PBE])
    tr_idx, _ = common.train_val_split(len(train), 50, 0)
    return train[np.sort(tr_idx)], read(test_f).restrict([PBE])


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
        idx = sorted({int(i) for n, s in grid(case, quick, n_high) for i in high_subset(len(frames["train"]), n, s)})
        # E+F for the high frames: the ceiling (sf_energy_forces) trains on their forces
        return [(MP2, [frames["train"][i] for i in idx], True), (MP2, list(frames["test"]), True)]
    if case.startswith("rmd17_xtb"):
        return [(XTB, list(frames["train"]), True), (XTB, list(frames["test"]), True)]
    return []


def build(case: str, data_dir: Path, store_path: Path, n_high: int, seed: int, quick: bool):
    """(low-level data set, high-level subset with E+F, test set with high E+F and low labels,
    validation frames with high E+F: the selection case's pool frames in no high subset, else None).
    The low and high sets are separate data sets, as a user's two files are."""
    from polyfid.data.frame import Dataset, Frame
    from polyfid.label import LabelStore

    low, high = levels(case)
    fr = case_frames(case, data_dir, quick)
    if case == "pyseqm":
        hi = fr["high_pool"][high_subset(len(fr["high_pool"]), n_high, seed)]
        return fr["low"].restrict([low]), hi.restrict([high]), fr["test"], None
    with LabelStore(store_path) as st:
        train, test = fr["train"], fr["test"]
        if case == "rmd17_mp2_ethanol":
            idx = high_subset(len(train), n_high, seed)
            hi = _relabel(Dataset([Frame(f.numbers, f.positions, source=f.source) for f in train[idx]]), st,
                          MP2, MP2, True)
            test = _relabel(test, st, MP2, MP2, True)
            return train.restrict([PBE]), hi, test, None
        train = _relabel(train, st, XTB, XTB, True)
        test = _relabel(test, st, XTB, XTB, True)
        idx = high_subset(len(train), n_high, seed)
        val = train[validation_indices(len(train), quick)].restrict([XTB, PBE]) if case == SELECT_CASE else None
        return train.restrict([XTB]), train[idx].restrict([PBE]), test, val


def merged(low_ds, high_ds, high: str, forces: bool = False):
    """The low-level data set and the high-level energies (forces only if asked) merged as the
    command line merges two files: a frame at both levels where the geometry is shared."""
    from polyfid.data.frame import Dataset, Frame, Labels

    hi = Dataset([Frame(f.numbers, f.positions, {high: Labels(energy=f.labels[high].energy,
                                                             forces=f.labels[high].forces if forces else None)},
                        cell=f.cell, pbc=f.pbc, source=f.source) for f in high_ds])
    return Dataset.merge([low_ds, hi])


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
    name = strategy.replace(":", "-")
    return f"{case}__low" if strategy == "low" else f"{case}__{name}__{n_high}__{seed}"


def recipe(strategy: str) -> dict[str, Any]:
    """How a multi-fidelity job trains: a benchmark strategy, or a selection variant ("select:NAME")."""
    if strategy.startswith("select:"):
        return VARIANTS[strategy.removeprefix("select:")]
    return {"strategy": STRATEGY[strategy], "sampling": SAMPLING_HIGH if strategy == "embedding" else None}


def _config(out: Path, steps: int, seed: int, strategy: dict | None = None, training: dict | None = None) -> dict:
    return {
        "model": MODEL,
        "training": TRAINING | {"max_steps": steps, "seed": seed} | (training or {}),
        "strategy": strategy or {"name": "single"},
        "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False},
    }


def _fit_multi_fidelity(args, rec: dict[str, Any], levels_: tuple[str, str], seed: int, out: Path, train, base):
    """A multi-fidelity strategy on the merged data: from the shared low-level model `base`, its
    own stage(s) of --stage-steps; with rec["scratch"], all --low-steps + --stage-steps from
    random weights."""
    from polyfid.train.config import load_config
    from polyfid.train.strategies import fit_strategy

    low, high = levels_
    st = dict(rec["strategy"]) | {"target": high, "base": low}
    training = {"sampling": {high: rec["sampling"]}} if rec.get("sampling") else {}
    if rec.get("fidelity_weights"):  # loss weights of the high level's terms
        training["fidelity_weights"] = {high: rec["fidelity_weights"]}
    training |= rec.get("training", {})
    if rec.get("scratch"):
        cfg = load_config(_config(out, args.low_steps + args.stage_steps, seed, st, training))
        return fit_strategy(cfg, train, None, out, resume=True)
    st["second_stage"] = dict(st.get("second_stage", {})) | {"max_steps": args.stage_steps}
    cfg = load_config(_config(out, args.low_steps, seed, st, training))
    return fit_strategy(cfg, train, None, out, resume=True, base_model=base)


def _scores(model, frames, fidelity: str, prefix: str = "") -> dict[str, float]:
    from polyfid.analysis.metrics import error_metrics, public
    from polyfid.data.batch import PackedData

    ds = frames.restrict([fidelity])
    m = public(error_metrics(model, PackedData(ds, model.cutoff, model.fidelities), device="cpu"))[fidelity]
    keys = ("energy_mae_meV", "force_mae_meV_A", "energy_rmse_meV", "force_rmse_meV_A")
    return {prefix + k: m[k] for k in keys} | {prefix + "n": len(ds)}


def run_job(args, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from polyfid.models import load_model
    from polyfid.train.config import load_config
    from polyfid.train.strategies import fit_strategy

    torch.set_num_threads(1)
    case, strategy, n_high, seed = spec["case"], spec["strategy"], spec.get("n_high"), spec.get("seed")
    low, high = levels(case)
    work = Path(args.work_dir)
    out = work / "runs" / job_name(case, strategy, n_high, seed)
    low_ds, high_ds, test, val = build(case, args.data_dir, args.store, n_high or 1, seed or 0, args.quick)
    t0 = time.perf_counter()
    if strategy == "low":
        cfg = load_config(_config(out, args.low_steps, 0, {"name": "single", "target": low}))
        res = fit_strategy(cfg, low_ds, None, out, resume=True)
        model, target, n_train = res.model, low, len(low_ds)
    elif strategy in ("sf_energy", "sf_energy_forces"):
        train = high_ds.restrict([high])
        if strategy == "sf_energy":
            for f in train:
                f.labels[high].forces = None
        cfg = load_config(_config(out, args.low_steps + args.stage_steps, seed, {"name": "single", "target": high}))
        res = fit_strategy(cfg, train, None, out, resume=True)
        model, target, n_train = res.model, high, len(train)
    else:
        base = load_model(work / "runs" / job_name(case, "low", None, None) / "model.pt")
        train = merged(low_ds, high_ds, high)
        res = _fit_multi_fidelity(args, recipe(strategy), (low, high), seed, out, train, base)
        model, target, n_train = res.model, high, len(train)
    wall = time.perf_counter() - t0
    selecting = strategy.startswith("select:")
    frames = val if selecting else test
    row = {"case": case, "strategy": strategy, "n_high": n_high, "seed": seed,
           "scored_on": "validation" if selecting else "test", **_scores(model, frames, target),
           "train_s": res.train_s, "epochs": res.epochs, "wall_s": wall,
           "steps": {k: s.step for k, s in res.stages.items()},
           "stages": {k: {"epochs": s.epoch, "steps": s.step, "train_s": s.elapsed_s} for k, s in res.stages.items()},
           "n_train_frames": n_train}
    if strategy == "low" and val is not None:
        row |= _scores(model, val, low, "val_low_")
    if strategy != "low" and low in model.fidelities:
        row |= _scores(model, frames, low, "low_")  # does the joint model still predict the low level?
    return row


def low_as_high(case: str, args, n_high: int, seed: int) -> dict[str, Any]:
    """The low level's reference labels as the high-level prediction, energies shifted by
    per-element offsets fitted (least squares, minimum norm) on the N_high frames."""
    from polyfid.data.frame import Dataset

    low, high = levels(case)
    low_ds, high_ds, test, _ = build(case, args.data_dir, args.store, n_high, seed, args.quick)
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
        for n, s in grid(case, quick, n_high):
            for strat in strategies:
                if strat == "delta" and case == "pyseqm":
                    continue  # no configuration carries both levels
                jobs.append({"case": case, "strategy": strat, "n_high": n, "seed": s})
    return jobs


def select_jobs(quick: bool, variants: list[str]) -> list[dict[str, Any]]:
    """The selection's jobs: the low-level model of SELECT_CASE and every variant at each seed."""
    n = 20 if quick else SELECT_N
    return [{"case": SELECT_CASE, "strategy": "low"}] + [
        {"case": SELECT_CASE, "strategy": f"select:{v}", "n_high": n, "seed": s}
        for v in variants for s in ((0,) if quick else SELECT_SEEDS)]


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
                   "--stage-steps", str(args.stage_steps), "--low-steps", str(args.low_steps)]
            if args.quick:
                cmd.append("--quick")
            log = open(work / "logs" / f"{name}.log", "w")
            running.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                   env=common.thread_env(1)), time.perf_counter()))
        time.sleep(0.5)
    print(f"all jobs done in {time.perf_counter() - t_start:.0f} s", flush=True)


# ---- report ---------------------------------------------------------------------------------------
def _mean_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and spreads over seeds of one (case, N_high, strategy)."""
    row: dict[str, Any] = {}
    for key in ("force_mae_meV_A", "energy_mae_meV", "low_force_mae_meV_A", "low_energy_mae_meV"):
        vals = np.array([r[key] for r in runs if key in r])
        if len(vals):
            row[key], row[key + "_std"] = float(vals.mean()), float(vals.std())
    row["seeds"] = sorted(r["seed"] for r in runs)
    row["train_s"] = float(np.mean([r["train_s"] for r in runs]))
    return row


def aggregate(work: Path, cases: list[str], args) -> dict[str, Any]:
    frags = [json.loads(p.read_text()) for p in sorted((work / "fragments").glob("*.json"))]
    frags = [f for f in frags if not f["strategy"].startswith("select:")]
    result: dict[str, Any] = {}
    for case in cases:
        done = {(f["n_high"], f["seed"]) for f in frags if f["case"] == case and f["strategy"] != "low"}
        for n, s in grid(case, args.quick):
            if (n, s) in done:
                frags.append(low_as_high(case, args, n, s))
        per: dict[int, dict[str, list]] = {}
        for f in frags:
            if f["case"] == case and f["strategy"] != "low":
                per.setdefault(f["n_high"], {}).setdefault(f["strategy"], []).append(f)
        low = next((f for f in frags if f["case"] == case and f["strategy"] == "low"), None)
        out: dict[str, Any] = {}
        for n in sorted(per):
            out[str(n)] = {strat: _mean_row(per[n][strat]) for strat in STRATEGIES if per[n].get(strat)}
            ceil = out[str(n)].get("sf_energy_forces")
            for v in out[str(n)].values():
                if ceil:
                    v["force_ratio_to_ceiling"] = v["force_mae_meV_A"] / ceil["force_mae_meV_A"]
                    v["energy_ratio_to_ceiling"] = v["energy_mae_meV"] / ceil["energy_mae_meV"]
                if low and "low_force_mae_meV_A" in v:
                    v["low_force_ratio"] = v["low_force_mae_meV_A"] / low["force_mae_meV_A"]
        if low:
            out["low_level_model"] = {k: low[k] for k in ("energy_mae_meV", "force_mae_meV_A", "train_s", "epochs")}
            out["low_level_model"]["steps"] = low["steps"]
            out["low_level_model"]["note"] = ("the shared low-level model, scored against the low-level labels "
                                              "of the test frames")
        result[case] = out
    return result


def selection(work: Path) -> dict[str, Any]:
    """Validation errors of the selection variants: mean and spread over the seeds, per variant."""
    frags = [json.loads(p.read_text()) for p in sorted((work / "fragments").glob("*.json"))]
    by: dict[str, list] = {}
    for f in frags:
        if f["strategy"].startswith("select:"):
            by.setdefault(f["strategy"].removeprefix("select:"), []).append(f)
    rows = {v: _mean_row(runs) | {"per_seed_force_mae_meV_A": [r["force_mae_meV_A"] for r in
                                                                sorted(runs, key=lambda r: r["seed"])]}
            for v, runs in by.items()}
    low = json.loads((work / "fragments" / f"{job_name(SELECT_CASE, 'low', None, None)}.json").read_text())
    for row in rows.values():  # the low level on the validation frames, against the low-level-only model
        if "low_force_mae_meV_A" in row and "val_low_force_mae_meV_A" in low:
            row["low_force_ratio"] = row["low_force_mae_meV_A"] / low["val_low_force_mae_meV_A"]
    return {"case": SELECT_CASE, "n_high": SELECT_N, "scored_on": f"validation: {N_VALIDATION} pool frames in no "
            "high-level subset, their PBE energies and forces", "variants": rows,
            "recipes": {v: VARIANTS[v] for v in rows}}


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's criteria at N_high = 100: multi_head against transfer and the ceiling (MP2 case),
    every strategy against the low level's own forces, the joint model's low-level forces."""
    out: dict[str, Any] = {}
    for case, per in result.items():
        r = per.get("100")
        if not r or "low_as_high" not in r:
            continue
        lah = r["low_as_high"]["force_mae_meV_A"]
        for strat in MULTI_FIDELITY:
            if strat in r:
                out[f"{case}_{strat}_force_vs_low_as_high"] = r[strat]["force_mae_meV_A"] / lah
        mh = r.get("multi_head")
        if mh and "low_force_ratio" in mh:
            out[f"{case}_multi_head_low_level_force_vs_low_only(<=1.2)"] = mh["low_force_ratio"]
        if case == "rmd17_mp2_ethanol" and mh and "transfer" in r and "sf_energy_forces" in r:
            out[f"{case}_multi_head_vs_transfer(<=1.1)"] = mh["force_mae_meV_A"] / r["transfer"]["force_mae_meV_A"]
            out[f"{case}_multi_head_vs_ceiling(<=1.0)"] = (mh["force_mae_meV_A"]
                                                            / r["sf_energy_forces"]["force_mae_meV_A"])
        if case.startswith("rmd17"):
            out[f"{case}_every_strategy_beats_low_as_high"] = all(
                r[s]["force_mae_meV_A"] < lah for s in MULTI_FIDELITY if s in r)
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
    p.add_argument("--phase", choices=["labels", "select", "train", "report", "all"], default="all",
                   help="select: the multi-head variants on validation frames (results/multifidelity_selection.json)")
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="label store (SQLite), outside the repo")
    p.add_argument("--work-dir", type=Path, default=None, help="default benchmarks/runs/multifidelity[_quick]")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                   "with --quick the work folder)")
    p.add_argument("--low-steps", type=int, default=None,
                   help=f"optimiser steps of each case's shared low-level model (default {LOW_STEPS})")
    p.add_argument("--stage-steps", type=int, default=None,
                   help=f"optimiser steps of each multi-fidelity strategy's own stage(s) (default {STAGE_STEPS}); "
                   "the baselines get --low-steps + --stage-steps")
    p.add_argument("--jobs", type=int, default=2, help="1-thread training processes at a time")
    p.add_argument("--label-workers", type=int, default=2, help="processes computing labels")
    p.add_argument("--quick", action="store_true", help="N_high = 20, one seed, 300 + 100 steps, small test sets")
    p.add_argument("--n-high", type=int, nargs="+", default=list(N_HIGH), choices=N_HIGH,
                   help="the N_high values to run (labels and jobs); the report shows every one done so far")
    p.add_argument("--strategies", nargs="+", default=TRAINED, choices=TRAINED,
                   help="the trained strategies to run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="the multi-head variants of --phase select")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.low_steps = args.low_steps or (QUICK_LOW_STEPS if args.quick else LOW_STEPS)
    args.stage_steps = args.stage_steps or (QUICK_STAGE_STEPS if args.quick else STAGE_STEPS)
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
    command = " ".join(["python benchmarks/multifidelity.py", *(argv if argv is not None else sys.argv[1:])])
    protocol = {"budget_steps": {"low_level_pretraining": args.low_steps, "own_stages": args.stage_steps,
                                 "every_strategy_and_baseline": args.low_steps + args.stage_steps},
                "jobs": args.jobs, "threads_per_job": 1, "model": MODEL, "training": TRAINING,
                "strategies": STRATEGY, "sampling_high": SAMPLING_HIGH, "quick": args.quick,
                "grid": {c: grid(c, args.quick) for c in args.cases}}
    t0 = time.perf_counter()
    label_info = None
    if args.phase in ("labels", "all"):
        print(f"labels -> {args.store}", flush=True)
        label_info = compute_labels(args.cases, args.data_dir, args.store, args.quick, args.label_workers,
                                    tuple(args.n_high))
    t_labels = time.perf_counter() - t0
    if args.phase == "select":
        run_jobs(args, select_jobs(args.quick, args.variants))
        sel = selection(Path(args.work_dir)) | {"protocol": protocol, "command": command,
                                                "machine": common.machine_info("cpu")}
        path = out / f"{stem}_selection.json"
        path.write_text(json.dumps(sel, indent=2, default=str) + "\n")
        rows = sorted(sel["variants"].items(), key=lambda kv: kv[1]["force_mae_meV_A"])
        common.print_table(["variant", "val F MAE meV/Å", "± std", "val E MAE meV", "per seed", "low F / low only"],
                           [[v, common.fmt(r["force_mae_meV_A"]), common.fmt(r["force_mae_meV_A_std"]),
                             common.fmt(r["energy_mae_meV"]),
                             " ".join(common.fmt(x) for x in r["per_seed_force_mae_meV_A"]),
                             common.fmt(r.get("low_force_ratio"))] for v, r in rows])
        print(f"\n{path}")
        return 0
    if args.phase in ("train", "all"):
        run_jobs(args, jobs_for(args.cases, args.quick, tuple(args.n_high), tuple(args.strategies)))
    if args.phase in ("report", "train", "all"):
        result = aggregate(Path(args.work_dir), args.cases, args)
        update: dict[str, Any] = {"device": "cpu", **result, "checks": checks(result), "protocol": protocol,
                                  "command": command, "machine": common.machine_info("cpu")}
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
                             common.fmt(v.get("low_force_ratio")), len(v["seeds"])])
        print(f"\n{case}")
        common.print_table(["N_high", "strategy", "F MAE meV/Å", "± std", "E MAE meV", "F / ceiling",
                            "low-level F / low-only", "seeds"], rows)
    for k, v in res.get("checks", {}).items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    raise SystemExit(main())
