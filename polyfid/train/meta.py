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

The run (budget, checkpoints, validation, best model, early stopping, metrics.csv) is the
run loop's (`polyfid.train.loop`); a step of it is one outer step, an epoch `meta.eval_every`
of them. Resuming is exact: the tasks and batches of outer step s are a function of (seed, s),
and a checkpoint holds the weights and the kept inner optimiser's state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import error_metrics, public
from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset
from polyfid.errors import DataError
from polyfid.models import build_potential, load_model, model_dict
from polyfid.models.potential import Potential
from polyfid.neighbors.checks import check_frames
from polyfid.numerics import resolve_device, set_threads
from polyfid.train.config import Config, ConfigError, MetaConfig, TrainingConfig, load_config
from polyfid.train.loop import BEST_MODEL, CHECKPOINT, Budget, RunLoop, TrainState
from polyfid.train.stage import DTYPES, data_geometry
from polyfid.train.trainer import clip_and_check, loss_weights, step_loss, validation_loss

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


def reptile_budget(tc: TrainingConfig, mc: MetaConfig) -> Budget:
    """The run loop's budget of meta-training: meta.outer_steps steps (or training.max_time_s
    seconds, which the schedules then count), an epoch being meta.eval_every outer steps with
    a validation at its end."""
    return Budget(epochs=None, max_steps=mc.outer_steps, max_time_s=tc.max_time_s,
                  schedule_by="time" if tc.max_time_s else "steps", eval_every=1,
                  early_stopping_patience=tc.early_stopping_patience,
                  checkpoint_interval_s=tc.checkpoint_interval_s, flush_denormal=tc.flush_denormal)


class ReptileTrainer(RunLoop):
    """Meta-trains `model` (one head per task; built by `build_potential`, whose options go
    into the model file) on `tasks` (task name -> its training frames, packed with the model's
    fidelity columns), validating on `val`; writes into `out`. A step of the run loop is one
    outer step."""

    def __init__(
        self,
        model: Potential,
        tasks: dict[str, PackedData],
        val: PackedData | None,
        tc: TrainingConfig,
        mc: MetaConfig,
        out: str | Path,
        metadata: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(model, reptile_budget(tc, mc), out, progress)
        self.tasks, self.val, self.tc, self.mc = tasks, val, tc, mc
        self.model_config, self.metadata = dict(model.model_config), dict(metadata or {})
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
        self._opt: torch.optim.Optimizer | None = None
        self._counts: dict[str, int] = {}
        self._epsilon = self.epsilon()

    # ---- schedule -----------------------------------------------------------------------
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

    # ---- the run loop's hooks -------------------------------------------------------------
    def begin_epoch(self) -> int:
        self._counts = {}
        return self.mc.eval_every

    def train_step(self, k: int, frac: float) -> None:
        self._epsilon = self.epsilon()
        for t in self.outer_step():
            self._counts[t] = self._counts.get(t, 0) + 1

    def end_epoch(self, done: int) -> dict[str, float]:
        return {"epsilon": self._epsilon, "train_steps": done} | {f"n_{t}": n for t, n in self._counts.items()}

    def current_lr(self) -> float:
        return self.inner_lr()

    def validate(self) -> dict[str, float]:
        if self.val is None:
            return {}
        self.model.eval()
        m = error_metrics(self.model, self.val, batch_size=max(self.tc.batch_size, 64), device=self.device)
        out = {f"val_{f}_{k}": v for f in self.val.fidelities for k, v in m.get(f, {}).items()}
        out["val_loss"] = validation_loss(m, self.tc, self.val.fidelities)
        return out

    def payload(self) -> dict[str, Any]:
        d = {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
        if self._opt is not None and self.mc.inner_state == "keep":
            d["optimizer"] = self._opt.state_dict()
        return d

    def load_payload(self, d: dict[str, Any]) -> None:
        self.model.load_state_dict(d["model"])
        if "optimizer" in d and self.mc.inner_state == "keep":
            self._optimizer([p for p in self.model.parameters() if p.requires_grad]).load_state_dict(d["optimizer"])

    def best_model(self) -> dict[str, Any]:
        return model_dict(self.model, self.model_config, self.metadata | {"outer_step": self.state.step})


@dataclass
class MetaResult:
    """The meta-trained model (best validation), its file and the final state."""

    model: Potential
    path: Path
    state: TrainState
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
    tasks = {t: PackedData(train_ds.restrict([t]), model.cutoff, names, dtype=dtype, **geometry) for t in names}
    val = (PackedData(val_ds, model.cutoff, names, dtype=dtype, **geometry)
           if val_ds is not None and len(val_ds) else None)
    meta = geometry | {"strategy": "reptile", "tasks": {t: d.n_frames for t, d in tasks.items()},
            "reference_energies_eV": {f: dict(zip(model.species, r)) for f, r in refs.items()},
            "meta": asdict(mc)}
    model = model.to(dtype=dtype, device=resolve_device(tc.device, "training.device"))
    trainer = ReptileTrainer(model, tasks, val, tc, mc, out, meta, progress=cfg.output.progress)
    state = trainer.fit(resume=resume)
    best = load_model(out / BEST_MODEL, dtype=dtype, device=tc.device)
    return MetaResult(best, out / BEST_MODEL, state, meta["tasks"])


def run_meta_training(config: Config | dict | str | Path, resume: bool = False) -> MetaResult:
    """`polyfid meta-train`: data from the configuration (each fidelity a task), Reptile,
    validation and test errors per task in out/results.json."""
    from polyfid.train.run import build_datasets, metrics_of

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
               "validation": public(metrics_of(res.model, val_ds, dtype, dev)),
               "test": public(metrics_of(res.model, test_ds, dtype, dev))}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return res
