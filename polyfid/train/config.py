"""Training configuration: typed, documented, validated with clear messages.

Every option is a dataclass field with a ``doc``; `polyfid config` prints them all as a
commented YAML file of defaults. YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from polyfid.errors import ConfigError  # noqa: F401  (re-exported)


def opt(default: Any, doc: str, **kw: Any) -> Any:
    """A documented field; a class as default means a fresh instance of it."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={"doc": doc}, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class DatasetSpec:
    """One data file at one level of theory."""

    path: str = opt("", "file or folder to read (any ASE format, .db, .npz, .h5, PYSEQM folder, QM-22 xyz)")
    format: str | None = opt(None, "reader name (ase, extxyz, ase-db, npz, hdf5, pyseqm, qm22); detected if null")
    fidelity: str | None = opt(
        None, "level-of-theory name for this file's labels (single-level files); null keeps the reader's default"
    )
    options: dict = opt({}, "reader options, e.g. energy_key, forces_key, energy_unit, force_unit, levels")
    use: list = opt(["energy", "forces", "stress"], "which labels to use; e.g. [energy] drops forces that exist")
    select: str | None = opt(None, "frames to take, as a Python slice 'start:stop:step' (null: all)")


@dataclass
class DataConfig:
    train: list[DatasetSpec] = opt([], "training data sets (a list; each a DatasetSpec)")
    validation: list[DatasetSpec] = opt([], "validation data sets; if empty, split off the training data")
    test: list[DatasetSpec] = opt([], "test data sets evaluated after training (optional)")
    val_fraction: float = opt(0.05, "fraction of training frames held out for validation when none is given")
    val_size: int | None = opt(None, "number of validation frames to hold out (overrides val_fraction)")
    train_size: int | None = opt(None, "use only this many training frames (after the validation split)")
    seed: int = opt(0, "seed of the train/validation split")
    merge_tolerance: float | None = opt(
        1e-6, "Å; when a list holds two or more data sets, frames of the same geometry (same atoms in the same "
        "order, same cell, pbc, charge and multiplicity, every position within this) are merged into one frame "
        "carrying every file's label sets, within train, validation and test each, before the validation split; "
        "null: no merging"
    )
    min_distance: float = opt(
        0.1, "Å; frames with two atoms closer than this are refused (a DataError naming the file, frame and atoms): "
        "coincident atoms turn every weight of a network into NaN"
    )
    max_extent: float = opt(
        1000.0, "Å; non-periodic frames whose atoms span more than this along x, y or z are refused (a fragment "
        "flown off in MD); neighbour lists over such a box fail"
    )


@dataclass
class ModelConfig:
    architecture: Literal["hipnn", "hipnn_ts", "hiphop"] = opt(
        "hipnn", "network: hipnn, hipnn_ts (tensor sensitivities), hiphop (HIP-HOP-NN, Cartesian tensor invariants)"
    )
    n_features: int = opt(128, "features per atom in each interaction block")
    n_sensitivities: int = opt(20, "number of distance sensitivity functions")
    soft_min: float = opt(0.85, "Å; centre of the innermost sensitivity")
    soft_max: float = opt(4.5, "Å; centre of the outermost sensitivity")
    cutoff: float = opt(5.0, "Å; interaction cutoff (cos² switching to zero)")
    n_interactions: int = opt(2, "interaction blocks")
    n_atom_layers: int = opt(3, "on-site layers after each interaction layer")
    resnet: bool = opt(True, "residual blocks, as in hippynn")
    activation: Literal["softplus", "silu", "tanh", "gelu"] = opt("softplus", "activation function")
    l_max: int | None = opt(None, "hipnn_ts, hiphop: highest tensor order (hipnn_ts 1-2, default 2; hiphop 1-3, "
                            "default 3)")
    max_tensors: int | None = opt(None, "hiphop: most tensors multiplied in one invariant (1-4, default 4)")
    tensor_features: int | None = opt(None, "hiphop: channels that carry tensors of order >= 1 (default 32, at "
                                      "most n_features); their cost dominates the network's")


