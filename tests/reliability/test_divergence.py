"""A non-finite loss or gradient stops training with TrainingDiverged (exit 2): the last finite
checkpoint stays, no non-finite model file is written, and the run resumes from it (issue 22)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import tiny_config

import polyfid.train.trainer as trainer_mod
from polyfid.cli.main import main
from polyfid.errors import TrainingDiverged
from polyfid.models import read_checkpoint
from polyfid.train.loop import require_finite
from polyfid.train.trainer import clip_and_check


def _finite(sd: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in sd.values() if v.is_floating_point())


def test_clip_and_check_names_step_frames_and_options():
    w = torch.nn.Parameter(torch.ones(3))
    loss = (w * float("nan")).sum()
    loss.backward()
    frames = [f"f.xyz:{k}" for k in range(8)]
    with pytest.raises(TrainingDiverged) as err:
        clip_and_check(loss, [w], None, 41, frames, 1e-3)
    msg = str(err.value)
    for words in ("step 41", "the loss is nan", "f.xyz:0, f.xyz:1, f.xyz:2, f.xyz:3, f.xyz:4 and 3 more",
                  "training.lr (now 0.001)", "training.grad_clip", "data.min_distance"):
        assert words in msg, msg


def test_clip_and_check_catches_a_gradient_the_loss_hides():
    w = torch.nn.Parameter(torch.ones(2))
    loss = torch.tensor(1.0, requires_grad=True)
    w.grad = torch.tensor([1.0, float("inf")])
    with pytest.raises(TrainingDiverged, match="the gradient norm is inf"):
        clip_and_check(loss, [w], 10.0, 3, ["a"], 0.1)
    w.grad = torch.tensor([3.0, 4.0])
    clip_and_check(loss, [w], 1.0, 3, ["a"], 0.1)  # finite: clipped to norm 1, no error
    assert math.isclose(float(w.grad.norm()), 1.0, rel_tol=1e-5)


def test_require_finite():
    require_finite({"model": {"a": torch.ones(2), "steps": torch.tensor(3)}, "ema": None}, "x", 1)
    with pytest.raises(TrainingDiverged, match=r"model.pt would hold non-finite weights \(ema.shadow.1\)"):
        nan_ema = {"shadow": [torch.ones(1), torch.tensor([float("nan")])]}
        require_finite({"model": {"a": torch.ones(2)}, "ema": nan_ema}, "model.pt", 5)
    with pytest.raises(TrainingDiverged, match=r"checkpoint.pt would hold non-finite weights \(a\)"):
        require_finite({"model": {"a": torch.tensor([1.0, float("inf")])}, "ema": None}, "checkpoint.pt", 5)


def _config(tmp_path, toy_xyz, **training):
    cfg = tiny_config(toy_xyz, tmp_path / "run", checkpoint_interval_s=0, **training)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_nan_mid_run_keeps_checkpoint_and_model_then_resumes(tmp_path, toy_xyz, monkeypatch, capsys):
    """32 training frames, batch 4: 8 steps an epoch. A NaN loss at step 10 (epoch 2) stops
    the run; epoch 1's checkpoint and model file stay as they were, finite; --resume finishes."""
    cfg = _config(tmp_path, toy_xyz, epochs=3)
    real = trainer_mod.step_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, *rest = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 11 else loss), *rest

    monkeypatch.setattr(trainer_mod, "step_loss", poisoned)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "polyfid train: error: training diverged at step 10: the loss is nan" in err, err
    assert "toy.extxyz:" in err and "checkpoint.pt, is kept" in err and "training.lr" in err
    run = tmp_path / "run"
    ck = read_checkpoint(run / "checkpoint.pt")
    assert ck["state"]["step"] == 8 and ck["state"]["epoch"] == 1 and _finite(ck["model"])
    model = torch.load(run / "model.pt", weights_only=True)
    assert model["metadata"]["epoch"] == 1 and _finite(model["state_dict"])
    assert model["metadata"]["min_distance"] == 0.1 and model["metadata"]["max_extent"] == 1000.0

    monkeypatch.setattr(trainer_mod, "step_loss", real)
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    ck = read_checkpoint(run / "checkpoint.pt")
    assert ck["state"]["epoch"] == 3 and _finite(ck["model"])


def test_huge_learning_rate_exits_2_without_a_model(tmp_path, toy_xyz, capsys):
    cfg = _config(tmp_path, toy_xyz, epochs=2, lr=1e30)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "training.lr (now 1e+30)" in err, err
    assert not (tmp_path / "run" / "model.pt").exists()
