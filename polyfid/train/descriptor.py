"""Training of a descriptor network (`polyfid.descriptors.network.DescriptorNetwork`) on the run
loop: Adam on 1·MSE(E/N) + force_weight·MSE(F) (eV, eV/Å) with cosine learning-rate decay over a
wall-clock budget, the benchmarks' recipe for comparing descriptor sets at equal training time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from polyfid.data.batch import PackedData
from polyfid.descriptors.network import DescriptorNetwork
from polyfid.train.loop import Budget, RunLoop, batch_order, cosine_lr


@dataclass
class DescriptorTraining:
    """budget_s: wall-clock seconds (an equal-time comparison); fidelity: the label column."""

    budget_s: float
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-5
    force_weight: float = 100.0
    seed: int = 0
    fidelity: int = 0


@dataclass
class FitResult:
    train_s: float
    epochs: int
    steps: int
    frames: int


class DescriptorTrainer(RunLoop):
    """The run loop with a descriptor network's step; writes nothing (no run folder)."""

    def __init__(self, model: DescriptorNetwork, train: PackedData, settings: DescriptorTraining) -> None:
        budget = Budget(max_time_s=settings.budget_s, schedule_by="time", checkpoint_interval_s=float("inf"))
        super().__init__(model, budget, None, progress=False)
        self.train, self.s = train, settings
        self.optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
        self.frames = 0
        self._order = np.zeros(0, dtype=np.int64)  # drawn by begin_epoch

    def begin_epoch(self) -> int:
        self._order = batch_order(self.train.n_frames, self.s.seed, self.state.epoch)
        return -(-len(self._order) // self.s.batch_size)

    def train_step(self, k: int, frac: float) -> None:
        s = self.s
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(s.lr, s.min_lr, frac)
        b = self.train.batch(self._order[k * s.batch_size:(k + 1) * s.batch_size])
        out = self.model(b, forces=True, create_graph=True)
        n = b.n_atoms.to(out["energy"])
        loss = ((out["energy"] - b.energy[:, s.fidelity].to(out["energy"])) / n).square().mean()
        loss = loss + s.force_weight * (out["forces"] - b.forces[:, s.fidelity].to(out["forces"])).square().mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.frames += len(n)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def payload(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_payload(self, d: dict[str, Any]) -> None:
        self.model.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])

    def best_model(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}


def train_descriptor_network(model: DescriptorNetwork, train: PackedData, settings: DescriptorTraining) -> FitResult:
    """Fit the descriptor statistics and per-element energies, then train for settings.budget_s
    seconds; returns the seconds, epochs, steps and frames trained on."""
    model.fit_statistics(train, settings.fidelity)
    trainer = DescriptorTrainer(model, train, settings)
    state = trainer.fit()
    return FitResult(state.elapsed_s, state.epoch, state.step, trainer.frames)
