"""Kills at phase boundaries: a run stopped just before or just after any checkpoint (inside a
stage, at the switch to the final energy weight, at the end of one stage and the start of the
next, at a plateau cut of the learning rate) and resumed ends bit for bit where an
uninterrupted run ends: the same model file and the same last checkpoint.

The stop is an exception raised around `Trainer.save_checkpoint`, in process: what a SIGKILL
leaves on disk at that moment (tests/train/test_resume.py kills a real process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import two_level_data

from polyfid.train.config import load_config
from polyfid.train.loop import BEST_MODEL, CHECKPOINT
from polyfid.train.strategies import fit_strategy
from polyfid.train.trainer import Trainer

MODEL = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 2, "n_atom_layers": 1, "cutoff": 3.0}
# 20 training frames, batches of 4: 5 steps an epoch; max_steps 12 ends inside epoch 3. With a
# checkpoint every epoch and one at the end, each stage writes 4 checkpoints.
TRAINING = {"epochs": 1000, "max_steps": 12, "batch_size": 4, "num_threads": 1, "seed": 0, "lr": 3e-3,
            "checkpoint_interval_s": 0.0, "scheduler": "cosine"}
FINAL = {"final_energy_weight": 1000.0, "final_fraction": 0.4}  # the switch at step 8, inside epoch 2
PLATEAU = {"scheduler": "plateau", "plateau_patience": 1, "plateau_factor": 0.5, "max_steps": 20}


class Stop(Exception):
    """Stands for a kill."""


def _config(out: Path, strategy: str, training: dict) -> dict:
    return {
        "model": MODEL,
        "training": TRAINING | training,
        # embedding warm-starts only when asked: then it too has two stages
        "strategy": {"name": strategy, "target": "hi", "base": "lo"} | ({"warm_start": True} if strategy == "embedding"
                                                                       else {}),
        "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False},
    }


def _fit(out: Path, strategy: str, training: dict, resume: bool = False) -> None:
    ds = two_level_data()
    cfg = load_config(_config(out, strategy, training))
    fit_strategy(cfg, ds[np.arange(20)], ds[np.arange(20, 24)], out, resume=resume)


def _files(out: Path) -> dict[str, dict]:
    """Every model file and checkpoint of a run folder (stage folders included), as loaded."""
    found = {}
    for path in sorted(out.rglob("*.pt")):
        if path.name in (BEST_MODEL, CHECKPOINT):
            found[str(path.relative_to(out))] = torch.load(path, weights_only=True)
    return found


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            if k not in ("elapsed_s", "history", "checksum"):  # wall-clock time, the log and the hash with it
                _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{k}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


_STRAIGHT: dict[tuple, tuple[dict, int]] = {}


class CountingWrites:
    """Trainer.save_checkpoint, counting its calls and raising Stop just before or after call `at`."""

    def __init__(self, at: int | None = None, when: str = "after") -> None:
        self.at, self.when, self.writes, self.save = at, when, 0, Trainer.save_checkpoint

    def method(self):
        """The replacement for the class attribute (a plain function, so that it binds)."""

        def save_checkpoint(trainer: Trainer) -> None:
            self.writes += 1
            if self.writes == self.at and self.when == "before":
                raise Stop
            self.save(trainer)
            if self.writes == self.at:
                raise Stop

        return save_checkpoint


def _straight(tmp_path_factory, monkeypatch, strategy: str, training: dict) -> tuple[dict, int]:
    """The files of an uninterrupted run and how many checkpoints it wrote."""
    key = (strategy, tuple(sorted(training.items())))
    if key not in _STRAIGHT:
        out = tmp_path_factory.mktemp("straight")
        with monkeypatch.context() as m:
            counter = CountingWrites()
            m.setattr(Trainer, "save_checkpoint", counter.method())
            _fit(out, strategy, training)
        _STRAIGHT[key] = _files(out), counter.writes
    return _STRAIGHT[key]


# (strategy, training options, the checkpoint write (1-based, counted over all stages) at which
# the run stops, and whether it stops just before that write or just after it)
CASES = [
    ("single", FINAL, 2, "after"),      # the last checkpoint before the final-weight phase
    ("single", FINAL, 3, "before"),     # inside the final phase, its first epoch lost
    ("single", PLATEAU, 3, "after"),    # after a plateau cut of the learning rate
    ("multi-head", {}, 2, "after"),     # inside the base stage
    ("multi-head", {}, 4, "after"),     # the base stage finished, the joint stage not begun
    ("multi-head", {}, 5, "before"),    # the joint stage's first epoch lost
    ("multi-head", {}, 5, "after"),     # right after the joint stage's first checkpoint
    ("transfer", {}, 4, "after"),       # pre-training finished, fine-tuning not begun
    ("transfer", {}, 6, "before"),      # inside fine-tuning
    ("delta", {}, 4, "after"),          # the base model finished, the Δ model not begun
    ("delta", FINAL, 7, "after"),       # the Δ model's final-weight phase
    ("embedding", {}, 4, "after"),      # embedding's warm start: between its stages
]


@pytest.mark.parametrize("strategy, training, at, when", CASES)
def test_a_run_stopped_at_a_phase_boundary_resumes_exactly(tmp_path, tmp_path_factory, monkeypatch, strategy,
                                                           training, at, when) -> None:
    straight, total = _straight(tmp_path_factory, monkeypatch, strategy, training)
    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "save_checkpoint", CountingWrites(at, when).method())
    with pytest.raises(Stop):
        _fit(out, strategy, training)
    after = CountingWrites()
    monkeypatch.setattr(Trainer, "save_checkpoint", after.method())
    _fit(out, strategy, training, resume=True)
    # it resumed, not started over: it redid only the work after the last checkpoint on disk (a
    # stage that had finished re-enters, stops at once and writes its checkpoint once more)
    assert after.writes - (total - at + (when == "before")) in (0, 1)
    resumed = _files(out)
    assert set(resumed) == set(straight)
    for name in straight:
        _assert_same(straight[name], resumed[name], name)
