"""Training configuration: typed, documented, validated with clear messages.

Every option is a dataclass field with a ``doc``; `polyfid config` prints them all as a
commented YAML file of defaults. YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from polyfid.data.merge import MERGE_TOLERANCE
from polyfid.errors import ConfigError, DataError
from polyfid.neighbors.checks import MAX_EXTENT, MIN_DISTANCE, SAFE_EXTENT
from polyfid.numerics import MAX_THREADS

#: torch and numpy take seeds in [0, 2^64)
SEED_END = 2**64
#: the device strings a configuration may name; whether the machine has one is checked where
#: the device is used (polyfid.numerics.resolve_device), so a file can be written elsewhere
DEVICE_FORM = re.compile(r"cpu|cuda(:\d+)?|mps")


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option, declared beside it with `opt(..., gt=0)`; `from_dict`
    enforces them (and finiteness) for every option, so a new option only states its bounds."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    unit: str = ""

    def describe(self, nullable: bool = False, unit: bool = True) -> str:
        lo = f"({_fmt(self.gt)}" if self.gt is not None else f"[{_fmt(self.ge)}" if self.ge is not None else None
        hi = f"{_fmt(self.lt)})" if self.lt is not None else f"{_fmt(self.le)}]" if self.le is not None else None
        if lo and hi:
            text = f"in {lo}, {hi}"
        elif lo:
            text = f"{'>' if self.gt is not None else '>='} {lo[1:]}"
        elif hi:
            text = f"{'<' if self.lt is not None else '<='} {hi[:-1]}"
        else:
            text = "a finite number"
        return text + (f" ({self.unit})" if self.unit and unit else "") + (" or null" if nullable else "")

    def contains(self, v: float) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))


def _fmt(x: float) -> str:
    return "2^64" if x == 2**64 else f"{x:g}"


def opt(default: Any, doc: str, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
        le: float | None = None, unit: str = "") -> Any:
    """A documented field; a class as default means a fresh instance of it. gt/ge/lt/le bound a
    number (null, where the type allows it, stays allowed); unit names it in messages."""
    meta: dict[str, Any] = {"doc": doc}
    if any(b is not None for b in (gt, ge, lt, le)):
        meta["range"] = Range(gt, ge, lt, le, unit)
    if isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def option_range(cls: type, name: str) -> Range:
    """The declared range of option `name` of dataclass `cls` (for arguments that set it)."""
    return next(f for f in fields(cls) if f.name == name).metadata.get("range", Range())


def check_number(value: Any, where: str, rng: Range | None = None, integer: bool = False,
                 nullable: bool = False, what: str = "") -> Any:
    """`value` if it is a finite number (a whole one if `integer`) within `rng`, else a
    ConfigError naming `where`, `what` it is and the range; also used for options outside the
    dataclasses (mapping values, fine-tuning arguments)."""
    rng = rng or Range()
    what = f"{what} " if what else ""
    if value is None and nullable:
        return None
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ConfigError(f"{where}: expected {kind} {rng.describe(nullable)}, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ConfigError(f"{where}: expected a finite number {rng.describe(nullable)}, got {_short(value)}")
    if not rng.contains(value):
        raise ConfigError(f"{where}: must be {what}{rng.describe(nullable)}, got {value:g}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


@dataclass
class DatasetSpec:
    """One data file at one level of theory."""

    path: str = opt("", "file or folder to read (any ASE format, .db, .npz, .h5, PYSEQM folder, QM-22 xyz)")
    format: str | None = opt(None, "reader name (ase, extxyz, ase-db, npz, hdf5, pyseqm, qm22); detected if null")
    fidelity: str | None = opt(
        None, "level-of-theory name for this file's labels (single-level files); null keeps the reader's default"
    )
    options: dict = opt({}, "reader options, e.g. energy_key, forces_key, energy_unit, force_unit, levels")
    use: list[Literal["energy", "forces", "stress"]] = opt(
        ["energy", "forces", "stress"], "which labels to use; e.g. [energy] drops forces that exist")
    select: str | None = opt(None, "frames to take, as a Python slice 'start:stop:step' (null: all)")


@dataclass
class DataConfig:
    train: list[DatasetSpec] = opt([], "training data sets (a list; each a DatasetSpec)")
    validation: list[DatasetSpec] = opt([], "validation data sets; if empty, split off the training data")
    test: list[DatasetSpec] = opt([], "test data sets evaluated after training (optional)")
    val_fraction: float = opt(
        0.05, "fraction of training frames held out for validation when none is given", ge=0, lt=1)
    val_size: int | None = opt(None, "number of validation frames to hold out (overrides val_fraction)", ge=1)
    train_size: int | None = opt(None, "use only this many training frames (after the validation split)", ge=1)
    seed: int = opt(0, "seed of the train/validation split", ge=0, lt=SEED_END)
    merge_tolerance: float | None = opt(
        MERGE_TOLERANCE, "Å; when a list holds two or more data sets, frames of the same geometry (same atoms in "
        "the same order, same cell, pbc, charge and multiplicity, every position within this) are merged into one "
        "frame carrying every file's label sets, within train, validation and test each, before the validation split; "
        "null: no merging", ge=0, unit="Å")
    min_distance: float = opt(
        MIN_DISTANCE, "Å; frames with two atoms closer than this are refused (a DataError naming the file, frame "
        "and atoms): coincident atoms turn every weight of a network into NaN", gt=0, unit="Å")
    max_extent: float = opt(
        MAX_EXTENT, "Å; frames whose atoms span more than this along x, y or z (periodic directions wrapped into the "
        "cell first) are refused (a fragment flown off in MD); neighbour lists over such a box fail, and above "
        f"{SAFE_EXTENT:g} Å crash", gt=0, le=SAFE_EXTENT, unit="Å")


@dataclass
class ModelConfig:
    architecture: Literal["hipnn", "hipnn_ts", "hiphop"] = opt(
        "hipnn", "network: hipnn, hipnn_ts (tensor sensitivities), hiphop (HIP-HOP-NN, Cartesian tensor invariants)"
    )
    n_features: int = opt(128, "features per atom in each interaction block", ge=1)
    n_sensitivities: int = opt(20, "number of distance sensitivity functions", ge=1)
    soft_min: float = opt(0.85, "Å; centre of the innermost sensitivity", gt=0, unit="Å")
    soft_max: float = opt(4.5, "Å; centre of the outermost sensitivity", gt=0, unit="Å")
    cutoff: float = opt(5.0, "Å; interaction cutoff (cos² switching to zero)", gt=0, unit="Å")
    n_interactions: int = opt(2, "interaction blocks", ge=1)
    n_atom_layers: int = opt(3, "on-site layers after each interaction layer", ge=0)
    resnet: bool = opt(True, "residual blocks, as in hippynn")
    activation: Literal["softplus", "silu", "tanh", "gelu"] = opt("softplus", "activation function")
    l_max: int | None = opt(None, "hipnn_ts, hiphop: highest tensor order (hipnn_ts 1-2, default 2; hiphop 1-3, "
                            "default 3)", ge=1, le=3)
    max_tensors: int | None = opt(None, "hiphop: most tensors multiplied in one invariant (1-4, default 4)", ge=1, le=4)
    tensor_features: int | None = opt(None, "hiphop: channels that carry tensors of order >= 1 (default 32, at "
                                      "most n_features); their cost dominates the network's", ge=1)


@dataclass
class TrainingConfig:
    epochs: int = opt(1000, "maximum number of epochs (not applied when max_steps is set)", ge=1)
    max_steps: int | None = opt(
        None, "optimiser-step budget (null: none): training stops after this many steps, mid-epoch if need be, "
        "whatever epochs says, and the cosine schedule and final_fraction count steps; a budget that reproduces "
        "on any machine", ge=1)
    max_time_s: float | None = opt(None, "wall-clock training budget in seconds (null: none)", gt=0, unit="s")
    batch_size: int = opt(32, "frames per batch", ge=1)
    lr: float = opt(1e-3, "initial learning rate (Adam)", gt=0)
    weight_decay: float = opt(0.0, "Adam weight decay", ge=0)
    scheduler: Literal["plateau", "cosine", "none"] = opt(
        "plateau", "plateau: reduce on validation plateau; cosine: decay over max_steps if set, else over max_time_s "
        "if set, else over epochs"
    )
    plateau_patience: int = opt(10, "evaluations without improvement before the learning rate is reduced", ge=1)
    plateau_factor: float = opt(0.5, "factor applied to the learning rate on a plateau", gt=0, lt=1)
    min_lr: float = opt(1e-6, "learning rate floor (plateau) or end value (cosine)", ge=0)
    early_stopping_patience: int | None = opt(50, "evaluations without improvement before stopping (null: never)", ge=1)
    energy_weight: float = opt(1.0, "weight of MSE(energy per atom), eV²", ge=0)
    force_weight: float = opt(100.0, "weight of MSE(force components), (eV/Å)²", ge=0)
    stress_weight: float = opt(0.0, "weight of MSE(stress components), (eV/Å³)²", ge=0)
    loss: Literal["mse", "huber"] = opt(
        "mse", "per-entry loss: mse, or huber (squared below huber_delta, linear beyond: large errors, "
        "e.g. of rare high-energy frames, pull less and the fit targets the MAE more)"
    )
    huber_delta: float = opt(
        0.01, "huber: where the loss turns linear, in eV/atom (energy), eV/Å (forces), eV/Å³ (stress)", gt=0)
    loss_balance: Literal["none", "rms"] = opt(
        "none", "how the weighted terms (each kind of label at each fidelity) add up. none: weighted mean squares; "
        "rms: the square root of each weighted term (weighted RMS errors, as in hippynn's multi-fidelity examples), "
        "so that every term pulls in proportion to its relative error and a level with few energies is not "
        "drowned by another level's forces"
    )
    final_energy_weight: float | None = opt(
        None, "energy weight for the last part of training (e.g. 1000), null: unchanged; over the first 10 "
        "steps at that weight Adam's second moments are floored by the squared gradients (no burst of large steps)",
        ge=0)
    final_fraction: float = opt(
        0.25, "fraction of the budget (steps, time or epochs) that uses final_energy_weight", ge=0, le=1)
    fidelity_weights: dict = opt(
        {}, "per-fidelity multipliers of the loss weights, e.g. {mp2: {energy: 10.0, forces: 1.0}}"
    )
    sampling: dict = opt(
        {}, "share of training draws per fidelity, e.g. {mp2: 0.5}: half of each epoch's frames are drawn "
        "(with replacement) from frames labelled at mp2; unnamed fidelities share the rest by frame count"
    )
    epoch_frames: int | None = opt(
        None, "frames drawn per epoch when sampling is set (null: the number of training frames); sets how "
        "often validation runs when a small named set is mixed with a large one", ge=1)
    grad_clip: float | None = opt(100.0, "clip the gradient norm to this value (null: no clipping)", gt=0)
    ema_decay: float | None = opt(
        0.99, "exponential moving average of weights used for evaluation (null: off)", gt=0, lt=1)
    dtype: Literal["float32", "float64"] = opt("float32", "floating point precision")
    seed: int = opt(0, "seed of weight initialisation and batch order", ge=0, lt=SEED_END)
    num_threads: int | None = opt(None, "torch CPU threads (null: torch's default)", ge=1, le=MAX_THREADS)
    flush_denormal: bool = opt(
        True, "flush subnormal floats (below 1.2e-38 in float32) to zero while training: on x86 CPUs they take a "
        "slow path that made training steps of a trained rMD17 aspirin HIP-HOP-NN 1.3-1.5x slower on an Intel Xeon "
        "(no difference on an AMD EPYC)"
    )
    eval_every: int = opt(1, "validate every this many epochs", ge=1)
    checkpoint_interval_s: float = opt(
        30.0, "seconds between checkpoints (0: every epoch); the last epoch is always written. Resuming "
        "continues from the last checkpoint, so this bounds the work a kill can cost; writing one every "
        "epoch of a small data set costs more than the training", ge=0, unit="s")
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:N or mps")


@dataclass
class StrategyConfig:
    name: Literal["auto", "single", "multi-head", "embedding", "delta", "transfer"] = opt(
        "auto",
        "how several levels of theory are combined. single: one fidelity (target); multi-head: one network, trained "
        "on every level at once, each level with its own energy head, reference energies and last interaction "
        "block (fidelity_blocks), by default started from a model of the base level (warm_start); embedding: the "
        "fidelity enters as a learned embedding, one head; delta: a base model on `base`, then a second model on "
        "target − base where frames have both; transfer: pre-train on `base`, fine-tune on `target`. auto: single for "
        "one fidelity, else multi-head",
    )
    target: str | None = opt(None, "the fidelity predicted by default (the high level); null: the one with fewest "
                             "labels (energies and forces counted)")
    base: str | None = opt(None, "the low level for delta and transfer; null: the fidelity with most force labels")
    head_tie: float = opt(
        0.0, "multi-head: weight of a ridge penalty on the difference between each head and the base head "
        "(0: independent heads)", ge=0)
    fidelity_blocks: int | None = opt(
        None, "multi-head: how many of the network's last interaction blocks each fidelity owns (the first ones and "
        "the atom embedding stay shared); null: 1 when the network has two or more interaction blocks, else 0; "
        "0: every block shared, one linear head per fidelity (with warm_start: false and target_share: null, the "
        "earlier multi-head)", ge=0)
    embedding_dim: int = opt(8, "embedding: size of the learned fidelity embedding", ge=1)
    warm_start: bool | None = opt(
        None, "multi-head and embedding: first train the base level alone, then start every level from it (each "
        "stage gets training's budget unless second_stage sets its own); null: on for multi-head, off for embedding"
    )
    second_stage: dict = opt(
        {}, "two-stage strategies (delta, transfer, warm-started multi-head/embedding): training options that "
        "differ after the base stage (e.g. {lr: 3e-4, max_steps: 1000}); transfer and multi-head, whose second "
        "stage starts from the base model's weights, use training.lr / 10 unless it names lr"
    )
    target_share: float | None = opt(
        0.25, "multi-head: the share of the joint stage's draws from frames labelled at the target level when "
        "training.sampling is empty (at least their share of the frames; null: in proportion to the frames)",
        gt=0, lt=1)
    delta_model: dict = opt({}, "delta: model options that differ for the Δ model (e.g. {n_features: 32})")
    trainable: Literal["all", "head", "last"] = opt(
        "all", "transfer: parameters fine-tuned (head: the energy head only; last: the last interaction "
        "block and the head)"
    )


@dataclass
class MetaConfig:
    """Reptile over tasks (`polyfid meta-train`); a task is one fidelity of the training data.

    Each outer step copies the weights θ, takes `inner_steps` optimiser steps on batches of
    one task to reach φ, then moves the shared weights θ ← θ + ε(φ − θ); the task's own
    head takes φ whole (heads and reference energies stay task-specific). Batch size, loss
    weights, threads, dtype, checkpoints and the time budget come from `training`."""

    outer_steps: int = opt(2000, "outer (meta) steps; training.max_time_s stops earlier if set", ge=1)
    inner_steps: int = opt(8, "optimiser steps on one task per outer step", ge=1)
    inner_lr: float = opt(1e-3, "learning rate of the inner optimiser", gt=0)
    inner_optimizer: Literal["adam", "sgd"] = opt("adam", "inner optimiser")
    inner_betas: list = opt([0.0, 0.999], "Adam betas of the inner optimiser (β1 = 0 as in the Reptile paper)")
    inner_state: Literal["keep", "reset"] = opt(
        "keep", "keep: the inner Adam's moment estimates carry over from one outer step to the next (as in the "
        "Reptile paper's code); reset: a fresh optimiser every outer step, whose first steps move every weight "
        "by about the learning rate whatever its gradient")
    inner_lr_final: float | None = opt(
        None, "inner learning rate at the end, cosine from inner_lr over the budget (None: constant inner_lr)", gt=0)
    outer_lr: float = opt(1.0, "outer step size ε at the start", gt=0, le=1)
    outer_lr_final: float = opt(
        0.1, "ε at the end; linear in between (over outer_steps, or the time budget)", ge=0, le=1)
    tasks_per_step: int = opt(1, "tasks adapted from the same θ per outer step; their φ − θ are averaged", ge=1)
    task_weights: dict = opt({}, "task sampling weights by fidelity name (missing names: 1; default uniform)")
    eval_every: int = opt(50, "outer steps between validations (best model, early stopping)", ge=1)


@dataclass
class OutputConfig:
    dir: str = opt("runs/polyfid", "run folder: checkpoint, model file, logs, plots")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    plots: bool = opt(True, "save loss curves and parity plots as PNG")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class FinetuneOptions:
    """Fine-tuning a trained model to a new, small data set (`polyfid finetune`,
    `polyfid.train.finetune.finetune`): the level fine-tuned to, how its head starts, what
    trains and for how long. Defaults are a step budget, not an epoch count, so that 10 and
    1000 frames both get enough updates."""

    fidelity: str | None = opt(
        None, "the level fine-tuned to: the head trained (a new one if the model lacks it) and the model's default "
        "afterwards; null: the training data's only level (an unnamed single-level file's labels take the first "
        "file's stem). Picks the label set of a multi-level data file")
    head_init: str = opt(
        "best", "how a new head starts: best (a copy of the head whose forces match the data best, per-element "
        "reference energies fitted on top), mean (the heads' mean), zero, or the name of a head of the model")
    trainable: Literal["all", "last", "head"] = opt(
        "all", "parameters fine-tuned: all, last (the last interaction block and the heads) or head (the heads "
        "only: the other levels' predictions stay exactly as they were)")
    warmup_steps: int = opt(200, "optimiser steps with the backbone frozen before it trains too (0: none)", ge=0)
    steps: int = opt(1500, "optimiser steps of the main stage (cosine decay; early stopping may end it sooner)",
                     ge=1)
    anchor: float = opt(
        0.0, "weight λ of λ·Σ(θ − θ₀)² over the backbone's parameters θ (θ₀: as loaded), in units of the loss "
        "(L2-SP): pulls a few-frame fine-tune towards the pre-trained network (0: off)", ge=0)
    replay_share: float = opt(
        0.5, "share of the training draws from data.replay (when it names data sets); an epoch draws k / (1 − "
        "share) frames, so steps, warm-up and validation keep their pace", gt=0, lt=1)
    val_fraction: float = opt(
        0.2, "share of the training frames held out for validation and early stopping when data.validation is "
        "empty (at least one frame; 0: none)", ge=0, lt=1)
    seed: int = opt(0, "seed of the validation split, the new head and the batch order", ge=0, lt=SEED_END)
    training: dict = opt(
        {}, "training options (see `polyfid config`, section training) over the fine-tuning defaults: batch_size "
        "32 or all frames, lr 1e-3, cosine decay to min_lr 1e-5, ema_decay 0.99, epochs from steps, early stopping "
        "after about a fifth of the steps without improvement; e.g. {lr: 3.0e-4, max_time_s: 600, num_threads: 1, "
        "dtype: float64, device: cuda}")


@dataclass
class FinetuneData:
    train: list[DatasetSpec] = opt(
        [], "fine-tuning data sets, labelled at the level fine-tuned to; several are merged (the same geometry in "
        "two files is one frame); a single-level file's labels are renamed to the level")
    validation: list[DatasetSpec] = opt([], "validation data sets; if empty, finetune.val_fraction of train is "
                                        "held out")
    test: list[DatasetSpec] = opt([], "test data sets, evaluated at the end (results.json); optional")
    replay: list[DatasetSpec] = opt(
        [], "frames at levels the model already has (e.g. its pre-training data), trained alongside on their own "
        "heads; a single-level file's fidelity names the head, an unnamed one takes the file's stem")
    merge_tolerance: float | None = opt(
        MERGE_TOLERANCE, "Å; frames of the same geometry in two data sets of one list are merged into one frame "
        "(see `polyfid config`, data.merge_tolerance); null: no merging", ge=0, unit="Å")


@dataclass
class FinetuneOutput:
    dir: str = opt("runs/finetune", "run folder: model.pt, results.json, config.json and each stage's "
                   "checkpoints and logs (warmup/, finetune/)")
    plots: bool = opt(False, "save the fine-tuning stage's loss curves and the test parity plot as PNG")
    progress: bool = opt(False, "show a progress bar")


@dataclass
class FinetuneConfig:
    """`polyfid finetune CONFIG.yaml`: a model file, data and fine-tuning options."""

    model: str = opt("", "the model file to fine-tune (model.pt of a run); required")
    data: FinetuneData = opt(FinetuneData, "data sets")
    finetune: FinetuneOptions = opt(FinetuneOptions, "fine-tuning options")
    output: FinetuneOutput = opt(FinetuneOutput, "where results go")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Config:
    data: DataConfig = opt(DataConfig, "data sets and splits")
    model: ModelConfig = opt(ModelConfig, "network")
    training: TrainingConfig = opt(TrainingConfig, "optimisation")
    strategy: StrategyConfig = opt(StrategyConfig, "multi-fidelity strategy")
    meta: MetaConfig = opt(MetaConfig, "meta-learning (polyfid meta-train): Reptile over tasks")
    output: OutputConfig = opt(OutputConfig, "where results go")

    def to_dict(self) -> dict:
        return asdict(self)


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list or tp is list:
        if isinstance(value, (str, dict)) and origin is list and is_dataclass(typing.get_args(tp)[0]):
            value = [value]  # one data set may be given without a list
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(v, item, f"{where}[{k}]") for k, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 2e-3, without a dot, as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            raise ConfigError(f"{where}: expected a finite number, got {_short(value)}") from None
        if not math.isfinite(value):  # YAML .nan / .inf: no option means anything by them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _nullable(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_dict(cls: type, d: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if isinstance(d, str) and cls is DatasetSpec:
        d = {"path": d}
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in fields(cls)}
    names = list(declared)
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(names)}")
        kwargs[key] = _check(value, hints[key], f"{where}.{key}")
        rng = declared[key].metadata.get("range")
        if rng is not None:  # the option's declared range; null stays allowed where the type has it
            check_number(kwargs[key], f"{where}.{key}", rng, nullable=_nullable(hints[key]))
    obj = cls(**kwargs)
    _validate(obj, where)
    return obj


def _validate(obj: Any, where: str) -> None:
    """Rules a single option's range cannot say: between options, and the values of mappings."""
    if isinstance(obj, DatasetSpec):
        if not obj.path:
            raise ConfigError(f"{where}: 'path' is required")
        if not obj.use:
            raise ConfigError(f"{where}.use: names no label kind; expected some of energy, forces, stress")
        if obj.select is not None:
            from polyfid.data.splits import parse_slice  # here: `polyfid config` need not import the readers

            try:
                parse_slice(obj.select)
            except DataError:
                raise ConfigError(f"{where}.select: {obj.select!r} is not a slice 'start:stop:step' such as "
                                  "'0:100' or '::10' (step not 0)") from None
    if isinstance(obj, ModelConfig):
        _validate_model(obj, where)
    if isinstance(obj, TrainingConfig):
        if not DEVICE_FORM.fullmatch(obj.device):
            raise ConfigError(f"{where}.device: expected cpu, cuda, cuda:N or mps, got {obj.device!r}")
        if obj.energy_weight == obj.force_weight == obj.stress_weight == 0:
            raise ConfigError(f"{where}: energy_weight, force_weight and stress_weight are all 0: nothing to fit")
        for fid, w in obj.fidelity_weights.items():
            if not isinstance(w, dict) or set(w) - {"energy", "forces", "stress"}:
                raise ConfigError(f"{where}.fidelity_weights.{fid}: expected a mapping with keys among energy, "
                                  f"forces, stress, got {w!r}")
            for k, v in w.items():
                check_number(v, f"{where}.fidelity_weights.{fid}.{k}", Range(ge=0))
        for fid, v in obj.sampling.items():
            check_number(v, f"{where}.sampling.{fid}", Range(gt=0, le=1), what="a share")
        if sum(obj.sampling.values()) > 1 + 1e-9:
            raise ConfigError(f"{where}.sampling: the shares add up to {sum(obj.sampling.values())}, more than 1")
    if isinstance(obj, MetaConfig):
        if not isinstance(obj.inner_betas, list) or len(obj.inner_betas) != 2:
            raise ConfigError(f"{where}.inner_betas: expected two numbers in [0, 1), got {obj.inner_betas!r}")
        for k, b in enumerate(obj.inner_betas):
            check_number(b, f"{where}.inner_betas[{k}]", Range(ge=0, lt=1))
        for name, w in obj.task_weights.items():
            check_number(w, f"{where}.task_weights.{name}", Range(ge=0))
    if isinstance(obj, FinetuneOptions):
        if "seed" in obj.training:
            raise ConfigError(f"{where}.training.seed: set {where}.seed, the one seed of a fine-tune (split, new "
                              "head, batch order)")
        from_dict(TrainingConfig, obj.training, f"{where}.training")  # now, not after the data are read
    if isinstance(obj, FinetuneConfig) and not obj.model:
        raise ConfigError(f"{where}.model: required: the model file to fine-tune")
    if isinstance(obj, DataConfig) and obj.min_distance >= obj.max_extent:
        raise ConfigError(f"{where}: min_distance ({obj.min_distance:g} Å) must be below max_extent "
                          f"({obj.max_extent:g} Å)")
    if isinstance(obj, Config):
        # the second stage's options and the Δ model's are checked now, not hours later when
        # the stage starts; with the same rules, named as strategy.second_stage.KEY
        s = obj.strategy
        if not isinstance(s.second_stage, dict) or not isinstance(s.delta_model, dict):
            return
        from_dict(TrainingConfig, asdict(obj.training) | s.second_stage, f"{where}.strategy.second_stage")
        from_dict(ModelConfig, asdict(obj.model) | s.delta_model, f"{where}.strategy.delta_model")


