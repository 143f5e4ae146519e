"""polyfid finetune CONFIG.yaml [--resume] [--output-dir DIR] [flags that override the file]

The deprecated form `polyfid finetune MODEL DATA... [flags]` builds the same configuration from
the command line; `--level` (now `--fidelity`) and `--out` (now `--output-dir`) still work too.
Each use of an old spelling prints one warning."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from polyfid.cli.args import int_at_least, int_in, number_at_least, number_in, positive_number
from polyfid.errors import ConfigError, DataError

#: flags that set the key of the same name in the configuration's finetune section
FINETUNE_FLAGS = ("fidelity", "head_init", "trainable", "warmup_steps", "steps", "anchor", "replay_share",
                  "val_fraction", "seed")
#: flags that set one key of finetune.training: flag dest -> key
TRAINING_FLAGS = {"lr": "lr", "max_time_s": "max_time_s", "threads": "num_threads"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a trained (e.g. meta-trained) model to a small data set from a YAML "
        "configuration (see `polyfid config --finetune`): a new head and reference energies for its level",
        description="Fine-tune a model as CONFIG.yaml says (`polyfid config --finetune` prints every option); "
        "each flag below overrides one key of the file. The form MODEL DATA... [flags], without a file, is "
        "deprecated but still works.",
        usage="polyfid finetune CONFIG.yaml [--resume] [--output-dir DIR] [flags]\n"
              "       polyfid finetune MODEL DATA... [flags]   (deprecated)")
    p.add_argument("inputs", nargs="+", metavar="CONFIG.yaml",
                   help="fine-tuning configuration (deprecated form: MODEL DATA..., a model file and data files)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    p.add_argument("--output-dir", help="run folder (output.dir)")
    p.add_argument("--model", help="model file to fine-tune (model)")
    p.add_argument("--fidelity", help="the level fine-tuned to, the head trained (finetune.fidelity)")
    p.add_argument("--val", help="validation data file (data.validation; default: --val-fraction of the data)")
    p.add_argument("--test", help="test data file, evaluated at the end (data.test)")
    p.add_argument("--format", help="reader of the data files named on the command line (detected if omitted)")
    p.add_argument("--head-init", help="best, mean, zero or an existing head to start from (finetune.head_init)")
    p.add_argument("--trainable", choices=["all", "last", "head"], help="parameters fine-tuned (finetune.trainable)")
    p.add_argument("--warmup-steps", type=int_at_least(0),
                   help="steps with the backbone frozen first, 0: none (finetune.warmup_steps)")
    p.add_argument("--steps", type=int_at_least(1),
                   help="optimiser steps; early stopping may end sooner (finetune.steps)")
    p.add_argument("--lr", type=positive_number(), help="learning rate, cosine decay (finetune.training.lr)")
    p.add_argument("--max-time-s", type=positive_number(),
                   help="wall-clock budget of each stage (finetune.training.max_time_s)")
    p.add_argument("--threads", type=int_in(1), help="torch CPU threads (finetune.training.num_threads)")
    p.add_argument("--seed", type=int_in(0, 2**64 - 1), help="seed (finetune.seed)")
    p.add_argument("--replay", action="append", metavar="FILE[=LEVEL]",
                   help="data at a level the model has (e.g. its pre-training data) trained alongside; =LEVEL "
                        "names the head of a single-level file (default: the file's label-set names, an unnamed "
                        "one the file's stem). Repeatable (data.replay)")
    p.add_argument("--replay-share", type=number_in(0, 1, open_low=True, open_high=True),
                   help="share of the draws from --replay (finetune.replay_share)")
    p.add_argument("--anchor", type=number_at_least(0),
                   help="weight of the L2 pull of the backbone towards the loaded weights (finetune.anchor)")
    p.add_argument("--val-fraction", type=number_in(0, 1, open_high=True),
                   help="share held out for validation without --val (finetune.val_fraction)")
    p.add_argument("--level", help="deprecated: use --fidelity")
    p.add_argument("--out", help="deprecated: use --output-dir")
    p.set_defaults(func=run)


def _warn(text: str) -> None:
    print(f"polyfid finetune: warning: {text}", file=sys.stderr)


def is_old_form(inputs: list[str]) -> bool:
    """MODEL DATA... rather than CONFIG.yaml: more than one positional, or one not a YAML file."""
    return len(inputs) > 1 or not inputs[0].lower().endswith((".yaml", ".yml"))


def config_from_args(args):
    """The FinetuneConfig of the command line: the file's (or, in the old form, the positional
    arguments'), each flag given replacing its key."""
    from polyfid.train.config import load_finetune_config

    old = is_old_form(args.inputs)
    if old:
        _warn("`polyfid finetune MODEL DATA...` is deprecated; use `polyfid finetune CONFIG.yaml` "
              "(`polyfid config --finetune` prints its options; the flags override it)")
    if args.out is not None:
        _warn("--out is deprecated; use --output-dir")
        if args.output_dir is not None:
            raise ConfigError("--out is the old name of --output-dir; give --output-dir only")
    level, label_set = _fidelity_flags(args, old)
    overrides = overrides_from_args(args, level, label_set)
    if not old:
        return load_finetune_config(args.inputs[0], overrides)
    if len(args.inputs) < 2:
        raise ConfigError(f"expected CONFIG.yaml (a .yaml or .yml file), or the deprecated MODEL DATA...; "
                          f"got only {args.inputs[0]!r}")
    if args.model:
        raise ConfigError("the model is named twice: by --model and by the first argument (MODEL DATA...)")
    train = [_spec(path, args.format, label_set) for path in args.inputs[1:]]
    return load_finetune_config({"model": args.inputs[0], "data": {"train": train}}, overrides)


