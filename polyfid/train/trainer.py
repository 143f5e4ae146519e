"""The training loop: Adam, schedules (plateau; cosine over epochs, optimiser steps or a wall-clock budget),
early stopping, gradient clipping, EMA, CSV and TensorBoard logs, atomic checkpoints.

Resuming is exact: the batch order of epoch e is a function of (seed, e) only, and each
epoch's end (or, with checkpoint_interval_s, the first epoch end after that many seconds)
writes weights, optimiser, EMA and schedule state atomically. A run killed at any moment
restarts from the last checkpoint and redoes the same steps.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import error_metrics
from polyfid.data.batch import PackedData
from polyfid.errors import ConfigError, TrainingDiverged
from polyfid.models import atomic_write, checkpoint_error, model_dict, nonfinite_weights, read_checkpoint
from polyfid.models.potential import Potential
from polyfid.numerics import flush_denormals, resolve_device
from polyfid.train.config import TrainingConfig
from polyfid.train.ema import EMA
from polyfid.train.losses import loss_terms, total_loss

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"


def cosine_lr(lr: float, min_lr: float, frac: float) -> float:
    """Cosine decay from lr to min_lr as the used fraction of the budget goes from 0 to 1."""
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken
    elapsed_s: float = 0.0  # wall-clock seconds of training so far (budget clock)
    lr: float = 0.0
    best_val: float = math.inf
    best_epoch: int = -1
    plateau_bad: int = 0
    early_bad: int = 0
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    # steps taken in the final (energy-weight) phase after a step before it; -1: no step before it yet
    final_steps: int = -1


def batch_order(n: int, seed: int, epoch: int, weights: np.ndarray | None = None,
                size: int | None = None) -> np.ndarray:
    """Frame order of one epoch: a function of (seed, epoch) only, so resuming repeats it.

    With `weights` (n,), `size` (default n) frames are drawn with replacement in proportion to
    them (the sampling ratio between data sets); without, a permutation of the n frames."""
    rng = np.random.default_rng([seed, epoch])
    if weights is None:
        return rng.permutation(n)
    return rng.choice(n, size=size or n, replace=True, p=weights / weights.sum())


#: frames of a diverged batch named in the message
LISTED_FRAMES = 5


def clip_and_check(
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    grad_clip: float | None,
    step: int,
    frames: list[str],
    lr: float,
    checkpoint: Path | None = None,
) -> None:
    """After ``loss.backward()``: clip the gradient norm to `grad_clip` (None/0: no clipping)
    and raise TrainingDiverged if the loss or the gradient is not finite, before
    ``optimizer.step`` could spread it into the weights. The message names the 0-based optimiser
    `step`, the batch's `frames` (sources; the first few), the learning rate and the options to
    change. One device sync, which the loss logging after the step costs anyway."""
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # the norm before clipping
    elif grads := [p.grad for p in params if p.grad is not None]:
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = loss.new_zeros(())
    if bool(torch.isfinite(loss.detach() + norm.to(loss.dtype))):
        return
    listed = ", ".join(frames[:LISTED_FRAMES]) + (f" and {len(frames) - LISTED_FRAMES} more"
                                                   if len(frames) > LISTED_FRAMES else "")
    finite_loss = bool(torch.isfinite(loss.detach()))
    what = f"the gradient norm is {float(norm)}" if finite_loss else f"the loss is {float(loss.detach())}"
    kept = (f"; the last finite checkpoint, {checkpoint}, is kept (continue with --resume after changing options)"
            if checkpoint is not None and checkpoint.exists() else "")
    raise TrainingDiverged(
        f"training diverged at step {step}: {what}, on a batch of frames {listed}{kept}. Lower training.lr "
        f"(now {lr:g}), set or lower training.grad_clip (now {grad_clip}), or look at these frames for atoms "
        "too close together (raise data.min_distance) or wrong labels")


def require_finite(d: dict[str, Any], what: str, step: int) -> None:
    """Raise TrainingDiverged, naming the step and the options, if the model description or
    checkpoint `d` holds non-finite weights (`polyfid.models.nonfinite_weights`, which
    atomic_write also refuses, with a ModelFileError that knows nothing of training)."""
    bad = nonfinite_weights(d)
    if bad:
        raise TrainingDiverged(f"training diverged by step {step}: {what} would hold non-finite weights "
                               f"({', '.join(bad[:6])}); it is not written. Lower training.lr or set "
                               "training.grad_clip")


#: steps at the start of the final phase whose squared gradients floor Adam's second moments
FLOOR_STEPS = 10


def loss_weights(
    cfg: TrainingConfig, fidelities: list[str], dtype: torch.dtype, device: torch.device | str, final: bool = False
) -> dict[str, torch.Tensor]:
    """Loss weight of each term (energy, forces, stress) per fidelity column; `final`: the
    energy weight of the last part of training."""
    base = {"energy": cfg.final_energy_weight if final else cfg.energy_weight,
            "forces": cfg.force_weight, "stress": cfg.stress_weight}
    out = {}
    for key, w in base.items():
        per = [w * float(cfg.fidelity_weights.get(f, {}).get(key, 1.0)) for f in fidelities]
        out[key] = torch.tensor(per, dtype=torch.float64 if key == "energy" else dtype, device=device)
    return out


def step_loss(
    model: Potential, batch, weights: dict[str, torch.Tensor], forces: bool, stress: bool,
    loss: str = "mse", huber_delta: float = 0.01, balance: str = "none",
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int], list[int] | None]:
    """The training loss of one batch (with the graph for backward), its terms per fidelity,
    the columns with labels and the columns whose derivatives were taken (None: none).
    `loss`, `huber_delta`: the per-entry loss (losses.pointwise); `balance`: how the terms add
    up (losses.total_loss)."""
    # columns with labels in this batch; derivatives only where forces/stress are labelled
    labelled = batch.energy_mask.any(0) | batch.forces_mask.any(0) | batch.stress_mask.any(0)
    heads = labelled.nonzero().flatten().tolist()
    dheads = (batch.forces_mask.any(0) | batch.stress_mask.any(0)).nonzero().flatten().tolist()
    deriv = bool(dheads) and (forces or stress)
    pred = model(batch, forces=forces and deriv, stress=stress and deriv, create_graph=True,
                 heads=dheads if deriv else None, energy_heads=heads)
    d = dheads if deriv else None
    terms = loss_terms(pred, batch, heads, d, loss, huber_delta)
    return total_loss(terms, weights, heads, d, balance), terms, heads, d


def validation_loss(metrics: dict[str, Any], cfg: TrainingConfig, fidelities: list[str]) -> float:
    """The validation loss: the training weights on squared RMSEs (energy per atom, force
    components), summed over fidelities."""
    loss = 0.0
    for fid in fidelities:
        mf = metrics.get(fid, {})
        fw = cfg.fidelity_weights.get(fid, {})
        if "energy_rmse_meV_per_atom" in mf:
            loss += cfg.energy_weight * fw.get("energy", 1.0) * (mf["energy_rmse_meV_per_atom"] * 1e-3) ** 2
        if "force_rmse_meV_A" in mf and cfg.force_weight > 0:
            loss += cfg.force_weight * fw.get("forces", 1.0) * (mf["force_rmse_meV_A"] * 1e-3) ** 2
    return loss


class Trainer:
    """Trains `model` on `train`, validating on `val`; writes into `out`.

    model_config and metadata go into the model file written for the best validation loss.
    frame_weights (n_train,): sampling weights of the training frames (None: uniform);
    regularizer: a function of no arguments returning a scalar added to every step's loss.
    """

    def __init__(
        self,
        model: Potential,
        train: PackedData,
        val: PackedData | None,
        cfg: TrainingConfig,
        out: str | Path,
        model_config: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        progress: bool = True,
        tensorboard: bool = False,
        frame_weights: np.ndarray | None = None,
        regularizer: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.train, self.val, self.cfg = model, train, val, cfg
        self.frame_weights, self.regularizer = frame_weights, regularizer
        if frame_weights is not None and len(frame_weights) != train.n_frames:
            raise ValueError(f"{len(frame_weights)} sampling weights for {train.n_frames} training frames")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_config, self.metadata = model_config, dict(metadata or {})
        self.progress, self.tensorboard = progress, tensorboard
        self.device = resolve_device(cfg.device, "training.device")
        self.dtype = next(model.parameters()).dtype
        params = self._params = [p for p in model.parameters() if p.requires_grad]
        try:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError):  # fused kernels missing for this device/dtype
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
        self.state = TrainState(lr=cfg.lr)
        self._writer = None
        self._last_checkpoint = -float("inf")
        self._weight_cache: dict[bool, dict[str, torch.Tensor]] = {}

    # ---- schedule ---------------------------------------------------------------------
    def progress_fraction(self, step_in_epoch: int, steps_per_epoch: int) -> float:
        """Fraction of the budget used: optimiser steps if max_steps is set, else wall-clock if
        max_time_s is set, else epochs."""
        if self.cfg.max_steps:
            return min(self.state.step / self.cfg.max_steps, 1.0)
        if self.cfg.max_time_s:
            return min(self.state.elapsed_s / self.cfg.max_time_s, 1.0)
        return min((self.state.epoch + step_in_epoch / steps_per_epoch) / self.cfg.epochs, 1.0)

    def _lr(self, frac: float) -> float:
        c = self.cfg
        if c.scheduler == "cosine":
            return cosine_lr(c.lr, c.min_lr, frac)
        return self.state.lr

    def _final(self, frac: float) -> bool:
        c = self.cfg
        return c.final_energy_weight is not None and frac >= 1.0 - c.final_fraction

    def _weights(self, frac: float) -> dict[str, torch.Tensor]:
        """Loss weights per term, one per fidelity column of the training data; built once
        per phase (before / during the final energy weighting), not every step."""
        final = self._final(frac)
        cached = self._weight_cache.get(final)
        if cached is None:
            cached = loss_weights(self.cfg, self.train.fidelities, self.dtype, self.device, final)
            self._weight_cache[final] = cached
        return cached

    def _second_moment_floor(self, final: bool) -> None:
        """Over the first FLOOR_STEPS steps of the final phase, raise Adam's second-moment
        estimates to at least this step's squared gradients.

        The final energy weight (e.g. 1000x) multiplies the energy gradients at once, while
        Adam's second moments follow with a time constant of 1/(1 − β2) = 1000 steps: steps of
        several times the learning rate for hundreds of steps, which threw the force loss of
        rMD17 aspirin up 5x at the switch (HIP-NN and HIP-HOP-NN alike) and cost much of the
        final phase to recover. The floor gives the new loss's gradients their own scale at once.
        A run that starts in the final phase (final_fraction 1) has no switch and no floor. The
        count is in the checkpoint, so a run resumed at or just after the switch floors the same
        steps as one that was not interrupted."""
        s = self.state
        if not final:
            s.final_steps = 0
            return
        if not 0 <= s.final_steps < FLOOR_STEPS:
            return
        s.final_steps += 1
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    st = self.optimizer.state.get(p)
                    if p.grad is not None and st and "exp_avg_sq" in st:
                        torch.maximum(st["exp_avg_sq"], p.grad.square(), out=st["exp_avg_sq"])

    # ---- one epoch --------------------------------------------------------------------
    def _needs(self) -> tuple[bool, bool]:
        forces = self.cfg.force_weight > 0 and bool(self.train.forces_mask.any())
        stress = self.cfg.stress_weight > 0 and bool(self.train.stress_mask.any())
        return forces, stress

    def train_epoch(self, t_start: float, elapsed_start: float) -> dict[str, float]:
        """One pass over the training frames; returns mean loss terms."""
        self.model.train()
        order = batch_order(self.train.n_frames, self.cfg.seed, self.state.epoch, self.frame_weights,
                            self.cfg.epoch_frames)
        bs = self.cfg.batch_size
        n_steps = math.ceil(len(order) / bs)
        forces, stress = self._needs()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        n_done = 0
        for k in range(n_steps):
            self.state.elapsed_s = elapsed_start + (time.perf_counter() - t_start)
            if self.cfg.max_time_s and self.state.elapsed_s >= self.cfg.max_time_s:
                break
            if self.cfg.max_steps and self.state.step >= self.cfg.max_steps:
                break
            frac = self.progress_fraction(k, n_steps)
            lr = self._lr(frac)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            idx = order[k * bs : (k + 1) * bs]
            batch = self.train.batch(idx).to(self.device)
            loss, terms, heads, dheads = step_loss(
                self.model, batch, self._weights(frac), forces, stress, self.cfg.loss, self.cfg.huber_delta,
                self.cfg.loss_balance)
            if self.regularizer is not None:
                loss = loss + self.regularizer()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_check(loss, self._params, self.cfg.grad_clip, self.state.step,
                           [self.train.sources[int(b)] for b in idx], lr, self.out / CHECKPOINT)
            self._second_moment_floor(self._final(frac))
            self.optimizer.step()
            self.state.step += 1
            if self.ema is not None:
                self.ema.update()
            fids = self.train.fidelities
            for key, v in terms.items():
                v = v.detach()
                sums[key] = sums.get(key, 0.0) + float(v.sum())
                if len(fids) > 1:  # each level's own term too
                    cols = heads if key == "energy" else dheads
                    for c, x in zip(cols, v.tolist()):
                        sums[f"{key}_{fids[c]}"] = sums.get(f"{key}_{fids[c]}", 0.0) + x
                        counts[f"{key}_{fids[c]}"] = counts.get(f"{key}_{fids[c]}", 0) + 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            n_done += 1
        self.state.elapsed_s = elapsed_start + (time.perf_counter() - t_start)
        # a level's own terms are averaged over the steps whose batches had its labels
        return {f"train_{k}": v / max(counts.get(k, n_done), 1) for k, v in sums.items()} | {"train_steps": n_done}

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Validation loss (base weights) and errors per fidelity, with EMA weights."""
        if self.val is None:
            return {}
        self.model.eval()
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            m = error_metrics(self.model, self.val, batch_size=max(self.cfg.batch_size, 64), device=self.device)
        out: dict[str, float] = {}
        for fid in self.val.fidelities:
            for key, v in m.get(fid, {}).items():
                out[f"val_{fid}_{key}"] = v
        out["val_loss"] = validation_loss(m, self.cfg, self.val.fidelities)
        return out

    # ---- checkpoints ------------------------------------------------------------------
    def checkpoint_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            # what the weights mean: a resumed run must have the same (checked in load_checkpoint)
            "species": list(getattr(self.model, "species", [])),
            "fidelities": list(getattr(self.model, "fidelities", [])),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "state": {
                "epoch": s.epoch,
                "step": s.step,
                "final_steps": s.final_steps,
                "elapsed_s": s.elapsed_s,
                "lr": s.lr,
                "best_val": s.best_val,
                "best_epoch": s.best_epoch,
                "plateau_bad": s.plateau_bad,
                "early_bad": s.early_bad,
                "stopped": s.stopped,
                "history": s.history,
            },
        }

    def save_checkpoint(self) -> None:
        self._flush_logs()
        d = self.checkpoint_dict()
        require_finite(d, str(self.out / CHECKPOINT), self.state.step)
        atomic_write(d, self.out / CHECKPOINT, durable=False)
        self._last_checkpoint = time.perf_counter()

    def load_checkpoint(self) -> bool:
        """Restore from out/checkpoint.pt if present; returns whether it was."""
        path = self.out / CHECKPOINT
        ck = read_checkpoint(path, self.device)  # ModelFileError for a damaged one: never silently start over
        if ck is None:
            return False
        for key in ("species", "fidelities"):  # absent from checkpoints of earlier versions
            have = list(getattr(self.model, key, []))
            if key in ck and list(ck[key]) != have:
                raise ConfigError(
                    f"--resume: {path} was written for {key} {list(ck[key])}, and this run's data give {have}: its "
                    f"weights would stand for other {'elements' if key == 'species' else 'levels'}. Resume with the "
                    "configuration that wrote it, or train into another output.dir")
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            if self.ema is not None and ck["ema"] is not None:
                self.ema.load_state_dict(ck["ema"])
            st = ck["state"]
            # checkpoints written before step budgets lack step and final_steps: the defaults
            self.state = TrainState(**{k: st[k] for k in TrainState.__dataclass_fields__ if k in st})
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            detail = " ".join(str(e).split())[:400]
            raise checkpoint_error(path, f"checkpoint {path} does not fit this run (written with other options, or "
                                         f"damaged): {type(e).__name__}: {detail}") from None
        return True

    def save_best_model(self) -> None:
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            d = model_dict(self.model, self.model_config, self.metadata | {"epoch": self.state.epoch})
        require_finite(d, str(self.out / BEST_MODEL), self.state.step)
        atomic_write(d, self.out / BEST_MODEL)

    # ---- logs -------------------------------------------------------------------------
    def _log(self, row: dict[str, float]) -> None:
        self.state.history.append(row)
        if self.tensorboard:
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
        tmp = self.out / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.state.history)
        tmp.replace(self.out / "metrics.csv")
        if self._writer is not None:
            self._writer.flush()

    # ---- main loop --------------------------------------------------------------------
    def _after_validation(self, val: dict[str, float]) -> None:
        s, c = self.state, self.cfg
        if not val:
            return
        if val["val_loss"] < s.best_val * (1 - 1e-6):
            s.best_val, s.best_epoch, s.plateau_bad, s.early_bad = val["val_loss"], s.epoch, 0, 0
            self.save_best_model()
            return
        s.plateau_bad += 1
        s.early_bad += 1
        if c.scheduler == "plateau" and s.plateau_bad >= c.plateau_patience:
            s.lr = max(s.lr * c.plateau_factor, c.min_lr)
            s.plateau_bad = 0
        if c.early_stopping_patience is not None and s.early_bad >= c.early_stopping_patience:
            s.stopped = "early stopping"

    def fit(self, resume: bool = False) -> TrainState:
        """Train until the epoch limit, the step limit, the time budget or early stopping; returns the state.

        With resume=True, continue from out/checkpoint.pt (if there is one). Subnormal floats
        are flushed to zero meanwhile where cfg.flush_denormal says so (polyfid.numerics)."""
        with flush_denormals(self.cfg.flush_denormal):
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainState:
        if resume and self.load_checkpoint():
            print(f"resuming from {self.out / CHECKPOINT} after epoch {self.state.epoch}")
            if self.state.stopped in ("epoch limit", "step limit", "time budget"):
                self.state.stopped = ""  # the limits may have been raised: re-checked below
        from tqdm.auto import tqdm

        bar = tqdm(total=None if self.cfg.max_steps else self.cfg.epochs, initial=self.state.epoch,
                   disable=not self.progress, unit="epoch")
        try:
            while not self.state.stopped:
                if not self.cfg.max_steps and self.state.epoch >= self.cfg.epochs:  # max_steps replaces it
                    self.state.stopped = "epoch limit"
                    break
                if self.cfg.max_time_s and self.state.elapsed_s >= self.cfg.max_time_s:
                    self.state.stopped = "time budget"
                    break
                if self.cfg.max_steps and self.state.step >= self.cfg.max_steps:
                    self.state.stopped = "step limit"
                    break
                t0, e0 = time.perf_counter(), self.state.elapsed_s
                row: dict[str, float] = {"epoch": self.state.epoch + 1}
                row |= self.train_epoch(t0, e0)
                row["lr"] = self.optimizer.param_groups[0]["lr"]
                self.state.epoch += 1
                last = (self.state.step == self.cfg.max_steps if self.cfg.max_steps
                        else self.state.epoch == self.cfg.epochs)
                if self.state.epoch % self.cfg.eval_every == 0 or last:
                    val = self.validate()
                    row |= val
                    self._after_validation(val)
                self.state.elapsed_s = e0 + (time.perf_counter() - t0)
                row["elapsed_s"] = self.state.elapsed_s
                self._log(row)
                if time.perf_counter() - self._last_checkpoint >= self.cfg.checkpoint_interval_s:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix({k.removeprefix("val_"): f"{v:.3g}" for k, v in row.items() if "mae" in k})
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.close()
        # never validated (no validation set, or eval_every beyond the run): the final weights;
        # a model.pt left in the folder by an earlier run must not stand in for them
        if self.val is None or self.state.best_epoch < 0:
            self.save_best_model()
        self.save_checkpoint()
        return self.state


