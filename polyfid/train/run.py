"""A whole training run from a configuration: data, model, reference energies, training,
test evaluation, plots. `polyfid train` and `polyfid.train_model` both call `run_training`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import error_metrics, public
from polyfid.analysis.plots import plot_loss_curves, plot_parity
from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset
from polyfid.data.merge import MERGE_TOLERANCE
from polyfid.data.readers import read
from polyfid.data.splits import parse_slice, split_indices
from polyfid.errors import DataError
from polyfid.models import DeltaPotential, Potential
from polyfid.neighbors.checks import check_frames, model_geometry
from polyfid.numerics import resolve_device, set_threads
from polyfid.train.config import Config, DataConfig, DatasetSpec, load_config
from polyfid.train.stage import DTYPES, data_geometry
from polyfid.train.strategies import fit_strategy


def load_spec(spec: DatasetSpec) -> Dataset:
    """Read one configured data set, apply `select` and `use`."""
    ds = read(spec.path, format=spec.format, fidelity=spec.fidelity, **spec.options)
    if spec.select:
        ds = ds[parse_slice(spec.select, spec.path)]
    for fid in ds.fidelities:
        ds.select_labels(fid, spec.use)
    return ds


def load_specs(specs: list[DatasetSpec], merge_tolerance: float | None = MERGE_TOLERANCE) -> Dataset:
    """Read the data sets; two or more are merged: the same geometry in several files is one
    frame with every file's label sets (`Dataset.merge`; None: concatenate). One data set is
    taken as it is."""
    if len(specs) == 1:
        return load_spec(specs[0])
    return Dataset.merge([load_spec(s) for s in specs], tolerance=merge_tolerance)


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, Dataset]:
    """Training, validation and test data; validation split off the training data (by
    `seed`) when none is configured."""
    if not cfg.train:
        raise DataError("no training data: set data.train to a file or a list of data sets")
    train = load_specs(cfg.train, cfg.merge_tolerance)
    test = load_specs(cfg.test, cfg.merge_tolerance)
    if cfg.validation:
        val = load_specs(cfg.validation, cfg.merge_tolerance)
    else:
        n_val = cfg.val_size if cfg.val_size is not None else int(round(cfg.val_fraction * len(train)))
        if n_val >= len(train):
            raise DataError(f"validation size {n_val} leaves no training frames out of {len(train)}")
        tr_idx, val_idx = split_indices(len(train), [len(train) - n_val, n_val], seed=cfg.seed)
        train, val = train[tr_idx], train[val_idx]
    if cfg.train_size is not None:
        if cfg.train_size > len(train):
            raise DataError(f"train_size {cfg.train_size} exceeds the {len(train)} training frames available")
        train = train[np.arange(cfg.train_size)]
    return train, val, test


@dataclass
class RunResult:
    """What a run leaves: the run folder, the trained model (best validation, EMA weights),
    the strategy and target fidelity, the training totals and metrics per fidelity (meV, meV/Å)."""

    out: Path
    model: Potential | DeltaPotential
    epochs: int
    train_s: float
    stopped: str
    test_metrics: dict[str, Any]
    val_metrics: dict[str, Any]
    strategy: str = "single"
    target: str = ""


def metrics_of(model: Potential | DeltaPotential, ds: Dataset | None, dtype: torch.dtype, device: str) -> dict:
    """Errors per fidelity the model has; labels at other fidelities are ignored."""
    if ds is None or not len(ds) or not set(ds.fidelities) & set(model.fidelities):
        return {"_arrays": {}}
    missing = set(ds.elements) - set(model.species)
    if missing:
        raise DataError(f"evaluation data contain elements {sorted(missing)} absent from the training data")
    packed = PackedData(ds, model.cutoff, model.fidelities, dtype=dtype, **model_geometry(model))
    return error_metrics(model, packed, device=device)


def check_devices(cfg: Config) -> None:
    """Refuse a device this machine lacks before the data are read (every stage's device)."""
    resolve_device(cfg.training.device, "training.device")
    if "device" in cfg.strategy.second_stage:
        resolve_device(cfg.strategy.second_stage["device"], "strategy.second_stage.device")


def run_training(config: Config | dict | str | Path, resume: bool = False) -> RunResult:
    """Train a potential as the configuration says; see `polyfid config` for the options."""
    cfg = config if isinstance(config, Config) else load_config(config)
    tc = cfg.training
    check_devices(cfg)
    set_threads(tc.num_threads)
    dtype = DTYPES[tc.dtype]
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    train_ds, val_ds, test_ds = build_datasets(cfg.data)
    check_frames(test_ds, **data_geometry(cfg), name=test_ds.name)  # now, not after hours of training
    res = fit_strategy(cfg, train_ds, val_ds, out, resume=resume)
    best = res.model
    val_metrics = metrics_of(best, val_ds, dtype, tc.device)
    test_metrics = metrics_of(best, test_ds, dtype, tc.device)
    last = list(res.stages.values())[-1]
    summary = {
        "strategy": res.strategy, "target": res.target, "fidelities": list(best.fidelities),
        "epochs": res.epochs, "train_s": res.train_s, "stopped": last.stopped, "best_epoch": last.best_epoch,
        "stages": {k: {"epochs": s.epoch, "train_s": s.elapsed_s, "stopped": s.stopped} for k, s in res.stages.items()},
        "validation": public(val_metrics), "test": public(test_metrics),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if cfg.output.plots:
        plot_loss_curves(last.history, out / "loss_curves.png")
        if val_metrics["_arrays"]:
            plot_parity(val_metrics, out / "parity_validation.png", "validation")
        if test_metrics["_arrays"]:
            plot_parity(test_metrics, out / "parity_test.png", "test")
    return RunResult(out, best, res.epochs, res.train_s, last.stopped, public(test_metrics), public(val_metrics),
                     res.strategy, res.target)