#: the options each architecture takes beyond HIP-NN's, and the l_max it supports
ARCHITECTURE_OPTIONS = {"hipnn": {}, "hipnn_ts": {"l_max": 2}, "hiphop": {"l_max": 3, "max_tensors": 4,
                                                                         "tensor_features": None}}


def _validate_model(m: ModelConfig, where: str) -> None:
    own = ARCHITECTURE_OPTIONS[m.architecture]
    for key in ("l_max", "max_tensors", "tensor_features"):
        value = getattr(m, key)
        if value is None:
            continue
        if key not in own:
            users = [a for a, o in ARCHITECTURE_OPTIONS.items() if key in o]
            raise ConfigError(f"{where}.{key}: architecture {m.architecture!r} has no {key} (only "
                              f"{' and '.join(users)}); remove it or set it to null")
        if own[key] is not None and value > own[key]:
            raise ConfigError(f"{where}.{key}: architecture {m.architecture!r} takes 1 to {own[key]}, got {value}")
    if m.tensor_features is not None and m.tensor_features > m.n_features:
        raise ConfigError(f"{where}.tensor_features: must be at most n_features ({m.n_features}), "
                          f"got {m.tensor_features}")
    if m.soft_min >= m.soft_max:  # the sensitivities' centres are spread from soft_min to soft_max
        raise ConfigError(f"{where}.soft_min: must be below soft_max ({m.soft_max:g} Å), got {m.soft_min:g}")


