"""Reptile meta-learning over tasks (Nichol, Achiam & Schulman 2018), a task being one data
set at one level of theory: one fidelity column of the training data.

Each outer step copies the weights θ, takes k optimiser steps on batches of one task
(inner learning rate α, constant or cosine-annealed) to reach φ, and moves the shared weights
θ ← θ + ε(φ − θ), ε decaying linearly. The inner Adam keeps its moment estimates from one
outer step to the next by default (`meta.inner_state`), as the Reptile paper's code does: a
fresh Adam's first steps move every weight by about α whatever its gradient. Heads and
reference energies stay task-specific: a task's head row takes its φ whole, the other rows
are not touched (their gradient is zero in the task's inner loop). The result is an
ordinary multi-head model file, ready for `finetune`.

Resuming is exact: the tasks and batches of outer step s are a function of (seed, s), and a
checkpoint (weights, the kept inner optimiser's state, step, clock, best validation,
history) is written atomically every `training.checkpoint_interval_s`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import error_metrics, public
from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset
from polyfid.errors import DataError
from polyfid.models import (
    atomic_write,
    build_potential,
    checkpoint_error,
    load_model,
    model_dict,
    read_checkpoint,
)
from polyfid.models.potential import Potential
from polyfid.neighbors.checks import check_frames
from polyfid.numerics import flush_denormals, resolve_device, set_threads
from polyfid.train.config import Config, ConfigError, MetaConfig, TrainingConfig, load_config
from polyfid.train.strategies import DTYPES, data_geometry, restrict
from polyfid.train.trainer import (
    BEST_MODEL,
    CHECKPOINT,
    clip_and_check,
    loss_weights,
    require_finite,
    step_loss,
    validation_loss,
)

HEAD_PARAMETERS = ("readout.weight", "readout.bias")  # row h belongs to task h


def reptile_update(
    theta: dict[str, torch.Tensor],
    phis: Sequence[dict[str, torch.Tensor]],
    tasks: Sequence[int],
    epsilon: float,
    head_parameters: Sequence[str] = HEAD_PARAMETERS,
) -> dict[str, torch.Tensor]:
    """The Reptile outer step.

    theta: the weights before the step; phis[i]: the weights after the inner loop on task
    tasks[i], all from theta. Shared weights: θ + ε · mean_i(φ_i − θ). Head parameters
    (first dimension = task): row t becomes the mean of the φ_i of the tasks i = t; rows of
    tasks not adapted keep θ."""
    if len(phis) != len(tasks) or not phis:
        raise ValueError(f"{len(phis)} adapted weight sets for {len(tasks)} tasks")
    out = {}
    for name, t in theta.items():
        if name in head_parameters:
            new = t.clone()
            for h in sorted(set(tasks)):
                rows = [p[name][h] for p, k in zip(phis, tasks) if k == h]
                new[h] = torch.stack(rows).mean(0)
            out[name] = new
        else:
            out[name] = t + epsilon * (torch.stack([p[name] for p in phis]).mean(0) - t)
    return out


@dataclass
class MetaState:
    """Everything besides weights that a resumed meta-training run needs."""

    step: int = 0  # outer steps finished
    elapsed_s: float = 0.0
    best_val: float = math.inf
    best_step: int = -1
    early_bad: int = 0
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


class ReptileTrainer:
    """Meta-trains `model` (one head per task) on `tasks` (task name -> its training frames,
    packed with the model's fidelity columns), validating on `val`; writes into `out`."""

    def __init__(
        self,
        model: Potential,
        tasks: dict[str, PackedData],
        val: PackedData | None,
        tc: TrainingConfig,
        mc: MetaConfig,
        out: str | Path,
        model_config: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.tasks, self.val, self.tc, self.mc = model, tasks, val, tc, mc
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_config, self.metadata, self.progress = model_config, dict(metadata or {}), progress
        unknown = set(mc.task_weights) - set(tasks)
        if unknown:
            raise ConfigError(f"meta.task_weights names tasks {sorted(unknown)}; the tasks are {sorted(tasks)}")
        self.names = list(tasks)
        w = np.array([float(mc.task_weights.get(t, 1.0)) for t in self.names])
        if not w.sum() > 0:
            raise ConfigError("meta.task_weights leaves no task with a positive weight")
        self.p = w / w.sum()
        self.device = resolve_device(tc.device, "training.device")
        self.dtype = next(model.parameters()).dtype
        self.weights = loss_weights(tc, list(model.fidelities), self.dtype, self.device)
        self.state = MetaState()
        self._opt: torch.optim.Optimizer | None = None
        self._last_checkpoint = -math.inf

    # ---- schedule -----------------------------------------------------------------------
    def fraction(self) -> float:
        """Fraction of the budget used: wall-clock if max_time_s is set, else outer steps."""
        if self.tc.max_time_s:
            return min(self.state.elapsed_s / self.tc.max_time_s, 1.0)
        return min(self.state.step / self.mc.outer_steps, 1.0)

    def epsilon(self) -> float:
        f = self.fraction()
        return self.mc.outer_lr + (self.mc.outer_lr_final - self.mc.outer_lr) * f

    def inner_lr(self) -> float:
        """α now: inner_lr, or cosine from inner_lr to inner_lr_final over the budget."""
        a0, a1 = self.mc.inner_lr, self.mc.inner_lr_final
        if a1 is None:
            return a0
        return a1 + (a0 - a1) * 0.5 * (1 + math.cos(math.pi * self.fraction()))

    # ---- one outer step -----------------------------------------------------------------
    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The inner optimiser at the current α: the kept one, or a fresh one."""
        if self._opt is None or self.mc.inner_state == "reset":
            if self.mc.inner_optimizer == "sgd":
                self._opt = torch.optim.SGD(params)
            else:
                self._opt = torch.optim.Adam(params, betas=tuple(self.mc.inner_betas))
        lr = self.inner_lr()
        for g in self._opt.param_groups:
            g["lr"] = lr
        return self._opt

    def adapt(self, task: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """φ: the weights after `inner_steps` optimiser steps on task `task` from the
        model's current weights (which it leaves changed)."""
        data = self.tasks[task]
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = self._optimizer(params)
        bs = min(self.tc.batch_size, data.n_frames)
        forces = self.tc.force_weight > 0 and bool(data.forces_mask.any())
        stress = self.tc.stress_weight > 0 and bool(data.stress_mask.any())
        self.model.train()
        for _ in range(self.mc.inner_steps):
            idx = np.sort(rng.choice(data.n_frames, size=bs, replace=False))
            batch = data.batch(idx).to(self.device)
            loss, *_ = step_loss(self.model, batch, self.weights, forces, stress, self.tc.loss, self.tc.huber_delta,
                                 self.tc.loss_balance)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # the outer step's number: a diverged inner loop stops the run before θ takes it in
            clip_and_check(loss, params, self.tc.grad_clip, self.state.step, [data.sources[int(b)] for b in idx],
                           opt.param_groups[0]["lr"], self.out / CHECKPOINT)
            opt.step()
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def outer_step(self) -> list[str]:
        """One Reptile step; returns the tasks it adapted to."""
        rng = np.random.default_rng([self.tc.seed, self.state.step])
        chosen = [self.names[i] for i in rng.choice(len(self.names), size=self.mc.tasks_per_step, p=self.p)]
        theta = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        phis = []
        for t in chosen:
            phis.append(self.adapt(t, rng))
            self._load(theta)
        heads = [self.model.fidelities.index(t) for t in chosen]
        self._load(reptile_update(theta, phis, heads, self.epsilon()))
        return chosen

    @torch.no_grad()
    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        for k, p in self.model.named_parameters():
            p.copy_(weights[k])

    # ---- validation, checkpoints --------------------------------------------------------
    def validate(self) -> dict[str, float]:
        if self.val is None:
            return {}
        self.model.eval()
        m = error_metrics(self.model, self.val, batch_size=max(self.tc.batch_size, 64), device=self.device)
        out = {f"val_{f}_{k}": v for f in self.val.fidelities for k, v in m.get(f, {}).items()}
        out["val_loss"] = validation_loss(m, self.tc, self.val.fidelities)
        return out

    def save_checkpoint(self) -> None:
        d = {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
             "state": asdict(self.state)}
        require_finite(d, str(self.out / CHECKPOINT), self.state.step)
        if self._opt is not None and self.mc.inner_state == "keep":
            d["optimizer"] = self._opt.state_dict()
        atomic_write(d, self.out / CHECKPOINT, durable=False)
        self._write_history()
        self._last_checkpoint = time.perf_counter()

    def load_checkpoint(self) -> bool:
        path = self.out / CHECKPOINT
        ck = read_checkpoint(path, self.device)  # ModelFileError for a damaged one: never silently start over
        if ck is None:
            return False
        try:
            self.model.load_state_dict(ck["model"])
            self.state = MetaState(**ck["state"])
            if "optimizer" in ck and self.mc.inner_state == "keep":
                params = [p for p in self.model.parameters() if p.requires_grad]
                self._optimizer(params).load_state_dict(ck["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            detail = " ".join(str(e).split())[:400]
            raise checkpoint_error(path, f"checkpoint {path} does not fit this run (written with other options, or "
                                         f"damaged): {type(e).__name__}: {detail}") from None
        return True

    def save_best_model(self) -> None:
        d = model_dict(self.model, self.model_config, self.metadata | {"outer_step": self.state.step})
        require_finite(d, str(self.out / BEST_MODEL), self.state.step)
        atomic_write(d, self.out / BEST_MODEL)

    def _write_history(self) -> None:
        (self.out / "metrics.json").write_text(json.dumps(self.state.history, indent=1))

    # ---- main loop ----------------------------------------------------------------------
    def _evaluate(self, row: dict[str, float]) -> None:
        val = self.validate()
        row |= val
        s = self.state
        if not val:
            return
        if val["val_loss"] < s.best_val * (1 - 1e-6):
            s.best_val, s.best_step, s.early_bad = val["val_loss"], s.step, 0
            self.save_best_model()
        else:
            s.early_bad += 1
            if self.tc.early_stopping_patience is not None and s.early_bad >= self.tc.early_stopping_patience:
                s.stopped = "early stopping"

    def fit(self, resume: bool = False) -> MetaState:
        """Meta-train until outer_steps, the time budget or early stopping (subnormal floats
        flushed to zero where training.flush_denormal says so)."""
        with flush_denormals(self.tc.flush_denormal):
            return self._fit(resume)

    def _fit(self, resume: bool) -> MetaState:
        if resume and self.load_checkpoint():
            print(f"resuming from {self.out / CHECKPOINT} after outer step {self.state.step}")
            if self.state.stopped in ("step limit", "time budget"):
                self.state.stopped = ""
        from tqdm.auto import tqdm

        s, mc = self.state, self.mc
        bar = tqdm(total=mc.outer_steps, initial=s.step, disable=not self.progress, unit="step")
        counts: dict[str, int] = {}
        t_mark, e_mark = time.perf_counter(), s.elapsed_s
        try:
            while not s.stopped:
                if s.step >= mc.outer_steps:
                    s.stopped = "step limit"
                    break
                if self.tc.max_time_s and s.elapsed_s >= self.tc.max_time_s:
                    s.stopped = "time budget"
                    break
                eps = self.epsilon()
                for t in self.outer_step():
                    counts[t] = counts.get(t, 0) + 1
                s.step += 1
                s.elapsed_s = e_mark + (time.perf_counter() - t_mark)
                if s.step % mc.eval_every == 0 or s.step == mc.outer_steps:
                    row = {"step": s.step, "epsilon": eps, "inner_lr": self.inner_lr()}
                    row |= {f"n_{t}": n for t, n in counts.items()}
                    self._evaluate(row)  # validation counts towards the clock, as in ordinary training
                    s.elapsed_s = row["elapsed_s"] = e_mark + (time.perf_counter() - t_mark)
                    s.history.append(row)
                    counts = {}
                    if time.perf_counter() - self._last_checkpoint >= self.tc.checkpoint_interval_s:
                        self.save_checkpoint()
                bar.update(1)
        finally:
            bar.close()
        if self.val is None or s.best_step < 0:
            self.save_best_model()
        self.save_checkpoint()
        return s


@dataclass
class MetaResult:
    """The meta-trained model (best validation), its file and the final state."""

    model: Potential
    path: Path
    state: MetaState
    tasks: dict[str, int]


def meta_train(
    cfg: Config, train_ds: Dataset, val_ds: Dataset | None, out: str | Path, resume: bool = False
) -> MetaResult:
    """Reptile pre-training of a multi-head model on every fidelity (task) of `train_ds`;
    writes out/model.pt."""
    out = Path(out)
    tc, mc = cfg.training, cfg.meta
    names = train_ds.fidelities
    if tc.max_steps:
        raise ConfigError("training.max_steps: meta-training counts outer steps (meta.outer_steps, each of "
                          "meta.inner_steps optimiser steps); leave max_steps unset")
    if len(names) < 2:
        raise DataError(f"meta-training needs at least two tasks (fidelities); the training data have {names}")
    species = sorted(set(train_ds.elements) | (set(val_ds.elements) if val_ds is not None else set()))
    model_cfg = asdict(cfg.model)
    torch.manual_seed(tc.seed)
    model = build_potential(model_cfg, species, names)
    dtype = DTYPES[tc.dtype]
    geometry = data_geometry(cfg)
    all_train = PackedData(train_ds, model.cutoff, names, dtype=dtype, **geometry)
    refs = model.fit_reference_energies(all_train)
    tasks = {t: PackedData(restrict(train_ds, [t]), model.cutoff, names, dtype=dtype, **geometry) for t in names}
    val = (PackedData(val_ds, model.cutoff, names, dtype=dtype, **geometry)
           if val_ds is not None and len(val_ds) else None)
    meta = geometry | {"strategy": "reptile", "tasks": {t: d.n_frames for t, d in tasks.items()},
            "reference_energies_eV": {f: dict(zip(model.species, r)) for f, r in refs.items()},
            "meta": asdict(mc)}
    model = model.to(dtype=dtype, device=resolve_device(tc.device, "training.device"))
    trainer = ReptileTrainer(model, tasks, val, tc, mc, out, model_cfg, meta, progress=cfg.output.progress)
    state = trainer.fit(resume=resume)
    best = load_model(out / BEST_MODEL, dtype=dtype, device=tc.device)
    return MetaResult(best, out / BEST_MODEL, state, meta["tasks"])


def run_meta_training(config: Config | dict | str | Path, resume: bool = False) -> MetaResult:
    """`polyfid meta-train`: data from the configuration (each fidelity a task), Reptile,
    validation and test errors per task in out/results.json."""
    from polyfid.train.run import _metrics, build_datasets

    cfg = config if isinstance(config, Config) else load_config(config)
    resolve_device(cfg.training.device, "training.device")  # before the data are read
    set_threads(cfg.training.num_threads)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    train_ds, val_ds, test_ds = build_datasets(cfg.data)
    check_frames(test_ds, **data_geometry(cfg), name=test_ds.name)
    res = meta_train(cfg, train_ds, val_ds, out, resume=resume)
    dtype, dev = DTYPES[cfg.training.dtype], cfg.training.device
    summary = {"strategy": "reptile", "tasks": res.tasks, "outer_steps": res.state.step,
               "train_s": res.state.elapsed_s, "stopped": res.state.stopped, "best_step": res.state.best_step,
               "validation": public(_metrics(res.model, val_ds, dtype, dev)),
               "test": public(_metrics(res.model, test_ds, dtype, dev))}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return res