@dataclass
class TrainingConfig:
    epochs: int = opt(1000, "maximum number of epochs (not applied when max_steps is set)")
    max_steps: int | None = opt(
        None, "optimiser-step budget (null: none): training stops after this many steps, mid-epoch if need be, "
        "whatever epochs says, and the cosine schedule and final_fraction count steps; a budget that reproduces "
        "on any machine"
    )
    max_time_s: float | None = opt(None, "wall-clock training budget in seconds (null: none)")
    batch_size: int = opt(32, "frames per batch")
    lr: float = opt(1e-3, "initial learning rate (Adam)")
    weight_decay: float = opt(0.0, "Adam weight decay")
    scheduler: Literal["plateau", "cosine", "none"] = opt(
        "plateau", "plateau: reduce on validation plateau; cosine: decay over max_steps if set, else over max_time_s "
        "if set, else over epochs"
    )
    plateau_patience: int = opt(10, "evaluations without improvement before the learning rate is reduced")
    plateau_factor: float = opt(0.5, "factor applied to the learning rate on a plateau")
    min_lr: float = opt(1e-6, "learning rate floor (plateau) or end value (cosine)")
    early_stopping_patience: int | None = opt(50, "evaluations without improvement before stopping (null: never)")
    energy_weight: float = opt(1.0, "weight of MSE(energy per atom), eV²")
    force_weight: float = opt(100.0, "weight of MSE(force components), (eV/Å)²")
    stress_weight: float = opt(0.0, "weight of MSE(stress components), (eV/Å³)²")
    loss: Literal["mse", "huber"] = opt(
        "mse", "per-entry loss: mse, or huber (squared below huber_delta, linear beyond: large errors, "
        "e.g. of rare high-energy frames, pull less and the fit targets the MAE more)"
    )
    huber_delta: float = opt(
        0.01, "huber: where the loss turns linear, in eV/atom (energy), eV/Å (forces), eV/Å³ (stress)"
    )
    loss_balance: Literal["none", "rms"] = opt(
        "none", "how the weighted terms (each kind of label at each fidelity) add up. none: weighted mean squares; "
        "rms: the square root of each weighted term (weighted RMS errors, as in hippynn's multi-fidelity examples), "
        "so that every term pulls in proportion to its relative error and a level with few energies is not "
        "drowned by another level's forces"
    )
    final_energy_weight: float | None = opt(
        None, "energy weight for the last part of training (e.g. 1000), null: unchanged; over the first 10 "
        "steps at that weight Adam's second moments are floored by the squared gradients (no burst of large steps)"
    )
    final_fraction: float = opt(0.25, "fraction of the budget (steps, time or epochs) that uses final_energy_weight")
    fidelity_weights: dict = opt(
        {}, "per-fidelity multipliers of the loss weights, e.g. {mp2: {energy: 10.0, forces: 1.0}}"
    )
    sampling: dict = opt(
        {}, "share of training draws per fidelity, e.g. {mp2: 0.5}: half of each epoch's frames are drawn "
        "(with replacement) from frames labelled at mp2; unnamed fidelities share the rest by frame count"
    )
    epoch_frames: int | None = opt(
        None, "frames drawn per epoch when sampling is set (null: the number of training frames); sets how "
        "often validation runs when a small named set is mixed with a large one"
    )
    grad_clip: float | None = opt(100.0, "clip the gradient norm to this value (null: no clipping)")
    ema_decay: float | None = opt(0.99, "exponential moving average of weights used for evaluation (null: off)")
    dtype: Literal["float32", "float64"] = opt("float32", "floating point precision")
    seed: int = opt(0, "seed of weight initialisation and batch order")
    num_threads: int | None = opt(None, "torch CPU threads (null: torch's default)")
    flush_denormal: bool = opt(
        True, "flush subnormal floats (below 1.2e-38 in float32) to zero while training: on x86 CPUs they take a "
        "slow path that made training steps of a trained rMD17 aspirin HIP-HOP-NN 1.3-1.5x slower on an Intel Xeon "
        "(no difference on an AMD EPYC)"
    )
    eval_every: int = opt(1, "validate every this many epochs")
    checkpoint_interval_s: float = opt(
        30.0, "seconds between checkpoints (0: every epoch); the last epoch is always written. Resuming "
        "continues from the last checkpoint, so this bounds the work a kill can cost; writing one every "
        "epoch of a small data set costs more than the training"
    )
    device: str = opt("cpu", "torch device, e.g. cpu or cuda")


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
        "(0: independent heads)"
    )
    fidelity_blocks: int | None = opt(
        None, "multi-head: how many of the network's last interaction blocks each fidelity owns (the first ones and "
        "the atom embedding stay shared); null: 1 when the network has two or more interaction blocks, else 0; "
        "0: every block shared, one linear head per fidelity (with warm_start: false and target_share: null, the "
        "earlier multi-head)"
    )
    embedding_dim: int = opt(8, "embedding: size of the learned fidelity embedding")
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
        "training.sampling is empty (at least their share of the frames; null: in proportion to the frames)"
    )
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

    outer_steps: int = opt(2000, "outer (meta) steps; training.max_time_s stops earlier if set")
    inner_steps: int = opt(8, "optimiser steps on one task per outer step")
    inner_lr: float = opt(1e-3, "learning rate of the inner optimiser")
    inner_optimizer: Literal["adam", "sgd"] = opt("adam", "inner optimiser")
    inner_betas: list = opt([0.0, 0.999], "Adam betas of the inner optimiser (β1 = 0 as in the Reptile paper)")
    inner_state: Literal["keep", "reset"] = opt(
        "keep", "keep: the inner Adam's moment estimates carry over from one outer step to the next (as in the "
        "Reptile paper's code); reset: a fresh optimiser every outer step, whose first steps move every weight "
        "by about the learning rate whatever its gradient")
    inner_lr_final: float | None = opt(
        None, "inner learning rate at the end, cosine from inner_lr over the budget (None: constant inner_lr)")
    outer_lr: float = opt(1.0, "outer step size ε at the start")
    outer_lr_final: float = opt(0.1, "ε at the end; linear in between (over outer_steps, or the time budget)")
    tasks_per_step: int = opt(1, "tasks adapted from the same θ per outer step; their φ − θ are averaged")
    task_weights: dict = opt({}, "task sampling weights by fidelity name (missing names: 1; default uniform)")
    eval_every: int = opt(50, "outer steps between validations (best model, early stopping)")


