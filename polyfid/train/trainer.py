"""The supervised step of the run loop: Adam on energies, forces and stress at every fidelity,
schedules (plateau; cosine over epochs, optimiser steps or a wall-clock budget), the final
energy weight, gradient clipping and divergence checks, EMA. The run itself (budgets,
checkpoints, resume, validation, best model, early stopping, logs) is `polyfid.train.loop`.

Resuming is exact: the batch order of epoch e is a function of (seed, e) only, and a
checkpoint holds weights, optimiser, EMA and schedule state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import error_metrics
from polyfid.data.batch import PackedData
from polyfid.errors import TrainingDiverged
from polyfid.models import model_dict
from polyfid.models.potential import Potential
from polyfid.numerics import resolve_device
from polyfid.train.config import TrainingConfig
from polyfid.train.ema import EMA
from polyfid.train.loop import CHECKPOINT, Budget, RunLoop, batch_order, cosine_lr
from polyfid.train.losses import loss_terms, total_loss

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



def training_budget(cfg: TrainingConfig) -> Budget:
    """The run loop's budget of a training section: the schedule counts optimiser steps when
    max_steps is set, else wall-clock seconds when max_time_s is set, else epochs."""
    by = "steps" if cfg.max_steps else "time" if cfg.max_time_s else "epochs"
    return Budget(epochs=cfg.epochs, max_steps=cfg.max_steps, max_time_s=cfg.max_time_s, schedule_by=by,
                  eval_every=cfg.eval_every, early_stopping_patience=cfg.early_stopping_patience,
                  checkpoint_interval_s=cfg.checkpoint_interval_s, flush_denormal=cfg.flush_denormal)


@dataclass
class StepOptions:
    """What a stage adds to the supervised step.

    frame_weights (n_train,): sampling weights of the training frames (None: uniform);
    regularizer: a function of no arguments returning a scalar added to every step's loss;
    progress, tensorboard: a progress bar, TensorBoard event files."""

    frame_weights: np.ndarray | None = None
    regularizer: Callable[[], torch.Tensor] | None = None
    progress: bool = True
    tensorboard: bool = False


class TermSums:
    """An epoch's training terms: each term summed over steps, and each level's own term over
    the steps whose batches had its labels."""

    def __init__(self, fidelities: list[str]) -> None:
        self.fids = fidelities
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], heads: list[int],
            dheads: list[int] | None) -> None:
        for key, v in terms.items():
            v = v.detach()
            self.sums[key] = self.sums.get(key, 0.0) + float(v.sum())
            if len(self.fids) > 1:  # each level's own term too
                for c, x in zip(heads if key == "energy" else dheads, v.tolist()):
                    name = f"{key}_{self.fids[c]}"
                    self.sums[name] = self.sums.get(name, 0.0) + x
                    self.counts[name] = self.counts.get(name, 0) + 1
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(loss.detach())

    def means(self, steps: int) -> dict[str, float]:
        return {f"train_{k}": v / max(self.counts.get(k, steps), 1) for k, v in self.sums.items()}


class Trainer(RunLoop):
    """Trains `model` on `train`, validating on `val`, as `cfg` says; writes into `out`.

    model_config and metadata go into the model file written for the best validation loss."""

    def __init__(
        self,
        model: Potential,
        train: PackedData,
        val: PackedData | None,
        cfg: TrainingConfig,
        out: str | Path,
        model_config: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        options: StepOptions | None = None,
    ) -> None:
        opts = options or StepOptions()
        super().__init__(model, training_budget(cfg), out, opts.progress, opts.tensorboard)
        self.train, self.val, self.cfg = train, val, cfg
        self.frame_weights, self.regularizer = opts.frame_weights, opts.regularizer
        if self.frame_weights is not None and len(self.frame_weights) != train.n_frames:
            raise ValueError(f"{len(self.frame_weights)} sampling weights for {train.n_frames} training frames")
        self.model_config, self.metadata = model_config, dict(metadata or {})
        self.device = resolve_device(cfg.device, "training.device")
        self.dtype = next(model.parameters()).dtype
        params = self._params = [p for p in model.parameters() if p.requires_grad]
        try:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError):  # fused kernels missing for this device/dtype
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
        self.state.lr = cfg.lr
        self._weight_cache: dict[bool, dict[str, torch.Tensor]] = {}
        self._order = np.zeros(0, dtype=np.int64)
        self._sums = TermSums(train.fidelities)
        self._needs = (cfg.force_weight > 0 and bool(train.forces_mask.any()),
                       cfg.stress_weight > 0 and bool(train.stress_mask.any()))

    # ---- schedule -------------------------------------------------------------------------
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

    # ---- the step -------------------------------------------------------------------------
    def begin_epoch(self) -> int:
        self.model.train()
        self._order = batch_order(self.train.n_frames, self.cfg.seed, self.state.epoch, self.frame_weights,
                                  self.cfg.epoch_frames)
        self._sums = TermSums(self.train.fidelities)
        return -(-len(self._order) // self.cfg.batch_size)

    def train_step(self, k: int, frac: float) -> None:
        lr = self._lr(frac)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        bs = self.cfg.batch_size
        idx = self._order[k * bs : (k + 1) * bs]
        batch = self.train.batch(idx).to(self.device)
        loss, terms, heads, dheads = step_loss(
            self.model, batch, self._weights(frac), *self._needs, self.cfg.loss, self.cfg.huber_delta,
            self.cfg.loss_balance)
        if self.regularizer is not None:
            loss = loss + self.regularizer()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_check(loss, self._params, self.cfg.grad_clip, self.state.step,
                       [self.train.sources[int(b)] for b in idx], lr, self.out / CHECKPOINT)
        self._second_moment_floor(self._final(frac))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self._sums.add(loss, terms, heads, dheads)

    def end_epoch(self, done: int) -> dict[str, float]:
        return self._sums.means(done) | {"train_steps": done}

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def after_validation(self, improved: bool) -> None:
        s, c = self.state, self.cfg
        if not improved and c.scheduler == "plateau" and s.plateau_bad >= c.plateau_patience:
            s.lr = max(s.lr * c.plateau_factor, c.min_lr)
            s.plateau_bad = 0

    def validate(self) -> dict[str, float]:
        """Validation loss (base weights) and errors per fidelity, with EMA weights."""
        if self.val is None:
            return {}
        self.model.eval()
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            m = error_metrics(self.model, self.val, batch_size=max(self.cfg.batch_size, 64), device=self.device)
        out = {f"val_{fid}_{key}": v for fid in self.val.fidelities for key, v in m.get(fid, {}).items()}
        out["val_loss"] = validation_loss(m, self.cfg, self.val.fidelities)
        return out

    # ---- what a checkpoint and the model file hold -----------------------------------------
    def payload(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict() if self.ema else None}

    def load_payload(self, d: dict[str, Any]) -> None:
        self.model.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])
        if self.ema is not None and d["ema"] is not None:
            self.ema.load_state_dict(d["ema"])

    def best_model(self) -> dict[str, Any]:
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            return model_dict(self.model, self.model_config, self.metadata | {"epoch": self.state.epoch})
