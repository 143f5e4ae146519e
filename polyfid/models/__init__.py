"""Networks (one architecture per file), the Potential that wraps them, and model files.

A model file is a plain dict of tensors and primitives written with ``torch.save`` and
read with ``torch.load(weights_only=True)``: loading never executes code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polyfid.errors import ConfigError, ModelFileError
from polyfid.models.branched import BranchedPotential
from polyfid.models.delta import DeltaPotential
from polyfid.models.embedding import FidelityEmbeddingPotential
from polyfid.models.hiphop import HIPHOPNN
from polyfid.models.hipnn import HIPNN
from polyfid.models.hipnn_ts import HIPNNTS
from polyfid.models.potential import Potential

#: architecture name -> representation class; each takes n_species plus its own options
ARCHITECTURES: dict[str, type[torch.nn.Module]] = {"hipnn": HIPNN, "hipnn_ts": HIPNNTS, "hiphop": HIPHOPNN}

MODEL_FORMAT = "polyfid-model"
UNITS = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³", "length": "Å"}


def build_potential(model_config: dict[str, Any], species: Sequence[int], fidelities: Sequence[str]) -> Potential:
    """Build a Potential from {"architecture": NAME, **options} for `species` and `fidelities`.

    With "fidelity_embedding": D (> 0) in the options, one head for all fidelities and a
    learned D-dimensional fidelity embedding (FidelityEmbeddingPotential); else one head per
    fidelity, and with "fidelity_blocks": k (> 0) and several fidelities, each fidelity's own
    last k interaction blocks (BranchedPotential)."""
    cfg = dict(model_config)
    name = cfg.pop("architecture", "hipnn")
    embed = int(cfg.pop("fidelity_embedding", 0) or 0)
    own_blocks = int(cfg.pop("fidelity_blocks", 0) or 0)
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    cfg = {k: v for k, v in cfg.items() if v is not None}  # unset architecture-specific options
    try:
        rep = ARCHITECTURES[name](n_species=len(species) + embed, **cfg)
    except TypeError as e:
        raise ConfigError(f"architecture {name!r}: {e}") from None
    if embed:
        pot: Potential = FidelityEmbeddingPotential(rep, species, fidelities, embed)
    elif own_blocks and len(fidelities) > 1:
        pot = BranchedPotential(rep, species, fidelities, own_blocks)
    else:
        pot = Potential(rep, species, fidelities)
    pot.model_config = dict(model_config)  # what rebuilds it (saved with the weights)
    return pot


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The checkpoint at `path` (tensors only: weights_only=True), None if there is none."""
    path = Path(path)
    return torch.load(path, map_location=device, weights_only=True) if path.exists() else None


def atomic_write(obj: Any, path: str | Path, durable: bool = True) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half file.

    durable=False skips fsync: still safe against a killed process (the rename is atomic),
    not against a power cut; training checkpoints use it to keep epochs cheap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def model_dict(
    model: Potential | DeltaPotential, model_config: dict[str, Any], metadata: dict[str, Any] | None = None
) -> dict:
    """The serialisable description of a model (config, species, fidelities, units, weights).

    A Δ model holds its two networks' descriptions under "base" and "delta"."""
    if isinstance(model, DeltaPotential):
        return {
            "format": MODEL_FORMAT,
            "version": 1,
            "kind": "delta",
            "target": model.target,
            "base_fidelity": model.base_fidelity,
            "species": list(model.species),
            "fidelities": list(model.fidelities),
            "units": dict(UNITS),
            "metadata": dict(metadata or {}),
            "base": model_dict(model.base, model_config["base"]),
            "delta": model_dict(model.delta, model_config["delta"]),
        }
    return {
        "format": MODEL_FORMAT,
        "version": 1,
        "model_config": dict(model_config),
        "species": list(model.species),
        "fidelities": list(model.fidelities),
        "units": dict(UNITS),
        "metadata": dict(metadata or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def save_model(path: str | Path, model: Potential, model_config: dict[str, Any], metadata: dict | None = None) -> None:
    """Write a model file atomically."""
    atomic_write(model_dict(model, model_config, metadata), path)


def model_config_of(d: dict) -> dict[str, Any]:
    """The model options of a model description (nested for a Δ model)."""
    if d.get("kind") == "delta":
        return {"base": model_config_of(d["base"]), "delta": model_config_of(d["delta"])}
    return dict(d["model_config"])


def model_from_dict(d: dict, source: str = "model") -> Potential | DeltaPotential:
    if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{source}: not a polyfid model file (format key missing or wrong)")
    if d.get("kind") == "delta":
        base, delta = model_from_dict(d["base"], source), model_from_dict(d["delta"], source)
        return DeltaPotential(base, delta, d["target"], d["base_fidelity"])
    model = build_potential(d["model_config"], d["species"], d["fidelities"])
    model.load_state_dict(d["state_dict"])
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> Potential:
    """Load a model file (no code executed: weights_only=True) in `dtype`, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    d = torch.load(path, map_location="cpu", weights_only=True)
    model = model_from_dict(d, str(path)).to(dtype=dtype, device=device)
    # the level a multi-fidelity model was trained to predict answers when none is named
    target = d.get("metadata", {}).get("target") if d.get("kind") != "delta" else d["target"]
    if target in model.fidelities:
        model.default_fidelity = target
    # the geometry checks it was trained with (data.min_distance, data.max_extent) apply to its inputs
    meta = d.get("metadata") or {}
    model.geometry_limits = {k: float(meta[k]) for k in ("min_distance", "max_extent") if k in meta}
    model.eval()
    return model


__all__ = [
    "ARCHITECTURES",
    "HIPNN",
    "BranchedPotential",
    "DeltaPotential",
    "FidelityEmbeddingPotential",
    "Potential",
    "atomic_write",
    "build_potential",
    "load_model",
    "save_model",
]
