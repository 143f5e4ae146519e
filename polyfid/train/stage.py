"""One training stage: a model trained on data as a training section says, on the run loop
(`Trainer`), into a folder. Strategies, meta-training and fine-tuning are made of stages; what
a stage reads and how its steps run is decided here and in the trainer, not in the strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset
from polyfid.models import BranchedPotential, Potential, load_model
from polyfid.neighbors.checks import model_geometry
from polyfid.numerics import resolve_device
from polyfid.train.config import Config, ConfigError, OutputConfig, TrainingConfig
from polyfid.train.loop import BEST_MODEL, TrainState
from polyfid.train.trainer import StepOptions, Trainer

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def data_geometry(cfg: Config) -> dict[str, float]:
    """The geometry checks' limits of a configuration (data.min_distance, data.max_extent, Å)."""
    return {"min_distance": cfg.data.min_distance, "max_extent": cfg.data.max_extent}


def frame_weights(ds: Dataset, sampling: dict[str, float]) -> np.ndarray | None:
    """Sampling weight of each frame such that the frames labelled at fidelity f make up a
    share `sampling[f]` of the draws; a frame with several levels counts for its rarest
    named level; unnamed frames share the rest in proportion to their number."""
    if not sampling:
        return None
    counts = {f: ds.count(f, "energy") + ds.count(f, "forces") for f in sampling}
    group = []
    for fr in ds:
        named = [f for f in fr.labels if f in sampling]
        group.append(min(named, key=lambda f: counts[f]) if named else None)
    w = np.zeros(len(ds))
    rest = 1.0 - sum(sampling.values())
    for g in set(group):
        members = np.array([k for k, x in enumerate(group) if x == g])
        share = sampling[g] if g is not None else rest
        w[members] = share / len(members)
    unknown = set(sampling) - set(ds.fidelities)
    if unknown:
        raise ConfigError(f"training.sampling names fidelities {sorted(unknown)} absent from the training data")
    if not w.any():
        raise ConfigError("training.sampling leaves no frame with a positive weight")
    return w


@dataclass
class Stage:
    """One training stage: its folder, training options and model options, what its model
    file records, and what it adds to the step.

    geometry: the geometry checks' limits (data.min_distance, data.max_extent, Å; None: the
    model's own), kept in the model file's metadata; fit_references: fit the reference
    energies on the stage's data first, then set every head's scale to `energy_scale` if
    given (weights copied from another model keep their meaning); regularizer: a scalar added
    to every step's loss."""

    out: Path
    training: TrainingConfig
    model_config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    geometry: dict[str, float] | None = None
    fit_references: bool = True
    energy_scale: torch.Tensor | None = None
    regularizer: Callable[[], torch.Tensor] | None = None


def train_stage(model: Potential, train_ds: Dataset, val_ds: Dataset | None, stage: Stage, output: OutputConfig,
                resume: bool = False) -> tuple[Potential, TrainState]:
    """Train `model` as `stage` says; returns the best model (read back from its file) and the
    final state."""
    tc = stage.training
    dtype = DTYPES[tc.dtype]
    fids = list(model.fidelities)
    geometry = model_geometry(model) if stage.geometry is None else dict(stage.geometry)
    train = PackedData(train_ds, model.cutoff, fids, dtype=dtype, **geometry)
    val = (PackedData(val_ds, model.cutoff, fids, dtype=dtype, **geometry)
           if val_ds is not None and len(val_ds) else None)
    meta = dict(stage.metadata) | geometry
    if stage.fit_references:
        refs = model.fit_reference_energies(train)
        meta["reference_energies_eV"] = {f: dict(zip(model.species, r)) for f, r in refs.items()}
        if stage.energy_scale is not None:
            with torch.no_grad():
                model.energy_scale.fill_(float(stage.energy_scale))
    meta |= {"n_train": len(train_ds), "n_val": 0 if val is None else len(val_ds)}
    model = model.to(dtype=dtype, device=resolve_device(tc.device, "training.device"))
    shares = {} if len(fids) < 2 else {k: v for k, v in tc.sampling.items() if k in fids}
    options = StepOptions(frame_weights(train_ds, shares), stage.regularizer, output.progress, output.tensorboard)
    state = Trainer(model, train, val, tc, stage.out, stage.model_config, meta, options).fit(resume=resume)
    return load_model(stage.out / BEST_MODEL, dtype=dtype, device=tc.device), state


def freeze(model: Potential, trainable: str) -> None:
    """Leave only the named part trainable: all, head, or last (last block and head)."""
    if trainable == "all":
        return
    for p in model.representation.parameters():
        p.requires_grad_(False)
    if trainable == "last":
        for p in model.representation.blocks[-1].parameters():
            p.requires_grad_(True)
    if isinstance(model, BranchedPotential):  # each fidelity's own blocks are the backbone's last ones
        for p in model.tails.parameters():
            p.requires_grad_(trainable == "last")
