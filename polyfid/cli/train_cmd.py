"""polyfid train CONFIG.yaml [--resume]"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a potential from a YAML configuration (see `polyfid config`)")
    add_config_arguments(p)
    p.set_defaults(func=run)


def add_config_arguments(p) -> None:
    """CONFIG, --resume and --output-dir: shared by the commands that run a configuration."""
    p.add_argument("config", help="YAML configuration file")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--output-dir", help="run folder (overrides output.dir)")


def config_from_args(args):
    from polyfid.train.config import load_config

    cfg = load_config(args.config)
    if args.output_dir:
        cfg.output.dir = args.output_dir
    return cfg


def run(args) -> int:
    from polyfid.train.run import run_training

    result = run_training(config_from_args(args), resume=args.resume)
    print(f"stopped after {result.epochs} epochs ({result.stopped}), {result.train_s:.0f} s of training")
    print(f"model: {result.out / 'model.pt'}")
    for name, metrics in (("validation", result.val_metrics), ("test", result.test_metrics)):
        if metrics:
            print(f"{name}: {json.dumps(metrics, indent=1)}")
    return 0
