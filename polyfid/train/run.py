"""A whole training run from a configuration: data, model, reference energies, training,
test evaluation, plots. `polyfid train` and `polyfid.train_model` both call `run_training`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import error_metrics, public
from polyfid.analysis.plots import plot_loss_curves, plot_parity
from polyfid.data.batch import PackedData
from polyfid.data.errors import DataError
from polyfid.data.frame import Dataset
from polyfid.data.readers import read
from polyfid.data.splits import split_indices
from polyfid.models import build_potential, load_model
from polyfid.models.potential import Potential
from polyfid.train.config import Config, DataConfig, DatasetSpec, load_config
from polyfid.train.trainer import BEST_MODEL, Trainer

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _slice(text: str, where: str) -> slice:
    try:
        parts = [int(p) if p.strip() else None for p in text.split(":")]
        if len(parts) == 1:
            return slice(parts[0], parts[0] + 1 if parts[0] != -1 else None)
        return slice(*parts)
    except (TypeError, ValueError):
        raise DataError(f"{where}: select {text!r} is not a slice such as '0:100' or '::10'") from None


def load_spec(spec: DatasetSpec) -> Dataset:
    """Read one configured data set, apply `select` and `use`."""
    ds = read(spec.path, format=spec.format, fidelity=spec.fidelity, **spec.options)
    if spec.select:
        ds = ds[_slice(spec.select, spec.path)]
    for fid in ds.fidelities:
        ds.select_labels(fid, spec.use)
    return ds


def load_specs(specs: list[DatasetSpec]) -> Dataset:
    out = Dataset([])
    for s in specs:
        out = out + load_spec(s)
    return out


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, Dataset]:
    """Training, validation and test data; validation split off the training data (by
    `seed`) when none is configured."""
    if not cfg.train:
        raise DataError("no training data: set data.train to a file or a list of data sets")
    train = load_specs(cfg.train)
    test = load_specs(cfg.test)
    if cfg.validation:
        val = load_specs(cfg.validation)
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


def set_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


@dataclass
class RunResult:
    """What a run leaves: the run folder, the trained model (best validation, EMA weights),
    the final training state and test metrics per fidelity (meV, meV/Å)."""

    out: Path
    model: Potential
    epochs: int
    train_s: float
    stopped: str
    test_metrics: dict[str, Any]
    val_metrics: dict[str, Any]


def run_training(config: Config | dict | str | Path, resume: bool = False) -> RunResult:
    """Train a potential as the configuration says; see `polyfid config` for the options."""
    cfg = config if isinstance(config, Config) else load_config(config)
    tc = cfg.training
    set_threads(tc.num_threads)
    dtype = DTYPES[tc.dtype]
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    train_ds, val_ds, test_ds = build_datasets(cfg.data)
    fidelities = train_ds.fidelities
    species = sorted(set(train_ds.elements) | set(val_ds.elements))
    model_cfg = asdict(cfg.model)
    torch.manual_seed(tc.seed)
    model = build_potential(model_cfg, species, fidelities)
    cutoff = model.cutoff
    train = PackedData(train_ds, cutoff, fidelities, dtype=dtype)
    val = PackedData(val_ds, cutoff, fidelities, dtype=dtype) if len(val_ds) else None
    refs = model.fit_reference_energies(train)
    model = model.to(dtype=dtype, device=tc.device)
    metadata = {
        "reference_energies_eV": {f: dict(zip(species, r)) for f, r in refs.items()},
        "n_train": len(train_ds),
        "n_val": len(val_ds),
    }
    trainer = Trainer(
        model, train, val, tc, out, model_cfg, metadata,
        progress=cfg.output.progress, tensorboard=cfg.output.tensorboard,
    )
    state = trainer.fit(resume=resume)

    best = load_model(out / BEST_MODEL, dtype=dtype, device=tc.device)
    val_metrics = error_metrics(best, val, device=tc.device) if val is not None else {"_arrays": {}}
    test_metrics: dict[str, Any] = {"_arrays": {}}
    if len(test_ds):
        missing = set(test_ds.elements) - set(species)
        if missing:
            raise DataError(f"test data contain elements {sorted(missing)} absent from the training data")
        test = PackedData(test_ds, cutoff, fidelities, dtype=dtype)
        test_metrics = error_metrics(best, test, device=tc.device)
    summary = {
        "epochs": state.epoch, "train_s": state.elapsed_s, "stopped": state.stopped,
        "best_epoch": state.best_epoch, "validation": public(val_metrics), "test": public(test_metrics),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if cfg.output.plots:
        plot_loss_curves(state.history, out / "loss_curves.png")
        if val_metrics["_arrays"]:
            plot_parity(val_metrics, out / "parity_validation.png", "validation")
        if test_metrics["_arrays"]:
            plot_parity(test_metrics, out / "parity_test.png", "test")
    return RunResult(out, best, state.epoch, state.elapsed_s, state.stopped, public(test_metrics), public(val_metrics))
