"""Shared fixtures: tiny labelled data sets made on the fly (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones

from polyfid.data.frame import Dataset, Frame, Labels

SHARED_DATA = Path(os.environ.get("POLYFID_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# torch.set_flush_denormal returns whether the CPU has the FTZ/DAZ modes; asked with False, it
# leaves the main thread in the default mode the tests expect
needs_ftz = pytest.mark.skipif(not torch.set_flush_denormal(False),
                               reason="this CPU cannot flush subnormal floats (no FTZ/DAZ)")


def toy_molecules(n_frames: int, seed: int = 0, n_atoms: int = 5) -> list[Atoms]:
    """Random small H/C/O clusters labelled with a Lennard-Jones calculator (eV, Å)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_frames):
        numbers = rng.choice([1, 6, 8], size=n_atoms)
        # atoms on a jittered grid so no two overlap
        grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float)[:n_atoms]
        pos = 1.3 * grid + rng.normal(scale=0.12, size=(n_atoms, 3))
        atoms = Atoms(numbers=numbers, positions=pos)
        atoms.calc = LennardJones(sigma=0.9, epsilon=0.1, rc=3.0, smooth=True)
        atoms.get_potential_energy()
        atoms.get_forces()
        images.append(atoms)
    return images


def toy_dataset(n_frames: int, seed: int = 0, fidelity: str = "lj") -> Dataset:
    frames = []
    for k, a in enumerate(toy_molecules(n_frames, seed)):
        labels = {fidelity: Labels(a.get_potential_energy(), a.get_forces())}
        frames.append(Frame(a.numbers, a.positions, labels, source=f"toy:{k}"))
    return Dataset(frames, name="toy")


def two_level_data(n: int = 24, n_hi: int = 8, seed: int = 0) -> Dataset:
    """lo: LJ energies and forces on every frame; hi: a different LJ's energies on the
    first n_hi frames only (forces of hi exist nowhere)."""
    frames = []
    for k, a in enumerate(toy_molecules(n, seed)):
        labels = {"lo": Labels(a.get_potential_energy(), a.get_forces())}
        if k < n_hi:
            b = a.copy()
            b.calc = LennardJones(sigma=0.95, epsilon=0.12, rc=3.0, smooth=True)
            labels["hi"] = Labels(energy=b.get_potential_energy() + 0.5 * len(a))
        frames.append(Frame(a.numbers, a.positions, labels, source=f"toy:{k}"))
    return Dataset(frames, name="toy2")


@pytest.fixture
def toy_xyz(tmp_path: Path) -> Path:
    """An extxyz file of 40 toy molecules with energy and forces."""
    path = tmp_path / "toy.extxyz"
    ase.io.write(path, toy_molecules(40), format="extxyz")
    return path


def tiny_config(train_path: Path, out: Path, **training) -> dict:
    """A training configuration of a very small HIP-NN on `train_path`."""
    return {
        "data": {"train": [{"path": str(train_path), "fidelity": "lj"}], "val_size": 8},
        "model": {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0},
        "training": {"epochs": 4, "batch_size": 4, "num_threads": 1, **training},
        "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False},
    }