def load_config(source: str | Path | dict) -> Config:
    """Read and validate a configuration from a YAML file or a dict."""
    return _load(source, Config)


def load_finetune_config(source: str | Path | dict, overrides: dict | None = None) -> FinetuneConfig:
    """Read and validate a fine-tuning configuration (`polyfid finetune CONFIG.yaml`) from a
    YAML file or a dict; `overrides` (nested like the file: {"finetune": {"steps": 500}}) replace
    its values before it is checked, mappings merged key by key, lists replaced."""
    return _load(source, FinetuneConfig, overrides)


def _load(source: str | Path | dict, cls: type, overrides: dict | None = None) -> Any:
    """A `cls` configuration from a YAML file or a dict, with `overrides` merged in; the data
    paths (and a fine-tune's model path) relative to a file are found beside it."""
    path = None if isinstance(source, dict) else Path(source)
    d = source if path is None else _read_yaml(path)
    if overrides:
        d = _merged({} if d is None else d, overrides)
    try:
        cfg = from_dict(cls, d)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from None
    if path is not None:
        base = path.parent
        for name in ("train", "validation", "test", "replay"):
            for spec in getattr(cfg.data, name, []):
                spec.path = _beside(base, spec.path)
        if isinstance(cfg, FinetuneConfig):
            cfg.model = _beside(base, cfg.model)
    return cfg


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"configuration file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"configuration file {path} is not a file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected a YAML configuration") \
            from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def _merged(d: Any, overrides: dict) -> Any:
    """`d` with `overrides` in place of its values, mappings merged key by key (a `d` that is
    not a mapping is left for from_dict to refuse)."""
    if not isinstance(d, dict):
        return d
    out = dict(d)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _beside(base: Path, path: str) -> str:
    """`path` as given if it exists or is absolute, else beside the configuration file if there."""
    if not Path(path).is_absolute() and not Path(path).exists() and (base / path).exists():
        return str(base / path)
    return path


