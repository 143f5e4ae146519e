"""Fine-tuning a trained (e.g. meta-trained) model to a new, small data set.

A new level gets a new head and reference energies; the model's other heads, their
reference energies and scales are kept as they were (with a fine-tuned backbone their
predictions move with it; `trainable="head"` keeps them exact). The new head starts as a
copy of the existing head that best matches the new data (per-element energy offsets
fitted on top), so fine-tuning begins from the closest known level. Optionally the backbone
is frozen for a warm-up. Defaults are a step budget, not an epoch count, so that 10 and
1000 frames both get enough updates.

`finetune` works on data sets in memory with `FinetuneOptions`; `run_finetune` runs a whole
fine-tuning configuration (`polyfid finetune CONFIG.yaml`): model file, data files, options,
run folder with config.json and results.json.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import public
from polyfid.analysis.plots import plot_loss_curves, plot_parity
from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset
from polyfid.data.splits import split_indices
from polyfid.errors import DataError
from polyfid.models import BranchedPotential, atomic_write, build_potential, load_model, model_dict
from polyfid.models.potential import Potential
from polyfid.neighbors.checks import check_frames, model_geometry
from polyfid.numerics import resolve_device, set_threads
from polyfid.train.config import (
    ConfigError,
    DatasetSpec,
    FinetuneConfig,
    FinetuneOptions,
    OutputConfig,
    TrainingConfig,
    from_dict,
    load_finetune_config,
)
from polyfid.train.loop import BEST_MODEL, TrainState
from polyfid.train.run import load_spec, metrics_of
from polyfid.train.stage import DTYPES, Stage, freeze, train_stage

HEAD_INITS = ("best", "mean", "zero")


def finetune_training(n_train: int, steps: int, overrides: dict[str, Any]) -> TrainingConfig:
    """Training options for fine-tuning on `n_train` frames: about `steps` optimiser steps
    (batch 32 or all frames), cosine decay, validation every epoch, early stopping after
    about a fifth of the steps without improvement. `overrides`: TrainingConfig keys over these
    (finetune.training and the seed)."""
    bs = int(overrides.get("batch_size", min(32, max(n_train, 1))))
    per_epoch = max(math.ceil(n_train / bs), 1)
    d = {"batch_size": bs, "lr": 1e-3, "scheduler": "cosine", "min_lr": 1e-5,
         "epochs": max(math.ceil(steps / per_epoch), 1),
         "early_stopping_patience": max(math.ceil(steps / 5 / per_epoch), 5),
         "ema_decay": 0.99, "checkpoint_interval_s": 30.0}
    return from_dict(TrainingConfig, d | overrides, "finetune.training")


def _head_predictions(model: Potential, data: PackedData, fidelity: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Energies (B, H) eV of every head and, where the data have forces at `fidelity`, the
    force RMSE of every head (H,) eV/Å, on the new data."""
    col = data.fidelities.index(fidelity)
    has_f = bool(data.forces_mask[:, col].any())
    energies, sq, n = [], np.zeros(len(model.fidelities)), 0
    model.eval()
    for start in range(0, data.n_frames, 64):
        idx = np.arange(start, min(start + 64, data.n_frames))
        b = data.batch(idx).to(next(model.parameters()).device)
        with torch.enable_grad() if has_f else torch.no_grad():
            pred = model(b, forces=has_f)
        energies.append(pred["energy"].detach().cpu().numpy())
        if has_f:
            fmask = b.forces_mask[:, col].index_select(0, b.frame).cpu().numpy()
            ref = b.forces[:, col].cpu().numpy()[fmask]
            err = pred["forces"].detach().cpu().numpy()[fmask] - ref[:, None, :]
            sq += (err**2).sum(axis=(0, 2))
            n += err.shape[0] * 3
    return np.concatenate(energies), (np.sqrt(sq / n) if has_f else None)


