"""A training run killed at an arbitrary moment (SIGKILL, a real process) and resumed with
--resume ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import tiny_config

EPOCHS = 12


def _train_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "polyfid.cli.main", "train", str(cfg), *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _epoch(run: Path) -> int:
    try:
        return torch.load(run / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    except Exception:  # not written yet
        return -1


def test_killed_run_resumes_to_identical_weights(tmp_path: Path, toy_xyz: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cfgs = {}
    for name in ("straight", "killed"):
        cfg = tiny_config(toy_xyz, tmp_path / name, epochs=EPOCHS, scheduler="cosine", grad_clip=1.0,
                          checkpoint_interval_s=0.0)
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(cfg))

    straight = subprocess.Popen(_train_cmd(cfgs["straight"]), env=env, stdout=subprocess.DEVNULL)
    killed = subprocess.Popen(_train_cmd(cfgs["killed"]), env=env, stdout=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while _epoch(run) < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.03)  # somewhere inside a later epoch
    assert killed.poll() is None, "the run finished before it could be killed; make epochs longer"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    interrupted_at = _epoch(run)
    assert 3 <= interrupted_at < EPOCHS

    resumed = subprocess.run(_train_cmd(cfgs["killed"], "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {interrupted_at}" in resumed.stdout
    assert straight.wait(timeout=120) == 0

    a, b = _weights(tmp_path / "straight"), _weights(run)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["state"]["epoch"] == EPOCHS
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        scale = a[key].abs().max().item() + 1e-12
        assert diff <= 1e-6 * scale, f"{key}: resumed weights differ by {diff:.3g} (scale {scale:.3g})"
    # the training history is continuous: one row per epoch, none duplicated by the restart
    lines = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == EPOCHS + 1