def documented_defaults(cls: type = Config) -> str:
    """All options of `cls` (Config: `polyfid train`; FinetuneConfig: `polyfid finetune`) with
    their defaults and documentation, as commented YAML."""
    what = "fine-tuning configuration (polyfid finetune)" if cls is FinetuneConfig else "training configuration"
    lines: list[str] = [f"# polyfid {what}: every option, its default and meaning"]

    def emit(section: type, indent: int) -> None:
        pad = "  " * indent
        inst = section()
        hints = typing.get_type_hints(section)
        for f in fields(section):
            doc = f.metadata.get("doc", "")
            if "range" in f.metadata:  # the unit is in the doc already
                doc += f"; range {f.metadata['range'].describe(_nullable(hints[f.name]), unit=False)}"
            value = getattr(inst, f.name)
            if is_dataclass(value):
                lines.append(f"{pad}{f.name}:  # {doc}")
                emit(type(value), indent + 1)
            elif f.name in ("train", "validation", "test", "replay"):
                lines.append(f"{pad}{f.name}: []  # {doc}")
                if f.name == "train":
                    lines.append(f"{pad}  # - {{each item:}}")
                    for g in fields(DatasetSpec):
                        default = yaml.safe_dump(getattr(DatasetSpec(), g.name), default_flow_style=True).strip()
                        default = default.removesuffix("\n...").removesuffix("...").strip()
                        lines.append(f"{pad}  #   {g.name}: {default}  # {g.metadata['doc']}")
            else:
                dumped = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
                lines.append(f"{pad}{f.name}: {dumped}  # {doc}")

    emit(cls, 0)
    return "\n".join(lines) + "\n"
