"""polyfid meta-train CONFIG.yaml [--resume]"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("meta-train", help="Reptile pre-training over tasks (each fidelity of the training data is "
                       "a task); options in the configuration's `meta` section (see `polyfid config`)")
    p.add_argument("config", help="YAML configuration file")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--output-dir", help="run folder (overrides output.dir)")
    p.set_defaults(func=run)


def run(args) -> int:
    from polyfid.train.config import load_config
    from polyfid.train.meta import run_meta_training

    cfg = load_config(args.config)
    if args.output_dir:
        cfg.output.dir = args.output_dir
    res = run_meta_training(cfg, resume=args.resume)
    s = res.state
    print(f"stopped after {s.step} outer steps ({s.stopped}), {s.elapsed_s:.0f} s; best at step {s.best_step}")
    print(f"tasks (frames): {json.dumps(res.tasks)}")
    print(f"model: {res.path}")
    return 0