def _fidelity_flags(args, old: bool) -> tuple[str | None, str | None]:
    """(finetune.fidelity, the label set read from the data files named on the command line).
    --fidelity is the level; --level, its old name, warns. In the old form --fidelity named the
    label set to read, whose name is the level, and with --level the label set named --level."""
    if args.level is None:
        return (None, args.fidelity) if old else (args.fidelity, None)
    _warn("--level is deprecated; use --fidelity")
    if args.fidelity is not None and not old:
        raise ConfigError("--level is the old name of --fidelity; give --fidelity only")
    if args.fidelity is not None:
        _warn("--fidelity F --level L (read label set F as level L) is deprecated; use a configuration file: "
              "the data sets' fidelity F and finetune.fidelity L")
    return args.level, args.fidelity


def overrides_from_args(args, level: str | None, label_set: str | None) -> dict[str, Any]:
    """The keys the flags set, nested as in the configuration file."""
    flags = vars(args) | {"fidelity": level}
    finetune = {key: flags[key] for key in FINETUNE_FLAGS if flags[key] is not None}
    training = {key: flags[dest] for dest, key in TRAINING_FLAGS.items() if flags[dest] is not None}
    if training:
        finetune["training"] = training
    data: dict[str, Any] = {}
    if args.val:
        data["validation"] = [_spec(args.val, args.format, label_set)]
    if args.test:
        data["test"] = [_spec(args.test, args.format, label_set)]
    if args.replay:
        data["replay"] = [_replay_spec(text, args.format) for text in args.replay]
    out: dict[str, Any] = {"finetune": finetune, "data": data}
    if args.model:
        out["model"] = args.model
    if args.output_dir or args.out:
        out["output"] = {"dir": args.output_dir or args.out}
    return out


def _spec(path: str, fmt: str | None, fidelity: str | None = None) -> dict[str, Any]:
    return {"path": path} | ({"format": fmt} if fmt else {}) | ({"fidelity": fidelity} if fidelity else {})


def _replay_spec(text: str, fmt: str | None) -> dict[str, Any]:
    """--replay FILE or FILE=LEVEL as a data set (LEVEL: its fidelity)."""
    path, level = (text, "") if text and Path(text).exists() else text.rpartition("=")[::2]
    if not path or not Path(path).exists():  # "" would be the current folder
        raise DataError(f"--replay {text}: no file {path!r}; expected FILE or FILE=LEVEL")
    return _spec(path, fmt, level or None)


def run(args) -> int:
    import json

    from polyfid.train.finetune import run_finetune

    res = run_finetune(config_from_args(args), resume=args.resume)
    print(f"level {res.fidelity!r}: head started from {res.source_head!r}; {res.train_s:.0f} s of training")
    print(f"model: {res.path}")
    if res.test_metrics is not None:
        print(json.dumps(res.test_metrics, indent=1))
    return 0
