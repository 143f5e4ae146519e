"""polyfid meta-train CONFIG.yaml [--resume]"""

from __future__ import annotations

import json

from polyfid.cli.train_cmd import add_config_arguments, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("meta-train", help="Reptile pre-training over tasks (each fidelity of the training data is "
                       "a task); options in the configuration's `meta` section (see `polyfid config`)")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from polyfid.train.meta import run_meta_training

    res = run_meta_training(config_from_args(args), resume=args.resume)
    s = res.state
    print(f"stopped after {s.step} outer steps ({s.stopped}), {s.elapsed_s:.0f} s; best at step {s.best_step}")
    print(f"tasks (frames): {json.dumps(res.tasks)}")
    print(f"model: {res.path}")
    return 0
