"""Meta-learning across levels of theory: fine-tuning to a held-out level or molecule after
Reptile pre-training, against pooled multi-head pre-training and training from scratch.

Cases (data in benchmarks/meta_data.py):
  ethanol_levels    pre-train on ethanol at GFN1-xTB, GFN2-xTB (rMD17 frames and the B3LYP
                    pool's geometries) and the two rMD17 levels;
                    fine-tune to QM-22's B3LYP (test: 200 other QM-22 frames) and to
                    MP2/cc-pVDZ (rMD17 training frames; test: 200 rMD17 test frames).
                    Scans: the BOTNet ethanol normal-mode and H-removal paths at each held-out level.
  molecules_levels  pre-train on the data sets in ../shared/data except 3BPA; fine-tune to
                    3BPA (train_300K frames; test: train_mixedT frames not in train_300K).

For k fine-tuning frames (the first k of a fixed permutation of the pool; a fifth of them
validate), each method fine-tunes with the same defaults (`polyfid.train.finetune`):
  scratch     a new network trained on the k frames alone
  multi_head  from pooled multi-head pre-training on every task at once
  reptile     from Reptile pre-training over the tasks
  multi_head_replay, reptile_replay
              the same two models fine-tuned with replay: every pre-training task's frames keep
              training their own heads alongside (half the draws), so the backbone goes on
              serving them instead of fitting k frames alone (at k in --replay-ks)
The two pre-trained models of a case get the same wall-clock budget, are trained once,
cached in the work folder and timed separately from the fine-tuning runs. Jobs run as
1-thread processes, --jobs at a time; finished jobs are kept, so a rerun only does the rest.

  .venv/bin/python benchmarks/meta_learning.py            # ~50 min on the 2-core machine
  .venv/bin/python benchmarks/meta_learning.py --quick    # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import meta_data  # noqa: E402

CASES = ["ethanol_levels", "molecules_levels"]
METHODS = ["scratch", "multi_head", "reptile"]
#: the pre-trained methods fine-tuned with replay of their pre-training tasks (`finetune(replay=...)`)
REPLAY_METHODS = ["multi_head_replay", "reptile_replay"]
ALL_METHODS = METHODS + REPLAY_METHODS
REPLAY_KS = [10, 50, 250]
KS = [10, 25, 50, 100, 250]
MODEL = {"architecture": "hipnn", "n_features": 64, "n_sensitivities": 16, "n_interactions": 2,
         "n_atom_layers": 2, "cutoff": 5.0}
PRETRAIN = {"batch_size": 32, "lr": 1e-3, "scheduler": "cosine", "min_lr": 1e-5, "energy_weight": 1.0,
            "force_weight": 100.0, "ema_decay": 0.99, "early_stopping_patience": None,
            "checkpoint_interval_s": 60.0, "epochs": 100000}
META = {"inner_steps": 8, "inner_lr": 1e-3, "inner_optimizer": "adam", "inner_state": "keep", "outer_lr": 1.0,
        "outer_lr_final": 0.1, "tasks_per_step": 1, "eval_every": 25, "outer_steps": 10**7}
FINETUNE = {"warmup_steps": 200, "head_init": "best", "trainable": "all", "val_fraction": 0.2}
REPLAY_SHARE = 0.5  # share of the fine-tuning draws from the pre-training tasks (replay methods)

_CASES: dict[str, Any] = {}  # case data, loaded once in the parent and inherited by forked workers


def load_case(case: str, args) -> Any:
    if case not in _CASES:
        if case == "ethanol_levels":
            _CASES[case] = meta_data.ethanol_levels(args.data_dir, args.store, args.quick)
        else:
            _CASES[case] = meta_data.molecules_levels(args.data_dir, args.quick)
    return _CASES[case]


def _worker_init() -> None:
    common.set_threads(1)


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=common._json_default))
    tmp.replace(path)


# ---- pre-training ------------------------------------------------------------------------------
def pretrain_dir(args, case: str, method: str) -> Path:
    return Path(args.work_dir) / case / f"pretrain_{method}"


def pretrain(case: str, method: str, args) -> dict[str, Any]:
    """Pre-train (or resume) one model of a case for --pretrain-s of wall-clock; cached."""
    from polyfid.data.splits import split_indices
    from polyfid.train.config import load_config
    from polyfid.train.meta import meta_train
    from polyfid.train.strategies import fit_strategy

    out = pretrain_dir(args, case, method)
    done = out / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    data = load_case(case, args)
    tr_parts, va_parts = [], []
    for t in data.tasks.fidelities:  # 5 % of each task validates
        ds = data.tasks.restrict([t])
        tr, va = split_indices(len(ds), [len(ds) - max(2, len(ds) // 20), max(2, len(ds) // 20)], seed=0)
        tr_parts.append(ds[tr])
        va_parts.append(ds[va])
    train, val = sum(tr_parts[1:], tr_parts[0]), sum(va_parts[1:], va_parts[0])
    cfg = load_config({"model": MODEL, "training": PRETRAIN | {"max_time_s": args.pretrain_s, "num_threads": 1},
                       "meta": META, "strategy": {"name": "multi-head"},
                       "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False}})
    t0 = time.perf_counter()
    if method == "reptile":
        res = meta_train(cfg, train, val, out, resume=True)
        info = {"train_s": res.state.elapsed_s, "outer_steps": res.state.step, "best_step": res.state.best_step}
    else:
        res = fit_strategy(cfg, train, val, out, resume=True)
        info = {"train_s": res.train_s, "epochs": res.epochs}
    info |= {"case": case, "method": method, "model": str(out / "model.pt"), "wall_s": time.perf_counter() - t0,
             "tasks": {t: int(train.count(t, "energy")) for t in train.fidelities}, "budget_s": args.pretrain_s}
    _write(done, info)
    return info


# ---- fine-tuning ------------------------------------------------------------------------------
def job_path(args, case: str, level: str, k: int, method: str, seed: int) -> Path:
    return Path(args.work_dir) / case / "finetune" / f"{level}__{method}__{k}__{seed}.json"


def starting_point(case: str, level: str, method: str, ft: Any, elements: list[int], seed: int,
                   args) -> tuple[Any, dict[str, Any]]:
    """What `method` fine-tunes from on the frames `ft` (a new network for scratch, else the
    cached pre-trained model file) and its `finetune` options (steps: the caller's)."""
    import torch

    from polyfid.data.batch import PackedData
    from polyfid.models import build_potential

    opts = dict(FINETUNE) | {"seed": seed, "num_threads": 1}
    if method == "scratch":
        torch.manual_seed(seed)
        model = build_potential(MODEL, sorted(set(ft.elements) | set(elements)), [level])
        model.fit_reference_energies(PackedData(ft, model.cutoff, [level], dtype=torch.float32))
        return model, opts | {"warmup_steps": 0}
    model = pretrain_dir(args, case, method.removesuffix("_replay")) / "model.pt"
    if not model.exists():
        raise FileNotFoundError(f"{model}: pre-train first (benchmarks/meta_learning.py --phase train)")
    if method in REPLAY_METHODS:
        opts |= {"replay": load_case(case, args).tasks, "replay_share": REPLAY_SHARE}
    return model, opts


def finetune_options(opts: dict[str, Any], level: str) -> tuple[Any, Any]:
    """`finetune`'s options for `opts` (FinetuneOptions keys, and TrainingConfig keys such as lr or
    num_threads, which go to its training) at `level`, and the replay frames in `opts` (or None)."""
    from dataclasses import fields

    from polyfid.train.config import FinetuneOptions

    opts = dict(opts)
    replay = opts.pop("replay", None)
    own = {f.name for f in fields(FinetuneOptions)}
    options = FinetuneOptions(fidelity=level, **{k: v for k, v in opts.items() if k in own},
                              training={k: v for k, v in opts.items() if k not in own})
    return options, replay


def finetune_job(case: str, level: str, k: int, method: str, seed: int, args) -> dict[str, Any]:
    """Fine-tune one method on k frames of a held-out level; test errors and scans."""
    from polyfid.analysis.metrics import public
    from polyfid.analysis.smoothness import scan_report
    from polyfid.api import evaluate
    from polyfid.train.finetune import finetune, finetune_summary

    path = job_path(args, case, level, k, method, seed)
    if path.exists():
        return json.loads(path.read_text())
    held = load_case(case, args).held_out[level]
    rng = np.random.default_rng(seed)
    pool = held.pool if seed == 0 else held.pool[rng.permutation(len(held.pool))]
    ft = pool[np.arange(k)]
    out = path.with_suffix("")
    model, opts = starting_point(case, level, method, ft, held.test.elements, seed, args)
    opts |= {"steps": args.finetune_steps}
    t0 = time.perf_counter()
    options, replay = finetune_options(opts, level)
    res = finetune(model, ft, out, options, replay=replay)
    wall = time.perf_counter() - t0
    m = public(evaluate(res.model, held.test))[level]
    frag = {"case": case, "level": level, "k": k, "method": method, "seed": seed, "wall_s": wall,
            **finetune_summary(res),
            "force_mae_meV_A": m.get("force_mae_meV_A"), "energy_mae_meV": m.get("energy_mae_meV"),
            "n_test": m.get("n_energy"), "scans": {}}
    for name, frames in held.scans.items():
        rep = scan_report(res.model, frames, fidelity=level, reference=level)
        frag["scans"][name] = rep.to_dict() | {"e_model": rep.e_model.tolist(), "e_ref": rep.e_ref.tolist(),
                                               "coordinate": rep.coordinate.tolist()}
    _write(path, frag)
    return frag


def run_all(args) -> None:
    """Pre-training first (scratch jobs fill the idle slots), then every fine-tuning job."""
    cases = args.cases
    for c in cases:  # loaded in the parent: forked workers share it
        load_case(c, args)
    jobs = [(c, lv, k, m, s) for c in cases for lv in _CASES[c].held_out for k in args.ks for m in args.methods
            for s in range(args.seeds) if m not in REPLAY_METHODS or k in args.replay_ks]
    todo = [j for j in jobs if not job_path(args, *j).exists()]
    print(f"{len(todo)} fine-tuning jobs to run ({len(jobs) - len(todo)} done before)", flush=True)
    import multiprocessing as mp

    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork"), initializer=_worker_init) as ex:
        bases = dict.fromkeys(m.removesuffix("_replay") for m in args.methods if m != "scratch")
        pre = {(c, m): ex.submit(pretrain, c, m, args) for c in cases for m in bases}
        futs = [ex.submit(finetune_job, *j, args) for j in todo if j[3] == "scratch"]
        for (c, m), f in pre.items():
            info = f.result()
            print(f"pre-trained {c} {m}: {info['train_s']:.0f} s, "
                  f"{info.get('outer_steps', info.get('epochs'))} {'outer steps' if m == 'reptile' else 'epochs'}",
                  flush=True)
        futs += [ex.submit(finetune_job, *j, args) for j in todo if j[3] != "scratch"]
        t0 = time.perf_counter()
        for n, f in enumerate(futs, 1):
            r = f.result()
            print(f"  [{n}/{len(futs)}] {r['case']} {r['level']} k={r['k']} {r['method']} seed {r['seed']}: "
                  f"F {r['force_mae_meV_A']:.1f} meV/Å, E {r['energy_mae_meV']:.1f} meV "
                  f"({r['wall_s']:.0f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)


# ---- report ------------------------------------------------------------------------------------
def aggregate(args) -> dict[str, Any]:
    """{CASE: {K: {METHOD: {force_mae_meV_A, energy_mae_meV (means over seeds and held-out
    levels), levels: {LEVEL: {...}}}}}} plus the scan figures and pre-training times."""
    frags = [json.loads(p.read_text()) for c in args.cases
             for p in sorted((Path(args.work_dir) / c / "finetune").glob("*.json"))]
    out: dict[str, Any] = {}
    for c in args.cases:
        res: dict[str, Any] = {}
        for k in sorted({f["k"] for f in frags if f["case"] == c}):
            res[str(k)] = {}
            for m in ALL_METHODS:
                fs = [f for f in frags if f["case"] == c and f["k"] == k and f["method"] == m]
                if not fs:
                    continue
                levels = {}
                for lv in sorted({f["level"] for f in fs}):
                    g = [f for f in fs if f["level"] == lv]
                    levels[lv] = {"force_mae_meV_A": float(np.mean([f["force_mae_meV_A"] for f in g])),
                                  "energy_mae_meV": float(np.mean([f["energy_mae_meV"] for f in g])),
                                  "force_mae_sd": float(np.std([f["force_mae_meV_A"] for f in g])),
                                  "seeds": len(g), "finetune_s": float(np.mean([f["train_s"] for f in g]))}
                    scans = _scan_means(g)
                    if scans:
                        levels[lv]["scans"] = scans
                res[str(k)][m] = {"force_mae_meV_A": float(np.mean([v["force_mae_meV_A"] for v in levels.values()])),
                                  "energy_mae_meV": float(np.mean([v["energy_mae_meV"] for v in levels.values()])),
                                  "levels": levels}
        pre = {}
        for m in ("multi_head", "reptile"):
            d = pretrain_dir(args, c, m) / "done.json"
            if d.exists():
                pre[m] = json.loads(d.read_text())
        out[c] = res | {"pretraining": pre}
    return out


def _scan_means(frags: list[dict]) -> dict[str, Any]:
    out = {}
    for name in frags[0].get("scans", {}):
        rows = [f["scans"][name] for f in frags]
        out[name] = {key: float(np.mean([r[key] for r in rows]))
                     for key in ("energy_mae_meV", "second_difference_rmse_meV") if key in rows[0]}
        out[name]["model_extrema"] = float(np.mean([len(r["model_extrema"]) for r in rows]))
        out[name]["reference_extrema"] = len(rows[0]["reference_extrema"])
        out[name]["spurious_extrema"] = float(np.mean([r["spurious_extrema"] for r in rows]))
    return out


def checks(result: dict[str, Any], k: int = 50) -> dict[str, Any]:
    """The issue's criteria at k frames, per case and held-out level."""
    out = {}
    for c in CASES:
        row = result.get(c, {}).get(str(k), {})
        if not all(m in row for m in METHODS):
            continue
        for lv, r in row["reptile"]["levels"].items():
            s, mh = row["scratch"]["levels"][lv], row["multi_head"]["levels"][lv]
            item = {"reptile_over_scratch_force": r["force_mae_meV_A"] / s["force_mae_meV_A"],
                    "reptile_le_half_scratch": r["force_mae_meV_A"] <= 0.5 * s["force_mae_meV_A"],
                    "reptile_le_multi_head": r["force_mae_meV_A"] <= mh["force_mae_meV_A"]}
            if "scans" in r:
                item["scan_energy_mae_le_others"] = all(
                    r["scans"][n]["energy_mae_meV"] <= min(s["scans"][n]["energy_mae_meV"],
                                                           mh["scans"][n]["energy_mae_meV"]) for n in r["scans"])
                item["no_more_extrema_than_reference"] = all(
                    r["scans"][n]["model_extrema"] <= r["scans"][n]["reference_extrema"] for n in r["scans"])
            if "reptile_replay" in row and "multi_head_replay" in row:
                rr = row["reptile_replay"]["levels"][lv]["force_mae_meV_A"]
                item |= {"reptile_replay_over_scratch_force": rr / s["force_mae_meV_A"],
                         "reptile_replay_le_half_scratch": rr <= 0.5 * s["force_mae_meV_A"],
                         "reptile_replay_le_multi_head_replay":
                             rr <= row["multi_head_replay"]["levels"][lv]["force_mae_meV_A"]}
            out[f"{c}/{lv}"] = item
    return out


def plot(result: dict[str, Any], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, lv) for c in args.cases for lv in sorted({lv for k in result.get(c, {}) if k.isdigit()
                                                            for m in result[c][k].values()
                                                            for lv in m["levels"]})]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (c, lv) in zip(axes[0], panels):
        for m in ALL_METHODS:
            ks = [int(k) for k in result[c] if k.isdigit() and m in result[c][k] and lv in result[c][k][m]["levels"]]
            ys = [result[c][str(k)][m]["levels"][lv]["force_mae_meV_A"] for k in ks]
            if ks:
                ax.plot(ks, ys, "o--" if m in REPLAY_METHODS else "o-", label=m)
        ax.set(xscale="log", yscale="log", xlabel="fine-tuning frames k", ylabel="test force MAE (meV/Å)",
               title=f"{c}: {lv}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(fig)
    _plot_scans(args, path)


def _plot_scans(args, path: Path, k: int = 50) -> None:
    """Scans at k frames, seed 0: reference and the three methods."""
    from polyfid.analysis.smoothness import ScanReport, plot_scan

    for c in args.cases:
        for p in sorted((Path(args.work_dir) / c / "finetune").glob(f"*__reptile__{k}__0.json")):
            level = p.name.split("__")[0]
            frags = {m: job_path(args, c, level, k, m, 0) for m in METHODS}
            if not all(f.exists() for f in frags.values()):
                continue
            data = {m: json.loads(f.read_text()) for m, f in frags.items()}
            for scan in data["reptile"]["scans"]:
                reports = {m: ScanReport.from_dict(d["scans"][scan]) for m, d in data.items()}
                plot_scan(reports, path.parent / f"{path.stem}_{c}_{level}_{scan}.png",
                          f"{level} fine-tuned on {k} frames: {scan}")


def print_summary(result: dict[str, Any]) -> None:
    for c, res in result.items():
        if not isinstance(res, dict) or c not in CASES:
            continue
        print(f"\n{c}: pre-training {json.dumps({m: round(v['train_s']) for m, v in res['pretraining'].items()})} s")
        rows = []
        for k, row in res.items():
            if not k.isdigit():
                continue
            for m, v in row.items():
                for lv, x in v["levels"].items():
                    rows.append([k, lv, m, common.fmt(x["force_mae_meV_A"]), common.fmt(x["energy_mae_meV"]),
                                 x["seeds"]])
        common.print_table(["k", "level", "method", "F MAE meV/Å", "E MAE meV", "seeds"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--phase", choices=["labels", "train", "report", "all"], default="all")
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--store", type=Path, default=meta_data.DEFAULT_STORE, help="label store (SQLite), outside the repo")
    p.add_argument("--work-dir", type=Path, default=None, help="default benchmarks/runs/meta_learning[_quick]")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; --quick: "
                   "the work folder)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="fine-tuning set sizes (default 10 25 50 100 250)")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--replay-ks", type=int, nargs="+", default=None,
                   help=f"k of the replay methods (default {' '.join(map(str, REPLAY_KS))}; quick: 10 50)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds (subset draw and initialisation)")
    p.add_argument("--pretrain-s", type=float, default=None, help="wall-clock budget of each pre-training "
                   "(default 480 s; quick 20 s)")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (default 1000; quick 60)")
    p.add_argument("--jobs", type=int, default=2, help="1-thread processes at a time")
    p.add_argument("--label-workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="k in {10, 50}, short budgets, small test sets")
    args = p.parse_args(argv)
    args.ks = args.ks or ([10, 50] if args.quick else KS)
    args.replay_ks = args.replay_ks or ([10, 50] if args.quick else REPLAY_KS)
    args.pretrain_s = args.pretrain_s or (20.0 if args.quick else 480.0)
    args.finetune_steps = args.finetune_steps or (60 if args.quick else 1000)
    stem = "meta_learning_quick" if args.quick else "meta_learning"
    args.work_dir = args.work_dir or (common.DEFAULT_WORK / stem)
    out = args.out or (args.work_dir if args.quick else common.DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    if args.phase in ("labels", "all"):
        meta_data.compute_labels(args.data_dir, args.store, args.quick, workers=args.label_workers)
        if args.phase == "labels":  # labels only: the results file is not this phase's to rewrite
            return 0
    if args.phase in ("train", "all"):
        run_all(args)
    result = aggregate(args)
    path = out / f"{stem}.json"
    update = {"device": "cpu", **result, "checks": checks(result),
              "protocol": {"model": MODEL, "pretraining": PRETRAIN | {"max_time_s": args.pretrain_s}, "meta": META,
                           "finetune": FINETUNE | {"steps": args.finetune_steps}, "ks": args.ks, "seeds": args.seeds,
                           "replay": {"methods": REPLAY_METHODS, "share": REPLAY_SHARE, "ks": args.replay_ks,
                                      "frames": "every pre-training task's frames, all of them"},
                           "jobs": args.jobs, "threads_per_job": 1, "quick": args.quick},
              "machine": common.machine_info("cpu")}
    if args.phase == "all":
        update["wall_s"] = time.perf_counter() - t0
    res = common.merge_json(path, update)
    plot(result, args, path)
    print_summary(res)
    print(json.dumps(res["checks"], indent=1))
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
