"""Masked losses: a frame contributes only the terms it has labels for.

Every term is kept per fidelity (the mean over that fidelity's labelled entries in the
batch), so that each level of theory has its own energy and force weights and a rare level
is not averaged away by a common one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyfid.data.batch import Batch


def masked_mean(err2: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean of `err2` over `dims` where `mask` (broadcastable) is True; 0 where nothing is."""
    mask = mask.to(err2.dtype).expand_as(err2)
    return (err2 * mask).sum(dims) / mask.sum(dims).clamp_min(1.0)


def pointwise(err: torch.Tensor, kind: str = "mse", delta: float = 0.01) -> torch.Tensor:
    """The per-entry loss of errors `err`: "mse" err²; "huber" err² where |err| < delta and
    2·delta·|err| − delta² beyond (twice the usual Huber loss, so that it equals err² for small
    errors and the MSE weights keep their meaning). delta in the unit of `err`."""
    if kind == "mse":
        return err.square()
    if kind == "huber":
        return 2.0 * torch.nn.functional.huber_loss(err, torch.zeros_like(err), reduction="none", delta=delta)
    raise ValueError(f"unknown loss {kind!r}; expected 'mse' or 'huber'")


def loss_terms(
    pred: dict[str, torch.Tensor],
    batch: Batch,
    heads: Sequence[int] | None = None,
    deriv_heads: Sequence[int] | None = None,
    kind: str = "mse",
    delta: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Per-fidelity loss terms, MSE by default (`kind`, `delta`: see `pointwise`).

    energy: ((E_pred − E)/N)² per frame, eV², one value per column in `heads` (default all);
    forces: per Cartesian component, (eV/Å)², and stress: per component, (eV/Å³)², one value
    per column in `deriv_heads` (default `heads`), the columns of pred["forces"]/["stress"].
    pred["energy"] has every fidelity column. A fidelity without labels of a kind in the
    batch gets 0 for that term.
    """
    n_fid = batch.energy.shape[1]
    heads = list(range(n_fid)) if heads is None else list(heads)
    deriv_heads = heads if deriv_heads is None else list(deriv_heads)
    idx = torch.as_tensor(heads, dtype=torch.long, device=batch.energy.device)
    n = batch.n_atoms.to(pred["energy"].dtype).unsqueeze(1)
    e_err = pointwise((pred["energy"].index_select(1, idx) - batch.energy.index_select(1, idx)) / n, kind, delta)
    terms = {"energy": masked_mean(e_err, batch.energy_mask.index_select(1, idx), (0,))}
    didx = torch.as_tensor(deriv_heads, dtype=torch.long, device=batch.energy.device)
    if "forces" in pred:
        atom_mask = batch.forces_mask.index_select(1, didx).index_select(0, batch.frame).unsqueeze(2)  # (N, H, 1)
        f_err = pointwise(pred["forces"] - batch.forces.index_select(1, didx), kind, delta)
        terms["forces"] = masked_mean(f_err, atom_mask, (0, 2))
    if "stress" in pred:
        s_err = pointwise(pred["stress"] - batch.stress.index_select(1, didx), kind, delta)
        terms["stress"] = masked_mean(s_err, batch.stress_mask.index_select(1, didx)[:, :, None, None], (0, 2, 3))
    return terms


#: below this a term counts as absent in the "rms" balance (its square root's slope stays finite)
_RMS_FLOOR = 1e-30


def total_loss(
    terms: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor | float],
    heads: Sequence[int] | None = None,
    deriv_heads: Sequence[int] | None = None,
    balance: str = "none",
) -> torch.Tensor:
    """Σ_k Σ_f w_{k,f} · term_{k,f}; with `balance="rms"`, Σ_k Σ_f √(w_{k,f} · term_{k,f}).

    A weight is a scalar or a tensor with one value per fidelity column; the columns of the
    terms are `heads` (energy) and `deriv_heads` (forces, stress), as in `loss_terms`.

    "rms" sums weighted RMS errors instead of weighted mean squares (as hippynn's multi-fidelity
    examples do): the gradient of √t is ∇t / 2√t, so each term pulls in proportion to its
    relative, not its absolute, error, and a level with few energies is not drowned by another
    level's forces. A term that is 0 (no labels of that kind in the batch) adds nothing."""
    if balance not in ("none", "rms"):
        raise ValueError(f"unknown loss balance {balance!r}; expected 'none' or 'rms'")
    total = None
    for k, v in terms.items():
        w = weights.get(k, 0.0)
        if isinstance(w, torch.Tensor) and w.numel() > 1:
            cols = heads if k == "energy" else (deriv_heads if deriv_heads is not None else heads)
            if cols is not None:
                w = w[list(cols)]
        t = v * w
        t = t.clamp_min(_RMS_FLOOR).sqrt() * (t > 0) if balance == "rms" else t
        total = t.sum() if total is None else total + t.sum()
    assert total is not None
    return total
