"""Masked losses: a frame contributes only the terms it has labels for."""

from __future__ import annotations

import torch

from polyfid.data.batch import Batch


def masked_mse(err2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `err2` over the entries where `mask` is True (0 if none); shapes broadcast."""
    mask = mask.to(err2.dtype)
    return (err2 * mask).sum() / mask.expand_as(err2).sum().clamp_min(1.0)


def loss_terms(pred: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
    """Per-term MSE averaged over fidelities present in the batch.

    energy: (E_pred − E)/N per frame, eV²; forces: per Cartesian component, (eV/Å)²;
    stress: per component, (eV/Å³)². Columns of `pred` follow the batch's fidelities.
    """
    n = batch.n_atoms.to(pred["energy"].dtype).unsqueeze(1)
    terms = {"energy": masked_mse(((pred["energy"] - batch.energy) / n).square(), batch.energy_mask)}
    if "forces" in pred:
        atom_mask = batch.forces_mask.index_select(0, batch.frame).unsqueeze(2)  # (N, F, 1)
        terms["forces"] = masked_mse((pred["forces"] - batch.forces).square(), atom_mask)
    if "stress" in pred:
        terms["stress"] = masked_mse((pred["stress"] - batch.stress).square(), batch.stress_mask[:, :, None, None])
    return terms


def total_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_k w_k · term_k over the terms present."""
    return sum(weights.get(k, 0.0) * v for k, v in terms.items())  # type: ignore[return-value]
