"""The one run loop every kind of training uses: ordinary training and each strategy's stages
(`Trainer`), Reptile (`ReptileTrainer`), fine-tuning (through the stages) and the descriptor
network (`DescriptorTrainer`).

`RunLoop` owns the run: the budget clock (epochs, optimiser steps, wall-clock seconds),
checkpoints and exact resume, validation, the best model, early stopping, the metrics log
(`metrics.csv`, and TensorBoard on request), the progress bar and subnormal flushing. A
subclass plugs in the step by implementing the hooks:

- `begin_epoch()` -> steps in the epoch about to run (it draws the epoch's batch order),
- `train_step(k, frac)`: the k-th step of the epoch, `frac` the fraction of the budget used,
- `end_epoch(done)` -> the epoch's training terms for the log,
- `validate()` -> validation errors with `val_loss` ({} without validation data),
- `payload()` / `load_payload(d)`: the tensors and optimiser state a checkpoint holds,
- `best_model()`: the model description written as the best model,

and optionally `current_lr()` and `after_validation(improved)` (a plateau schedule). The
data a step reads are its own affair, so a streamed source or a distributed step needs no
change here or in the strategies.

Resuming is exact as long as the step's batch order is a function of (seed, epoch) or
(seed, step) and everything else it keeps is in its payload: each epoch's end (or, with
checkpoint_interval_s, the first epoch end after that many seconds) writes weights, optimiser
state and the loop's state atomically. A run killed at any moment restarts from the last
checkpoint and redoes the same steps.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from polyfid.errors import ConfigError, TrainingDiverged
from polyfid.models import atomic_write, checkpoint_error, nonfinite_weights, read_checkpoint
from polyfid.numerics import flush_denormals

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
METRICS = "metrics.csv"

#: the limits a run stops at; a run resumed with a raised limit goes on
LIMITS = ("epoch limit", "step limit", "time budget")


def cosine_lr(lr: float, min_lr: float, frac: float) -> float:
    """Cosine decay from lr to min_lr as the used fraction of the budget goes from 0 to 1."""
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))


def batch_order(n: int, seed: int, epoch: int, weights: np.ndarray | None = None,
                size: int | None = None) -> np.ndarray:
    """Frame order of one epoch: a function of (seed, epoch) only, so resuming repeats it.

    With `weights` (n,), `size` (default n) frames are drawn with replacement in proportion to
    them (the sampling ratio between data sets); without, a permutation of the n frames."""
    rng = np.random.default_rng([seed, epoch])
    if weights is None:
        return rng.permutation(n)
    return rng.choice(n, size=size or n, replace=True, p=weights / weights.sum())


def require_finite(d: dict[str, Any], what: str, step: int) -> None:
    """Raise TrainingDiverged, naming the step and the options, if the model description or
    checkpoint `d` holds non-finite weights (`polyfid.models.nonfinite_weights`, which
    atomic_write also refuses, with a ModelFileError that knows nothing of training)."""
    bad = nonfinite_weights(d)
    if bad:
        raise TrainingDiverged(f"training diverged by step {step}: {what} would hold non-finite weights "
                               f"({', '.join(bad[:6])}); it is not written. Lower training.lr or set "
                               "training.grad_clip")


@dataclass
class Budget:
    """When a run stops, and what its schedule (learning rate, final phase) counts.

    epochs: epoch limit (None: none); max_steps: step limit; max_time_s: wall-clock seconds;
    schedule_by: the measure of the used fraction of the budget; eval_every: epochs between
    validations; early_stopping_patience: validations without improvement before stopping;
    checkpoint_interval_s: seconds between checkpoints (0: every epoch); flush_denormal:
    subnormal floats flushed to zero while the loop runs."""

    epochs: int | None = None
    max_steps: int | None = None
    max_time_s: float | None = None
    schedule_by: Literal["steps", "time", "epochs"] = "epochs"
    eval_every: int = 1
    early_stopping_patience: int | None = None
    checkpoint_interval_s: float = 30.0
    flush_denormal: bool = True


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps taken (optimiser steps; Reptile: outer steps)
    elapsed_s: float = 0.0  # wall-clock seconds of training so far (budget clock)
    lr: float = 0.0  # the plateau schedule's learning rate
    best_val: float = math.inf
    best_epoch: int = -1
    best_step: int = -1
    plateau_bad: int = 0
    early_bad: int = 0
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    # steps taken in the final (energy-weight) phase after a step before it; -1: no step before it yet
    final_steps: int = -1


class RunLoop:
    """The run; subclasses plug in the step (see the module's docstring).

    out: the run folder (None: nothing is written, the best weights are not kept apart);
    model: the network whose species and fidelities a checkpoint records."""

    def __init__(self, model: torch.nn.Module, budget: Budget, out: str | Path | None, progress: bool = True,
                 tensorboard: bool = False) -> None:
        self.model, self.budget = model, budget
        self.out = None if out is None else Path(out)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        self.progress, self.tensorboard = progress, tensorboard
        self.state = TrainState()
        self._writer = None
        self._last_checkpoint = -math.inf

    # ---- hooks ----------------------------------------------------------------------------
    def begin_epoch(self) -> int:
        raise NotImplementedError

    def train_step(self, k: int, frac: float) -> None:
        raise NotImplementedError

    def end_epoch(self, done: int) -> dict[str, float]:
        return {"train_steps": done}

    def validate(self) -> dict[str, float]:
        return {}

    def after_validation(self, improved: bool) -> None:
        """After each validation (a plateau schedule acts here)."""

    def current_lr(self) -> float | None:
        return None

    def payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_payload(self, d: dict[str, Any]) -> None:
        raise NotImplementedError

    def best_model(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- budget ---------------------------------------------------------------------------
    def fraction(self, k: int = 0, n: int = 1) -> float:
        """Fraction of the budget used at step `k` of an epoch of `n` steps."""
        b, s = self.budget, self.state
        if b.schedule_by == "steps" and b.max_steps:
            return min(s.step / b.max_steps, 1.0)
        if b.schedule_by == "time" and b.max_time_s:
            return min(s.elapsed_s / b.max_time_s, 1.0)
        if b.epochs:
            return min((s.epoch + k / max(n, 1)) / b.epochs, 1.0)
        return 0.0

    def _limit(self) -> str:
        """The limit reached, or ""."""
        b, s = self.budget, self.state
        if b.epochs is not None and not b.max_steps and s.epoch >= b.epochs:  # max_steps replaces epochs
            return "epoch limit"
        if b.max_time_s and s.elapsed_s >= b.max_time_s:
            return "time budget"
        if b.max_steps and s.step >= b.max_steps:
            return "step limit"
        return ""

    def _last_epoch(self) -> bool:
        b, s = self.budget, self.state
        return s.step == b.max_steps if b.max_steps else s.epoch == b.epochs

    # ---- checkpoints ----------------------------------------------------------------------
    def _identity(self) -> dict[str, list]:
        """What the weights mean: a resumed run must have the same (checked on load)."""
        return {"species": list(getattr(self.model, "species", [])),
                "fidelities": list(getattr(self.model, "fidelities", []))}

    def checkpoint_dict(self) -> dict[str, Any]:
        return self._identity() | self.payload() | {"state": asdict(self.state)}

    def save_checkpoint(self) -> None:
        if self.out is None:
            return
        self._flush_logs()
        d = self.checkpoint_dict()
        require_finite(d, str(self.out / CHECKPOINT), self.state.step)
        atomic_write(d, self.out / CHECKPOINT, durable=False)
        self._last_checkpoint = time.perf_counter()

    def load_checkpoint(self) -> bool:
        """Restore from out/checkpoint.pt if present; returns whether it was."""
        if self.out is None:
            return False
        path = self.out / CHECKPOINT
        ck = read_checkpoint(path, getattr(self, "device", "cpu"))  # a damaged one: ModelFileError, not a restart
        if ck is None:
            return False
        for key, have in self._identity().items():  # absent from checkpoints of earlier versions
            if key in ck and list(ck[key]) != have:
                raise ConfigError(
                    f"--resume: {path} was written for {key} {list(ck[key])}, and this run's data give {have}: its "
                    f"weights would stand for other {'elements' if key == 'species' else 'levels'}. Resume with the "
                    "configuration that wrote it, or train into another output.dir")
        try:
            self.load_payload(ck)
            st = ck["state"]
            # checkpoints of earlier versions lack some fields: their defaults
            self.state = TrainState(**{k: st[k] for k in TrainState.__dataclass_fields__ if k in st})
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            detail = " ".join(str(e).split())[:400]
            raise checkpoint_error(path, f"checkpoint {path} does not fit this run (written with other options, or "
                                         f"damaged): {type(e).__name__}: {detail}") from None
        return True

    def save_best_model(self) -> None:
        if self.out is None:
            return
        d = self.best_model()
        require_finite(d, str(self.out / BEST_MODEL), self.state.step)
        atomic_write(d, self.out / BEST_MODEL)

    # ---- logs -----------------------------------------------------------------------------
    def _log(self, row: dict[str, float]) -> None:
        self.state.history.append(row)
        if self.tensorboard and self.out is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=int(row["epoch"]))
            for k, v in row.items():
                if k != "epoch":
                    self._writer.add_scalar(k, v, int(row["epoch"]))

    def _flush_logs(self) -> None:
        """metrics.csv (rewritten whole: columns may appear later) and TensorBoard to disk."""
        keys: list[str] = []
        for r in self.state.history:
            keys += [k for k in r if k not in keys]
        # a fixed temporary name: a write killed here leaves it, and the next flush overwrites and renames it
        tmp = self.out / f"{METRICS}.tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.state.history)
        tmp.replace(self.out / METRICS)
        if self._writer is not None:
            self._writer.flush()

    # ---- the run --------------------------------------------------------------------------
    def run_epoch(self, t0: float, e0: float) -> dict[str, float]:
        """One epoch's steps, each after a look at the budget; returns its training terms."""
        s = self.state
        n = self.begin_epoch()
        done = 0
        for k in range(n):
            s.elapsed_s = e0 + (time.perf_counter() - t0)
            if (self.budget.max_time_s and s.elapsed_s >= self.budget.max_time_s) or \
                    (self.budget.max_steps and s.step >= self.budget.max_steps):
                break
            self.train_step(k, self.fraction(k, n))
            s.step += 1
            done += 1
        s.elapsed_s = e0 + (time.perf_counter() - t0)
        return self.end_epoch(done)

    def _after_validation(self, val: dict[str, float]) -> None:
        s, b = self.state, self.budget
        if not val:
            return
        improved = val["val_loss"] < s.best_val * (1 - 1e-6)
        if improved:
            s.best_val, s.best_epoch, s.best_step, s.plateau_bad, s.early_bad = val["val_loss"], s.epoch, s.step, 0, 0
            self.save_best_model()
        else:
            s.plateau_bad += 1
            s.early_bad += 1
            if b.early_stopping_patience is not None and s.early_bad >= b.early_stopping_patience:
                s.stopped = "early stopping"
        self.after_validation(improved)

    def _epoch(self) -> dict[str, float]:
        """One epoch, its validation and its row of the log."""
        s = self.state
        t0, e0 = time.perf_counter(), s.elapsed_s
        row: dict[str, float] = {"epoch": s.epoch + 1}
        row |= self.run_epoch(t0, e0)
        lr = self.current_lr()
        if lr is not None:
            row["lr"] = lr
        s.epoch += 1
        row["step"] = s.step
        if s.epoch % self.budget.eval_every == 0 or self._last_epoch():
            val = self.validate()
            row |= val
            self._after_validation(val)
        s.elapsed_s = row["elapsed_s"] = e0 + (time.perf_counter() - t0)  # validation counts towards the clock
        self._log(row)
        if time.perf_counter() - self._last_checkpoint >= self.budget.checkpoint_interval_s:
            self.save_checkpoint()
        return row

    def fit(self, resume: bool = False) -> TrainState:
        """Run until a limit of the budget or early stopping; returns the state. With
        resume=True, continue from out/checkpoint.pt (if there is one)."""
        with flush_denormals(self.budget.flush_denormal):
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainState:
        if resume and self.load_checkpoint():
            print(f"resuming from {self.out / CHECKPOINT} after epoch {self.state.epoch} (step {self.state.step})")
            if self.state.stopped in LIMITS:
                self.state.stopped = ""  # the limits may have been raised: checked again below
        from tqdm.auto import tqdm

        b = self.budget
        bar = tqdm(total=None if b.max_steps or b.epochs is None else b.epochs, initial=self.state.epoch,
                   disable=not self.progress, unit="epoch")
        try:
            while not self.state.stopped:
                self.state.stopped = self._limit()
                if self.state.stopped:
                    break
                row = self._epoch()
                bar.update(1)
                bar.set_postfix({k.removeprefix("val_"): f"{v:.3g}" for k, v in row.items() if "mae" in k})
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.close()
        # never validated (no validation data, or eval_every beyond the run): the final weights;
        # a model file left in the folder by an earlier run must not stand in for them
        if self.state.best_epoch < 0:
            self.save_best_model()
        self.save_checkpoint()
        return self.state
