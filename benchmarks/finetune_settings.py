"""Fine-tuning settings compared on validation frames, never on the test frames: the held-out
pools of meta_learning.py, k fine-tuning frames from the first (len(pool) − 200) pool frames and
the last 200 pool frames to validate (ethanol B3LYP: the pool has 250 frames, so k ≤ 50).

The methods are meta_learning.py's (its cached pre-trained models: run it first; the replay
methods replay the pre-training tasks); each variant changes their fine-tuning options
(`polyfid.train.finetune`, 1000 steps). Results are kept
per job, so a rerun does only what is missing:

  .venv/bin/python benchmarks/finetune_settings.py --case ethanol_levels --level b3lyp \\
      --methods reptile multi_head reptile_replay --variants base anchor_0.1 --k 50 --seeds 0 1

Writes benchmarks/results/finetune_settings.json:
{"CASE/LEVEL": {"K": {METHOD: {VARIANT: {SEED: {"force_mae_meV_A", "energy_mae_meV", "wall_s", "stages"}}}}}}.
Note that the ethanol xTB pre-training tasks hold the geometries of the B3LYP pool (and so of
these validation frames) at xTB level: the pre-trained methods look better here than on test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import meta_data  # noqa: E402
import meta_learning as ml  # noqa: E402

N_VAL = 200
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "no_early_stopping": {"early_stopping_patience": None},
    "lr_3e-4": {"lr": 3e-4},
    "lr_3e-3": {"lr": 3e-3},
    "steps_3000_no_early_stopping": {"steps": 3000, "early_stopping_patience": None},
    "steps_4000": {"steps": 4000},
    "no_warmup": {"warmup_steps": 0},
    "trainable_last": {"trainable": "last"},
    "anchor_1e-3": {"anchor": 1e-3},
    "anchor_1e-2": {"anchor": 1e-2},
    "anchor_0.1": {"anchor": 0.1},
    "anchor_1": {"anchor": 1.0},
}
STEPS = 1000  # as meta_learning.py


def _args(data_dir: Path) -> argparse.Namespace:
    """The options meta_learning.py's case loading and pre-trained model paths read."""
    return argparse.Namespace(data_dir=data_dir, store=meta_data.DEFAULT_STORE, quick=False,
                              work_dir=common.DEFAULT_WORK / "meta_learning")


def job(case: str, level: str, method: str, variant: str, k: int, seed: int, data_dir: Path,
        work: Path) -> dict[str, Any]:
    from polyfid.analysis.metrics import public
    from polyfid.api import evaluate
    from polyfid.train.finetune import finetune

    common.set_threads(1)
    args = _args(data_dir)
    pool = ml.load_case(case, args).held_out[level].pool
    val = pool[np.arange(len(pool) - N_VAL, len(pool))]
    avail = np.arange(len(pool) - N_VAL)
    if k > len(avail):
        raise SystemExit(f"{case}/{level}: k = {k} but only {len(avail)} pool frames precede the validation frames")
    idx = avail[:k] if seed == 0 else np.random.default_rng(seed).permutation(avail)[:k]
    ft = pool[idx]
    model, opts = ml.starting_point(case, level, method, ft, val.elements, seed, args)
    opts |= {"steps": STEPS} | VARIANTS[variant]
    t0 = time.perf_counter()
    options, replay = ml.finetune_options(opts, level)
    res = finetune(model, ft, work / f"{case}_{level}_{method}_{variant}_{k}_{seed}", options, replay=replay)
    m = public(evaluate(res.model, val))[level]
    return {"force_mae_meV_A": m["force_mae_meV_A"], "energy_mae_meV": m["energy_mae_meV"],
            "wall_s": time.perf_counter() - t0,
            "stages": {s: {"epochs": v.epoch, "stopped": v.stopped} for s, v in res.stages.items()}}


def main(argv: list[str] | None = None) -> int:
    import multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=ml.CASES, default="ethanol_levels")
    p.add_argument("--level", default="b3lyp", help="held-out level of the case (b3lyp, mp2, 3bpa)")
    p.add_argument("--methods", nargs="+", default=["reptile", "multi_head"], choices=ml.ALL_METHODS)
    p.add_argument("--variants", nargs="+", default=["base"], choices=list(VARIANTS))
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--work-dir", type=Path, default=common.DEFAULT_WORK / "finetune_settings")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT / "finetune_settings.json")
    args = p.parse_args(argv)
    key = f"{args.case}/{args.level}"
    done = json.loads(args.out.read_text()) if args.out.exists() else {}
    have = done.get(key, {}).get(str(args.k), {})
    todo = [(m, v, s) for m in args.methods for v in args.variants for s in args.seeds
            if str(s) not in have.get(m, {}).get(v, {})]
    print(f"{len(todo)} jobs to run", flush=True)
    data = ml.load_case(args.case, _args(args.data_dir))  # loaded once; forked workers inherit it
    if args.level not in data.held_out:
        raise SystemExit(f"{args.case} holds out {sorted(data.held_out)}, not {args.level!r}")
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as ex:
        futs = {(m, v, s): ex.submit(job, args.case, args.level, m, v, args.k, s, args.data_dir, args.work_dir)
                for m, v, s in todo}
        for (m, v, s), f in futs.items():
            r = f.result()
            print(f"{key} k={args.k} {m} {v} seed {s}: F {r['force_mae_meV_A']:.1f} meV/Å, "
                  f"E {r['energy_mae_meV']:.1f} meV ({r['wall_s']:.0f} s)", flush=True)
            protocol = {"n_val": N_VAL, "variants": VARIANTS, "finetune": ml.FINETUNE | {"steps": STEPS}}
            done = common.merge_json(args.out, {key: {str(args.k): {m: {v: {str(s): r}}}}, "protocol": protocol},
                                     depth=None)
    rows = [[m, v, s, common.fmt(r["force_mae_meV_A"]), common.fmt(r["energy_mae_meV"])]
            for m, vs in done.get(key, {}).get(str(args.k), {}).items() for v, ss in vs.items() for s, r in ss.items()]
    common.print_table(["method", "variant", "seed", "val F MAE meV/Å", "val E MAE meV"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
