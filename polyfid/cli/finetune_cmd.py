"""polyfid finetune MODEL DATA [--level NAME] [--out DIR] ..."""

from __future__ import annotations

import json
from pathlib import Path

from polyfid.errors import ConfigError, DataError


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a trained (e.g. meta-trained) model to a small data set: a new "
                       "head and reference energies for its level")
    p.add_argument("model", help="model file (model.pt of a run)")
    p.add_argument("data", nargs="+", help="labelled data files at the new level (several are merged: e.g. "
                   "energies in one file, forces of the same geometries in another)")
    p.add_argument("--format", help="reader name (detected if omitted)")
    p.add_argument("--fidelity", help="which label set of the data file to read (multi-level files)")
    p.add_argument("--level", help="name of the data's level, the head trained (default: the label set's name, or "
                   "the file's stem for single-level files)")
    p.add_argument("--val", help="validation data file (default: --val-fraction of DATA)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share held out for validation (default 0.2)")
    p.add_argument("--test", help="test data file, evaluated at the end")
    p.add_argument("--out", default="runs/finetune", help="run folder (default runs/finetune)")
    p.add_argument("--head-init", default="best", help="best, mean, zero or an existing head to start from")
    p.add_argument("--trainable", choices=["all", "last", "head"], default="all", help="parameters fine-tuned")
    p.add_argument("--warmup-steps", type=int, default=200, help="steps with the backbone frozen first (0: none)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (early stopping may end sooner)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (cosine decay)")
    p.add_argument("--max-time-s", type=float, help="wall-clock budget of the main stage")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    p.add_argument("--replay", action="append", default=[], metavar="FILE[=LEVEL]",
                   help="data at a level the model has (e.g. its pre-training data) trained alongside; "
                        "=LEVEL names the head of a single-level file (default: the file's label-set names). "
                        "Repeatable")
    p.add_argument("--replay-share", type=float, default=0.5, help="share of the draws from --replay (default 0.5)")
    p.add_argument("--anchor", type=float, default=0.0,
                   help="weight of the L2 pull of the backbone towards the loaded weights (default 0)")
    p.set_defaults(func=run)


def _read(paths: str | list[str], args, level: str):
    """The files' labels as fidelity `level`, merged across files."""
    from polyfid.data.frame import Dataset
    from polyfid.data.readers import read

    parts = []
    for path in [paths] if isinstance(paths, str) else paths:
        ds = read(path, format=args.format, fidelity=args.fidelity)
        if len(ds.fidelities) != 1:
            raise ConfigError(f"{path}: label sets {ds.fidelities}; choose one with --fidelity")
        parts.append(ds.rename_fidelity(ds.fidelities[0], level))
    return Dataset.merge(parts) if len(parts) > 1 else parts[0]


def _replay(specs: list[str], args):
    """The --replay files: FILE=LEVEL names a single-level file's labels; a file without =LEVEL
    keeps its label-set names, a single "default" set taking the file's stem (as DATA does)."""
    from polyfid.data.readers import read

    parts = []
    for spec in specs:
        path, level = (spec, "") if spec and Path(spec).exists() else spec.rpartition("=")[::2]
        if not path or not Path(path).exists():  # "" would be the current folder
            raise DataError(f"--replay {spec}: no file {path!r}; expected FILE or FILE=LEVEL")
        ds = read(path, format=args.format)
        if len(ds.fidelities) == 1 and (level or ds.fidelities[0] == "default"):
            ds.rename_fidelity(ds.fidelities[0], level or Path(path).stem)
        elif level:
            raise ConfigError(f"--replay {spec}: the file has label sets {ds.fidelities}; =LEVEL names a file "
                           "with one label set")
        parts.append(ds)
    from polyfid.data.frame import Dataset

    return (Dataset.merge(parts) if len(parts) > 1 else parts[0]) if parts else None


def _check_args(args) -> None:
    """The numeric options' ranges, named as typed, before a model is loaded or a file read."""
    from polyfid.train.config import TrainingConfig, check_number, option_range
    from polyfid.train.finetune import check_finetune_options

    check_finetune_options(prefix="--", steps=args.steps, warmup_steps=args.warmup_steps, anchor=args.anchor,
                           replay_share=args.replay_share, val_fraction=args.val_fraction, seed=args.seed)
    check_number(args.lr, "--lr", option_range(TrainingConfig, "lr"))
    check_number(args.max_time_s, "--max-time-s", option_range(TrainingConfig, "max_time_s"), nullable=True)
    check_number(args.threads, "--threads", option_range(TrainingConfig, "num_threads"), integer=True,
                 nullable=True)


def run(args) -> int:
    from polyfid.analysis.metrics import public
    from polyfid.api import evaluate
    from polyfid.data.readers import read
    from polyfid.numerics import set_threads
    from polyfid.train.finetune import finetune, finetune_summary

    _check_args(args)
    set_threads(args.threads)
    first = read(args.data[0], format=args.format, fidelity=args.fidelity)
    name = first.fidelities[0] if len(first.fidelities) == 1 else None
    level = args.level or (Path(args.data[0]).stem if name in (None, "default") else name)
    train = _read(args.data, args, level)
    val = _read(args.val, args, level) if args.val else None
    training = {"lr": args.lr} | ({"max_time_s": args.max_time_s} if args.max_time_s is not None else {})
    res = finetune(args.model, train, args.out, val_ds=val, fidelity=level, head_init=args.head_init,
                   trainable=args.trainable, warmup_steps=args.warmup_steps, steps=args.steps,
                   val_fraction=args.val_fraction, seed=args.seed, resume=args.resume,
                   replay=_replay(args.replay, args), replay_share=args.replay_share, anchor=args.anchor, **training)
    summary = finetune_summary(res)
    if args.test:
        summary["test"] = public(evaluate(res.model, _read(args.test, args, level)))
    (Path(args.out) / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"level {level!r}: head started from {res.source_head!r}; {res.train_s:.0f} s of training")
    print(f"model: {res.path}")
    if "test" in summary:
        print(json.dumps(summary["test"], indent=1))
    return 0