def add_head(model: Potential, data: Dataset, fidelity: str, init: str = "best") -> tuple[Potential, str | None]:
    """A copy of `model` with one more head, `fidelity`, set up from `data` (frames labelled
    at `fidelity`). init: "best" (copy the head with the lowest force RMSE on the data, or
    energy RMSE after per-element offsets without forces, and fit per-element offsets on top
    of it), "mean" (mean of the heads), "zero" (a zero head: reference energies only) or the
    name of an existing head to copy. Returns (new model, the head copied or None)."""
    if fidelity in model.fidelities:
        raise ConfigError(f"the model already has a head {fidelity!r}")
    new = build_potential(model.model_config, model.species, [*model.fidelities, fidelity])
    new = new.to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    h_old = len(model.fidelities)
    with torch.no_grad():
        new.representation.load_state_dict(model.representation.state_dict())
        new.readout.weight[:h_old] = model.readout.weight
        new.readout.bias[:h_old] = model.readout.bias
        new.atom_ref[:, :h_old] = model.atom_ref
        new.energy_scale[:h_old] = model.energy_scale
    new.geometry_limits = model_geometry(model)
    packed = PackedData(data, model.cutoff, [fidelity], dtype=next(model.parameters()).dtype,
                        **model_geometry(model))
    col_mask = packed.energy_mask[:, 0].numpy()
    counts = _composition(model, packed)
    source: str | None = None
    if init in HEAD_INITS[:1] or init in model.fidelities:
        energies, f_rmse = _head_predictions(model, packed, fidelity)
        e = packed.energy[:, 0].numpy()
        if init in model.fidelities:
            h = model.fidelities.index(init)
        elif f_rmse is not None:
            h = int(np.argmin(f_rmse))
        else:
            if not col_mask.any():
                raise DataError(f"the fine-tuning data have neither energies nor forces at {fidelity!r}")
            h = int(np.argmin([_offset_rmse(counts[col_mask], e[col_mask] - energies[col_mask, k])
                               for k in range(h_old)]))
        source = model.fidelities[h]
        offsets = np.zeros(len(model.species))
        if col_mask.any():
            offsets, *_ = np.linalg.lstsq(counts[col_mask], e[col_mask] - energies[col_mask, h], rcond=None)
        with torch.no_grad():
            new.readout.weight[h_old] = model.readout.weight[h]
            new.readout.bias[h_old] = model.readout.bias[h]
            new.energy_scale[h_old] = model.energy_scale[h]
            new.atom_ref[:, h_old] = model.atom_ref[:, h] + torch.as_tensor(offsets, dtype=new.atom_ref.dtype)
    elif init in ("mean", "zero"):
        new.fit_reference_energies(packed)
        if init == "mean":
            with torch.no_grad():
                new.readout.weight[h_old] = model.readout.weight.mean(0)
                new.readout.bias[h_old] = model.readout.bias.mean()
                new.energy_scale[h_old] = model.energy_scale.mean()
    else:
        raise ConfigError(f"head init {init!r}: expected one of {HEAD_INITS} or a head of the model {model.fidelities}")
    if isinstance(new, BranchedPotential):  # each head's own blocks; the new one's from the head it copies
        with torch.no_grad():
            for h in range(h_old):
                new.own(h).load_state_dict(model.own(h).state_dict())
            start = model.fidelities.index(source) if source is not None else 0
            new.own(h_old).load_state_dict(model.own(start).state_dict())
    return new, source


def _composition(model: Potential, data: PackedData) -> np.ndarray:
    """Element counts (B, S) of the frames."""
    idx = model._species(data.numbers).numpy()
    counts = np.zeros((data.n_frames, len(model.species)))
    np.add.at(counts, (np.repeat(np.arange(data.n_frames), data.n_atoms), idx), 1.0)
    return counts


def _offset_rmse(counts: np.ndarray, resid: np.ndarray) -> float:
    coef, *_ = np.linalg.lstsq(counts, resid, rcond=None)
    return float(np.sqrt(np.mean((resid - counts @ coef) ** 2)))


@dataclass
class FinetuneResult:
    """The fine-tuned model (best validation), its file, the level fine-tuned to, the head it
    started from, the state of each stage (warmup, finetune) and, from `run_finetune` with test
    data, the test errors (`public` metrics per fidelity)."""

    model: Potential
    path: Path
    fidelity: str
    source_head: str | None
    stages: dict[str, TrainState]
    test_metrics: dict[str, Any] | None = None

    @property
    def train_s(self) -> float:
        return sum(s.elapsed_s for s in self.stages.values())