@dataclass
class OutputConfig:
    dir: str = opt("runs/polyfid", "run folder: checkpoint, model file, logs, plots")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    plots: bool = opt(True, "save loss curves and parity plots as PNG")
    progress: bool = opt(True, "show a progress bar")


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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, d: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if isinstance(d, str) and cls is DatasetSpec:
        d = {"path": d}
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(names)}")
        kwargs[key] = _check(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    _validate(obj, where)
    return obj


def _validate(obj: Any, where: str) -> None:
    if isinstance(obj, DatasetSpec) and not obj.path:
        raise ConfigError(f"{where}: 'path' is required")
    if isinstance(obj, TrainingConfig):
        for key in ("epochs", "batch_size", "eval_every"):
            if getattr(obj, key) < 1:
                raise ConfigError(f"{where}.{key}: must be at least 1, got {getattr(obj, key)}")
        if obj.max_steps is not None and obj.max_steps < 1:
            raise ConfigError(f"{where}.max_steps: must be at least 1 or null, got {obj.max_steps}")
        if obj.lr <= 0:
            raise ConfigError(f"{where}.lr: must be positive, got {obj.lr}")
        if obj.huber_delta <= 0:
            raise ConfigError(f"{where}.huber_delta: must be positive, got {obj.huber_delta}")
        if not 0 <= obj.final_fraction <= 1:
            raise ConfigError(f"{where}.final_fraction: must lie in [0, 1], got {obj.final_fraction}")
        if obj.ema_decay is not None and not 0 < obj.ema_decay < 1:
            raise ConfigError(f"{where}.ema_decay: must lie in (0, 1), got {obj.ema_decay}")
        for fid, w in obj.fidelity_weights.items():
            if not isinstance(w, dict) or set(w) - {"energy", "forces", "stress"}:
                raise ConfigError(f"{where}.fidelity_weights.{fid}: expected a mapping with keys among energy, "
                                  f"forces, stress, got {w!r}")
            for k, v in w.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(f"{where}.fidelity_weights.{fid}.{k}: expected a number >= 0, got {v!r}")
        for fid, v in obj.sampling.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ConfigError(f"{where}.sampling.{fid}: expected a share in (0, 1], got {v!r}")
        if obj.epoch_frames is not None and (isinstance(obj.epoch_frames, bool)
                                             or not isinstance(obj.epoch_frames, int) or obj.epoch_frames < 1):
            raise ConfigError(f"{where}.epoch_frames: expected a whole number >= 1 or null, got {obj.epoch_frames!r}")
        if sum(obj.sampling.values()) > 1 + 1e-9:
            raise ConfigError(f"{where}.sampling: the shares add up to {sum(obj.sampling.values())}, more than 1")
    if isinstance(obj, StrategyConfig):
        if obj.head_tie < 0:
            raise ConfigError(f"{where}.head_tie: must be >= 0, got {obj.head_tie}")
        if obj.embedding_dim < 1:
            raise ConfigError(f"{where}.embedding_dim: must be at least 1, got {obj.embedding_dim}")
        if obj.target_share is not None and not 0 < obj.target_share < 1:
            raise ConfigError(f"{where}.target_share: must lie in (0, 1) or be null, got {obj.target_share}")
        if obj.fidelity_blocks is not None and obj.fidelity_blocks < 0:
            raise ConfigError(f"{where}.fidelity_blocks: must be >= 0 or null, got {obj.fidelity_blocks}")
    if isinstance(obj, MetaConfig):
        for key in ("outer_steps", "inner_steps", "tasks_per_step", "eval_every"):
            if getattr(obj, key) < 1:
                raise ConfigError(f"{where}.{key}: must be at least 1, got {getattr(obj, key)}")
        for key in ("inner_lr", "inner_lr_final"):  # types: checked by from_dict
            if getattr(obj, key) is not None and getattr(obj, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be positive, got {getattr(obj, key)}")
        if not (0 < obj.outer_lr <= 1 and 0 <= obj.outer_lr_final <= 1):
            raise ConfigError(f"{where}: outer_lr must lie in (0, 1] and outer_lr_final in [0, 1], got "
                              f"{obj.outer_lr} and {obj.outer_lr_final}")
        if len(obj.inner_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in obj.inner_betas):
            raise ConfigError(f"{where}.inner_betas: expected two numbers in [0, 1), got {obj.inner_betas!r}")
        for name, w in obj.task_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"{where}.task_weights.{name}: expected a number >= 0, got {w!r}")
    if isinstance(obj, DataConfig):
        if not 0 <= obj.val_fraction < 1:
            raise ConfigError(f"{where}.val_fraction: must lie in [0, 1), got {obj.val_fraction}")
        if obj.merge_tolerance is not None and not 0 <= obj.merge_tolerance < float("inf"):
            raise ConfigError(f"{where}.merge_tolerance: must be a number >= 0 (Å) or null, got {obj.merge_tolerance}")


def load_config(source: str | Path | dict) -> Config:
    """Read and validate a configuration from a YAML file or a dict."""
    if isinstance(source, dict):
        return from_dict(Config, source)
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        cfg = from_dict(Config, d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = path.parent
    for spec in cfg.data.train + cfg.data.validation + cfg.data.test:
        if not Path(spec.path).is_absolute() and not Path(spec.path).exists() and (base / spec.path).exists():
            spec.path = str(base / spec.path)  # paths relative to the config file
    return cfg


def documented_defaults() -> str:
    """All options with their defaults and documentation, as commented YAML."""
    lines: list[str] = ["# polyfid training configuration: every option, its default and meaning"]

    def emit(cls: type, indent: int) -> None:
        pad = "  " * indent
        inst = cls()
        for f in fields(cls):
            doc = f.metadata.get("doc", "")
            value = getattr(inst, f.name)
            if is_dataclass(value):
                lines.append(f"{pad}{f.name}:  # {doc}")
                emit(type(value), indent + 1)
            elif f.name in ("train", "validation", "test"):
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

    emit(Config, 0)
    return "\n".join(lines) + "\n"
