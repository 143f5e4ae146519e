"""Predictions over a packed data set and error metrics per fidelity (meV, meV/Å)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from polyfid.data.batch import PackedData
from polyfid.errors import FidelityError
from polyfid.models.potential import Potential


def predict_packed(
    model: Potential, data: PackedData, batch_size: int = 64, forces: bool = True, device: str | None = None
) -> dict[str, np.ndarray]:
    """Energies (n_frames, H) eV and forces (n_atoms, H, 3) eV/Å of every frame at every head.

    The heads follow `model.fidelities`; `data` must have been packed with the same order.
    """
    dtype = next(model.parameters()).dtype
    energies, force_list = [], []
    for start in range(0, data.n_frames, batch_size):
        b = data.batch(np.arange(start, min(start + batch_size, data.n_frames))).to(device, dtype)
        with torch.set_grad_enabled(forces):
            out = model(b, forces=forces)
        energies.append(out["energy"].detach().cpu().double().numpy())
        if forces:
            force_list.append(out["forces"].detach().cpu().double().numpy())
    result = {"energy": np.concatenate(energies)}
    if forces:
        result["forces"] = np.concatenate(force_list)
    return result


def error_metrics(
    model: Potential, data: PackedData, batch_size: int = 64, device: str | None = None
) -> dict[str, Any]:
    """Errors per fidelity on the labelled frames: energy MAE/RMSE (meV, and meV/atom),
    force MAE/RMSE over all Cartesian components (meV/Å), counts; plus the raw arrays
    under "_arrays" for parity plots."""
    if list(data.fidelities) != list(model.fidelities):
        raise FidelityError(f"data packed for fidelities {data.fidelities}, model has {model.fidelities}")
    want_forces = bool(data.forces_mask.any())
    pred = predict_packed(model, data, batch_size, forces=want_forces, device=device)
    result: dict[str, Any] = {"_arrays": {}}
    n_atoms = data.n_atoms.astype(float)
    atom_frame = np.repeat(np.arange(data.n_frames), data.n_atoms)
    for h, fid in enumerate(data.fidelities):
        m: dict[str, float] = {}
        arrays: dict[str, np.ndarray] = {}
        emask = data.energy_mask[:, h].numpy()
        if emask.any():
            ref = data.energy[:, h].double().numpy()[emask]
            err = pred["energy"][emask, h] - ref
            m |= {
                "energy_mae_meV": 1e3 * float(np.mean(np.abs(err))),
                "energy_rmse_meV": 1e3 * float(np.sqrt(np.mean(err**2))),
                "energy_mae_meV_per_atom": 1e3 * float(np.mean(np.abs(err) / n_atoms[emask])),
                "energy_rmse_meV_per_atom": 1e3 * float(np.sqrt(np.mean((err / n_atoms[emask]) ** 2))),
                "n_energy": int(emask.sum()),
            }
            arrays["energy_ref"] = ref / n_atoms[emask]
            arrays["energy_pred"] = pred["energy"][emask, h] / n_atoms[emask]
        fmask = data.forces_mask[:, h].numpy()
        if want_forces and fmask.any():
            amask = fmask[atom_frame]
            ref = data.forces[:, h].double().numpy()[amask]
            err = pred["forces"][amask, h] - ref
            m |= {
                "force_mae_meV_A": 1e3 * float(np.mean(np.abs(err))),
                "force_rmse_meV_A": 1e3 * float(np.sqrt(np.mean(err**2))),
                "n_forces": int(fmask.sum()),
            }
            arrays["forces_ref"], arrays["forces_pred"] = ref.ravel(), pred["forces"][amask, h].ravel()
        if m:
            result[fid] = m
            result["_arrays"][fid] = arrays
    return result


def public(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without the raw arrays (for JSON and printing)."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}
