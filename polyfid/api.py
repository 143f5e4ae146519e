"""The Python API behind the command line: train, evaluate, predict."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms

from polyfid.analysis.metrics import error_metrics
from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset, Frame
from polyfid.data.readers import read
from polyfid.errors import DataError
from polyfid.models import load_model
from polyfid.models.potential import Potential
from polyfid.neighbors.checks import model_geometry
from polyfid.train.run import RunResult, run_training


def train_model(config: dict | str | Path, resume: bool = False) -> RunResult:
    """Train from a configuration (dict or YAML path). See `polyfid config`."""
    return run_training(config, resume=resume)


def _as_model(model: str | Path | Potential, dtype: torch.dtype = torch.float32) -> Potential:
    return model if isinstance(model, torch.nn.Module) else load_model(model, dtype=dtype)


def align_fidelities(data: Dataset, model: Potential, mapping: dict[str, str] | None = None) -> Dataset:
    """Rename the data's label sets to the model's head names.

    mapping: data fidelity -> model fidelity. Without it, names that the model knows are
    kept, and a single unknown label set on a single-head model maps to that head, unless
    the data already have that head's level (rMD17 files carry the old MD17 labels beside
    the new ones: those must not replace them).
    """
    mapping = dict(mapping or {})
    unknown = [f for f in data.fidelities if f not in model.fidelities and f not in mapping]
    known = [f for f in data.fidelities if f in model.fidelities]
    if len(unknown) == 1 and len(model.fidelities) == 1 and not mapping and not known:
        mapping[unknown[0]] = model.fidelities[0]
    for src, dst in mapping.items():
        if dst not in model.fidelities:
            raise DataError(f"the model has no fidelity {dst!r}; it has {model.fidelities}")
        data.rename_fidelity(src, dst)
    if not set(data.fidelities) & set(model.fidelities):
        raise DataError(
            f"none of the data's label sets {data.fidelities} is a fidelity of the model {model.fidelities}; "
            "name the correspondence (e.g. --as FIDELITY)"
        )
    return data


def evaluate(
    model: str | Path | Potential,
    data: Dataset | str | Path | list[str | Path],
    mapping: dict[str, str] | None = None,
    batch_size: int = 64,
    **read_options: Any,
) -> dict[str, Any]:
    """Errors of `model` on `data` per fidelity (energy MAE/RMSE in meV, forces in meV/Å).

    `data`: a data set, a file, or a list of files (merged: the same geometry in two files is
    one frame). The result also holds the raw arrays under "_arrays" (for parity plots).
    Raises GeometryError for a frame that fails the model's geometry checks."""
    model = _as_model(model)
    if not isinstance(data, Dataset):
        data = read(data, **read_options)
    data = align_fidelities(data, model, mapping)
    missing = set(data.elements) - set(model.species)
    if missing:
        raise DataError(f"data contain elements {sorted(missing)} the model was not trained on ({model.species})")
    # frames are checked (GeometryError) with the limits the model was trained with
    packed = PackedData(data, model.cutoff, model.fidelities, dtype=next(model.parameters()).dtype,
                        **model_geometry(model))
    return error_metrics(model, packed, batch_size=batch_size)


def predict(
    model: str | Path | Potential,
    structures: Iterable[Any] | str | Path,
    fidelity: str | None = None,
    batch_size: int = 64,
) -> list[dict[str, np.ndarray]]:
    """Energy (eV) and forces (eV/Å) at `fidelity` for each structure (ASE Atoms, Frames, a
    Dataset, or a file of any format `polyfid.read` reads, whose labels are ignored). Returns
    [{"energy": float, "forces": (n, 3)}] in input order; the input is left unchanged.
    Raises GeometryError for a structure the model should not see (atoms closer than its
    min_distance, wider than its max_extent, non-finite positions, a singular cell)."""
    model = _as_model(model)
    head = model.head_index(fidelity)
    if isinstance(structures, (Atoms, Frame)):  # one structure: a list of one (iterating Atoms gives atoms)
        structures = [structures]
    if isinstance(structures, (str, Path)):
        data = read(structures)
    elif isinstance(structures, Dataset):
        data = structures
    else:
        frames = []
        for k, s in enumerate(structures):
            if isinstance(s, Frame):
                frames.append(s)
            else:  # ASE Atoms
                cell = s.cell.array if s.pbc.any() else None
                frames.append(Frame(s.numbers, s.positions, cell=cell, pbc=s.pbc, source=f"structure {k}"))
        data = Dataset(frames)
    data = Dataset([dataclasses.replace(f, labels={}) for f in data])  # labels ignored; the caller's kept
    packed = PackedData(data, model.cutoff, model.fidelities, dtype=next(model.parameters()).dtype,
                        **model_geometry(model))
    from polyfid.analysis.metrics import predict_packed

    pred = predict_packed(model, packed, batch_size=batch_size, forces=True)
    out = []
    for b in range(packed.n_frames):
        s, e = packed.atom_ptr[b], packed.atom_ptr[b + 1]
        out.append({"energy": float(pred["energy"][b, head]), "forces": pred["forces"][s:e, head]})
    return out
