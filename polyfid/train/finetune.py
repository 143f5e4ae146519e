"""Fine-tuning a trained (e.g. meta-trained) model to a new, small data set.

A new level gets a new head and reference energies; the model's other heads, their
reference energies and scales are kept as they were (with a fine-tuned backbone their
predictions move with it; `trainable="head"` keeps them exact). The new head starts as a
copy of the existing head that best matches the new data (per-element energy offsets
fitted on top), so fine-tuning begins from the closest known level. Optionally the backbone
is frozen for a warm-up. Defaults are a step budget, not an epoch count, so that 10 and
1000 frames both get enough updates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset
from polyfid.data.splits import split_indices
from polyfid.errors import DataError
from polyfid.models import BranchedPotential, atomic_write, build_potential, load_model, model_dict
from polyfid.models.potential import Potential
from polyfid.neighbors.checks import model_geometry
from polyfid.numerics import resolve_device
from polyfid.train.config import ConfigError, OutputConfig, Range, TrainingConfig, check_number, from_dict
from polyfid.train.strategies import DTYPES, _freeze, _stage, restrict
from polyfid.train.trainer import BEST_MODEL, TrainState

HEAD_INITS = ("best", "mean", "zero")


def finetune_training(n_train: int, steps: int = 1500, **overrides: Any) -> TrainingConfig:
    """Training options for fine-tuning on `n_train` frames: about `steps` optimiser steps
    (batch 32 or all frames), cosine decay, validation every epoch, early stopping after
    about a fifth of the steps without improvement. `overrides`: any TrainingConfig key."""
    bs = int(overrides.get("batch_size", min(32, max(n_train, 1))))
    per_epoch = max(math.ceil(n_train / bs), 1)
    d = {"batch_size": bs, "lr": 1e-3, "scheduler": "cosine", "min_lr": 1e-5,
         "epochs": max(math.ceil(steps / per_epoch), 1),
         "early_stopping_patience": max(math.ceil(steps / 5 / per_epoch), 5),
         "ema_decay": 0.99, "checkpoint_interval_s": 30.0}
    return from_dict(TrainingConfig, d | overrides, "finetune.training")


#: the ranges of finetune()'s own numeric arguments: (whole number?, range)
FINETUNE_RANGES = {
    "steps": (True, Range(ge=1)),
    "warmup_steps": (True, Range(ge=0)),
    "anchor": (False, Range(ge=0)),
    "replay_share": (False, Range(gt=0, lt=1)),
    "val_fraction": (False, Range(ge=0, lt=1)),
    "seed": (True, Range(ge=0, lt=2**64)),
}


def check_finetune_options(training: dict[str, Any] | None = None, prefix: str = "finetune.",
                           **options: Any) -> None:
    """ConfigError naming the first of `options` (finetune()'s arguments, by name) outside its
    range, or a TrainingConfig override that the training section would refuse; before any
    model is loaded or frame read. `prefix` names them (the command line passes "--")."""
    for name, value in options.items():
        if name in FINETUNE_RANGES:
            integer, rng = FINETUNE_RANGES[name]
            check_number(value, prefix + name.replace("_", "-" if prefix == "--" else "_"), rng, integer=integer)
    if options.get("trainable", "all") not in ("all", "last", "head"):
        raise ConfigError(f"{prefix}trainable: expected all, last or head, got {options['trainable']!r}")
    if training:
        from_dict(TrainingConfig, dict(training), "finetune.training")


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
    """The fine-tuned model (best validation), its file, the head it started from and the
    state of each stage (warmup, finetune)."""

    model: Potential
    path: Path
    fidelity: str
    source_head: str | None
    stages: dict[str, TrainState]

    @property
    def train_s(self) -> float:
        return sum(s.elapsed_s for s in self.stages.values())


def finetune(
    model: Potential | str | Path,
    train_ds: Dataset,
    out: str | Path,
    val_ds: Dataset | None = None,
    fidelity: str | None = None,
    head_init: str = "best",
    trainable: str = "all",
    warmup_steps: int = 200,
    steps: int = 1500,
    anchor: float = 0.0,
    replay: Dataset | None = None,
    replay_share: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    resume: bool = False,
    progress: bool = False,
    **training: Any,
) -> FinetuneResult:
    """Fine-tune `model` to `train_ds`, whose frames carry labels at one level, `fidelity`
    (default: the data's only level); writes out/model.pt, whose default head is `fidelity`.
    `model`: a saved model's path, or a `Potential`, which is copied and left unchanged.

    A level the model lacks gets a new head (`add_head`, `head_init`); a level it has goes
    on training its head. trainable: all, last (last interaction block and the heads) or head.
    warmup_steps: steps with the backbone frozen before it is trained too (0: none).
    anchor: weight λ of λ·Σ(θ − θ₀)² over the backbone's parameters θ (θ₀: as loaded), in
    units of the loss; pulls a few-frame fine-tune towards the pre-trained network (L2-SP).
    replay: frames labelled at levels the model already has (e.g. its pre-training data). They
    go on training their own heads alongside the new one, so the backbone keeps serving them
    rather than fitting a few frames alone; `replay_share` is their share of the draws. With
    replay the heads of the replay levels are trained, not kept as they were; the replay
    frames' levels must all be heads of the model.
    Without `val_ds`, a `val_fraction` of the frames (at least one) is held out for
    validation and early stopping. `training`: TrainingConfig overrides (lr, max_time_s, …)."""
    check_finetune_options(steps=steps, warmup_steps=warmup_steps, anchor=anchor, replay_share=replay_share,
                           val_fraction=val_fraction, seed=seed, trainable=trainable, training=training)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[str(training.get("dtype", "float32"))]
    device = resolve_device(training.get("device"), "finetune.training.device")
    if isinstance(model, (str, Path)):
        source = load_model(model, dtype=dtype, device=device)
    else:  # a copy, where training will run: the caller's model stays as it was
        source = copy.deepcopy(model).to(dtype=dtype, device=device)
    fidelity = fidelity or _only_fidelity(train_ds)
    train_ds = restrict(train_ds, [fidelity])
    if not len(train_ds):
        raise DataError(f"the fine-tuning data have no labels at {fidelity!r}")
    missing = set(train_ds.elements) - set(source.species)
    if missing:
        raise DataError(f"the fine-tuning data contain elements {sorted(missing)} the model does not know "
                        f"(its species: {source.species})")
    if val_ds is None and len(train_ds) > 1 and val_fraction > 0:
        n_val = max(1, int(round(val_fraction * len(train_ds))))
        tr, va = split_indices(len(train_ds), [len(train_ds) - n_val, n_val], seed=seed)
        train_ds, val_ds = train_ds[tr], train_ds[va]
    elif val_ds is not None:
        val_ds = restrict(val_ds, [fidelity])
    head: str | None = fidelity
    if fidelity in source.fidelities:
        net = source
    else:
        torch.manual_seed(seed)
        net, head = add_head(source, train_ds, fidelity, head_init)
    trained = [fidelity]
    if replay is not None:
        train_ds, training = _with_replay(net, train_ds, replay, fidelity, replay_share, training)
        trained += list(replay.fidelities)
    keep = _frozen_heads(net, trained)
    model_cfg = dict(net.model_config)
    meta = {"strategy": "finetune", "target": fidelity, "source_head": head, "trainable": trainable}
    meta |= model_geometry(source)  # the checks the source model was trained with go on applying
    output = OutputConfig(progress=progress, tensorboard=False, plots=False)
    stages: dict[str, TrainState] = {}
    n_epoch = training["epoch_frames"] if replay is not None else len(train_ds)
    tc = finetune_training(n_epoch, steps, seed=seed, **training)
    if warmup_steps > 0 and trainable != "head":
        tw = finetune_training(n_epoch, warmup_steps, seed=seed, **(training | {"early_stopping_patience": None}))
        _freeze(net, "head")
        net, stages["warmup"] = _stage(net, train_ds, val_ds, tw, out / "warmup", model_cfg, output, resume,
                                       fit_references=False, metadata=meta)
        net.model_config = model_cfg
    for p in net.parameters():
        p.requires_grad_(True)
    _freeze(net, trainable)
    net, stages["finetune"] = _stage(net, train_ds, val_ds, tc, out / "finetune", model_cfg, output, resume,
                                     fit_references=False, regularizer=anchor_penalty(net, anchor), metadata=meta)
    _restore_heads(net, keep)
    net.model_config = model_cfg
    atomic_write(model_dict(net, model_cfg, meta), out / BEST_MODEL)
    best = load_model(out / BEST_MODEL, dtype=dtype, device=device)
    return FinetuneResult(best, out / BEST_MODEL, fidelity, head, stages)


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
    return {"fidelity": res.fidelity, "source_head": res.source_head, "train_s": res.train_s,
            "stages": {k: {"epochs": s.epoch, "train_s": s.elapsed_s, "stopped": s.stopped}
                       for k, s in res.stages.items()}}