def finetune(
    model: Potential | str | Path,
    train_ds: Dataset,
    out: str | Path,
    options: FinetuneOptions | None = None,
    val_ds: Dataset | None = None,
    replay: Dataset | None = None,
    resume: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune `model` to `train_ds`, whose frames carry labels at one level,
    `options.fidelity` (default: the data's only level); writes out/model.pt, whose default
    head is that level. `model`: a saved model's path, or a `Potential`, which is copied and
    left unchanged. `options`: FinetuneOptions (see `polyfid config --finetune`; checked here,
    before the model is loaded).

    A level the model lacks gets a new head (`add_head`, `head_init`); a level it has goes on
    training its head. trainable: all, last (last interaction block and the heads) or head.
    warmup_steps: steps with the backbone frozen before it is trained too (0: none).
    anchor: weight λ of λ·Σ(θ − θ₀)² over the backbone's parameters θ (θ₀: as loaded), in
    units of the loss; pulls a few-frame fine-tune towards the pre-trained network (L2-SP).
    replay: frames labelled at levels the model already has (e.g. its pre-training data). They
    go on training their own heads alongside the new one, so the backbone keeps serving them
    rather than fitting a few frames alone; `replay_share` is their share of the draws. With
    replay the heads of the replay levels are trained, not kept as they were; the replay
    frames' levels must all be heads of the model.
    Without `val_ds`, a `val_fraction` of the frames (at least one) is held out for
    validation and early stopping. `options.training`: TrainingConfig keys over the fine-tuning
    defaults (`finetune_training`: lr, max_time_s, batch_size, dtype, device, ...)."""
    o = from_dict(FinetuneOptions, asdict(options or FinetuneOptions()), "finetune")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    training = dict(o.training)
    dtype = DTYPES[str(training.get("dtype", "float32"))]
    device = resolve_device(training.get("device"), "finetune.training.device")
    if isinstance(model, (str, Path)):
        source = load_model(model, dtype=dtype, device=device)
    else:  # a copy, where training will run: the caller's model stays as it was
        source = copy.deepcopy(model).to(dtype=dtype, device=device)
    fidelity = o.fidelity or _only_fidelity(train_ds)
    train_ds, val_ds = _split(source, train_ds, val_ds, fidelity, o)
    head: str | None = fidelity
    if fidelity in source.fidelities:
        net = source
    else:
        torch.manual_seed(o.seed)
        net, head = add_head(source, train_ds, fidelity, o.head_init)
    trained = [fidelity]
    if replay is not None:
        train_ds, training = _with_replay(net, train_ds, replay, fidelity, o.replay_share, training)
        trained += list(replay.fidelities)
    keep = _frozen_heads(net, trained)
    model_cfg = dict(net.model_config)
    meta = {"strategy": "finetune", "target": fidelity, "source_head": head, "trainable": o.trainable}
    meta |= model_geometry(source)  # the checks the source model was trained with go on applying
    output = OutputConfig(progress=progress, tensorboard=False, plots=False)
    stages: dict[str, TrainState] = {}
    n_epoch = training["epoch_frames"] if replay is not None else len(train_ds)
    tc = finetune_training(n_epoch, o.steps, training | {"seed": o.seed})
    if o.warmup_steps > 0 and o.trainable != "head":
        tw = finetune_training(n_epoch, o.warmup_steps, training | {"seed": o.seed, "early_stopping_patience": None})
        freeze(net, "head")
        warm = Stage(out / "warmup", tw, model_cfg, meta, fit_references=False)
        net, stages["warmup"] = train_stage(net, train_ds, val_ds, warm, output, resume)
        net.model_config = model_cfg
    for p in net.parameters():
        p.requires_grad_(True)
    freeze(net, o.trainable)
    main = Stage(out / "finetune", tc, model_cfg, meta, fit_references=False,
                 regularizer=anchor_penalty(net, o.anchor))
    net, stages["finetune"] = train_stage(net, train_ds, val_ds, main, output, resume)
    _restore_heads(net, keep)
    net.model_config = model_cfg
    atomic_write(model_dict(net, model_cfg, meta), out / BEST_MODEL)
    best = load_model(out / BEST_MODEL, dtype=dtype, device=device)
    return FinetuneResult(best, out / BEST_MODEL, fidelity, head, stages)


def _split(model: Potential, train_ds: Dataset, val_ds: Dataset | None, fidelity: str,
           o: FinetuneOptions) -> tuple[Dataset, Dataset | None]:
    """The training frames at `fidelity` (elements checked against the model's) and the
    validation frames: `val_ds` at `fidelity`, or a `val_fraction` of them held out."""
    train_ds = train_ds.restrict([fidelity])
    if not len(train_ds):
        raise DataError(f"the fine-tuning data have no labels at {fidelity!r}")
    missing = set(train_ds.elements) - set(model.species)
    if missing:
        raise DataError(f"the fine-tuning data contain elements {sorted(missing)} the model does not know "
                        f"(its species: {model.species})")
    if val_ds is None and len(train_ds) > 1 and o.val_fraction > 0:
        n_val = max(1, int(round(o.val_fraction * len(train_ds))))
        tr, va = split_indices(len(train_ds), [len(train_ds) - n_val, n_val], seed=o.seed)
        return train_ds[tr], train_ds[va]
    return train_ds, (val_ds.restrict([fidelity]) if val_ds is not None else None)


def _with_replay(model: Potential, train_ds: Dataset, replay: Dataset, fidelity: str, share: float,
                 training: dict[str, Any]) -> tuple[Dataset, dict[str, Any]]:
    """The fine-tuning frames plus the replay frames, and training options whose sampling gives
    the replay frames `share` of the draws. An epoch draws about len(train_ds) / (1 − share)
    frames, so that steps, warm-up and validation keep the pace they have without replay."""
    if not 0 < share < 1:
        raise ConfigError(f"replay_share: expected a share in (0, 1), got {share!r}")
    if training.get("sampling"):
        raise ConfigError("replay sets the sampling shares itself: give replay_share, not training sampling")
    old = [f for f in model.fidelities if f != fidelity]
    unknown = [f for f in replay.fidelities if f not in old]
    if unknown:
        raise DataError(f"the replay frames have levels {unknown} that are not heads of the model "
                        f"(replay trains existing heads: {old})")
    missing = set(replay.elements) - set(model.species)
    if missing:
        raise DataError(f"the replay frames contain elements {sorted(missing)} the model does not know")
    epoch = max(math.ceil(round(len(train_ds) / (1.0 - share), 6)), len(train_ds) + 1)
    return train_ds + replay, training | {"sampling": {fidelity: 1.0 - share}, "epoch_frames": epoch}


def anchor_penalty(model: Potential, weight: float) -> Callable[[], torch.Tensor] | None:
    """λ·Σ(θ − θ₀)² over the trainable backbone parameters (every one but the heads' readout, a
    branched model's own blocks of each level included), θ₀ their values now (None if λ = 0)."""
    if weight <= 0:
        return None
    pairs = [(p, p.detach().clone()) for name, p in model.named_parameters()
             if p.requires_grad and not name.startswith("readout.")]

    def penalty() -> torch.Tensor:
        return weight * sum(((p - p0) ** 2).sum() for p, p0 in pairs)

    return penalty


def _only_fidelity(ds: Dataset) -> str:
    if len(ds.fidelities) != 1:
        raise DataError(f"the fine-tuning data have levels {ds.fidelities}: name the one to fine-tune to")
    return ds.fidelities[0]


def _frozen_heads(model: Potential, trained: list[str]) -> dict[str, Any]:
    """The parameters and buffers of the heads not `trained`, to put back after training
    (weight decay or EMA arithmetic must not move them by rounding)."""
    rows = [h for h, f in enumerate(model.fidelities) if f not in trained]
    return {"rows": rows, "weight": model.readout.weight[rows].detach().clone(),
            "bias": model.readout.bias[rows].detach().clone(),
            "atom_ref": model.atom_ref[:, rows].clone(), "scale": model.energy_scale[rows].clone()}


@torch.no_grad()
def _restore_heads(model: Potential, keep: dict[str, Any]) -> None:
    rows = keep["rows"]
    model.readout.weight[rows] = keep["weight"].to(model.readout.weight)
    model.readout.bias[rows] = keep["bias"].to(model.readout.bias)
    model.atom_ref[:, rows] = keep["atom_ref"].to(model.atom_ref)
    model.energy_scale[rows] = keep["scale"].to(model.energy_scale)


def finetune_summary(res: FinetuneResult) -> dict[str, Any]:
    """results.json of a fine-tune: the level, the head it started from, the training time, each
    stage's epochs, time and stop reason, and the test errors where test data were given."""
    summary = {"fidelity": res.fidelity, "source_head": res.source_head, "train_s": res.train_s,
               "stages": {k: {"epochs": s.epoch, "train_s": s.elapsed_s, "stopped": s.stopped}
                          for k, s in res.stages.items()}}
    return summary | ({"test": res.test_metrics} if res.test_metrics is not None else {})


def run_finetune(config: FinetuneConfig | dict | str | Path, resume: bool = False) -> FinetuneResult:
    """Fine-tune as the configuration says (`polyfid finetune CONFIG.yaml`; the options:
    `polyfid config --finetune`): writes out/config.json, reads the model and each data set
    once, fine-tunes (`finetune`), evaluates the test data and writes out/results.json
    (`finetune_summary`) and, with output.plots, the loss curves and the test parity plot."""
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config)
    training = cfg.finetune.training
    set_threads(training.get("num_threads"))
    dtype = DTYPES[str(training.get("dtype", "float32"))]
    device = resolve_device(training.get("device"), "finetune.training.device")
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    source = load_model(cfg.model, dtype=dtype, device=device)
    data = read_finetune_data(cfg)
    if data.test is not None:  # now, not after the training
        check_frames(data.test, **model_geometry(source), name=data.test.name)
    options = replace(cfg.finetune, fidelity=data.fidelity)
    res = finetune(source, data.train, out, options, data.validation, data.replay, resume, cfg.output.progress)
    if data.test is not None:
        test = metrics_of(res.model, data.test, dtype, str(device))
        res.test_metrics = public(test)
        if cfg.output.plots and test["_arrays"]:
            plot_parity(test, out / "parity_test.png", "test")
    if cfg.output.plots:
        plot_loss_curves(res.stages["finetune"].history, out / "loss_curves.png")
    (out / "results.json").write_text(json.dumps(finetune_summary(res), indent=2))
    return res


@dataclass
class FinetuneDatasets:
    """The data sets of a fine-tuning configuration, read: training, validation and test
    frames at the level `fidelity` (None where none are configured) and the replay frames."""

    fidelity: str
    train: Dataset
    validation: Dataset | None
    test: Dataset | None
    replay: Dataset | None


def read_finetune_data(cfg: FinetuneConfig) -> FinetuneDatasets:
    """Each data set of `cfg` read once (`load_spec`: format, fidelity, options, select, use).
    The level is finetune.fidelity, else the first training data set's only label set (an
    unnamed one, "default", takes the file's stem); every single-level data set's labels are
    renamed to it, a multi-level one keeps only its label set of that name; the parts of each
    list are merged (data.merge_tolerance). Replay data sets keep their names (an unnamed
    single-level one takes its file's stem)."""
    d = cfg.data
    if not d.train:
        raise DataError("no fine-tuning data: set data.train to a file or a list of data sets")
    first = load_spec(d.train[0])
    level = cfg.finetune.fidelity or _level_of(first, d.train[0])
    train = [_at_level(first, d.train[0], level)] + [_at_level(load_spec(s), s, level) for s in d.train[1:]]
    return FinetuneDatasets(
        level, _merge(train, d.merge_tolerance),
        _merge([_at_level(load_spec(s), s, level) for s in d.validation], d.merge_tolerance),
        _merge([_at_level(load_spec(s), s, level) for s in d.test], d.merge_tolerance),
        _merge([_unnamed_as_stem(load_spec(s), s) for s in d.replay], d.merge_tolerance))


def _merge(parts: list[Dataset], tolerance: float | None) -> Any:
    """The parts as one data set (merged: `Dataset.merge`), one part as it is; None for none."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Dataset.merge(parts, tolerance=tolerance)


def _level_of(ds: Dataset, spec: DatasetSpec) -> str:
    """The level of the first training data set: its only label set ("default": the file's stem)."""
    if len(ds.fidelities) != 1:
        raise ConfigError(f"{spec.path}: label sets {ds.fidelities}; set finetune.fidelity or the data set's "
                          "fidelity to the one to fine-tune to")
    name = ds.fidelities[0]
    return Path(spec.path).stem if name == "default" and spec.fidelity is None else name


def _at_level(ds: Dataset, spec: DatasetSpec, level: str) -> Dataset:
    """`ds`'s labels as the level: a single label set renamed, a multi-level file's `level` kept."""
    if len(ds.fidelities) == 1:
        return ds.rename_fidelity(ds.fidelities[0], level)
    if level not in ds.fidelities:
        raise ConfigError(f"{spec.path}: label sets {ds.fidelities}, none of them {level!r}; set finetune.fidelity "
                          "or the data set's fidelity to the one to fine-tune to")
    return ds.restrict([level])


def _unnamed_as_stem(ds: Dataset, spec: DatasetSpec) -> Dataset:
    """A replay data set whose only label set has no name ("default") takes its file's stem."""
    if ds.fidelities == ["default"] and spec.fidelity is None:
        ds.rename_fidelity("default", Path(spec.path).stem)
    return ds
