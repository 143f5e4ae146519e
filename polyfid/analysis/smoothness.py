"""Smoothness of a potential along a scan: an ordered path of frames along one coordinate
(a normal mode, a bond stretch, a torsion, a reaction path) with reference labels.

Reports the energy error along the scan, the local extrema of model and reference (a model
extremum with no reference extremum at a neighbouring frame is spurious), and the error of
the second difference Δ²E_i = E_{i+1} − 2E_i + E_{i−1}, which is what an MD integrator or a
frequency calculation feels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.analysis.metrics import predict_packed
from polyfid.data.batch import PackedData
from polyfid.data.errors import DataError
from polyfid.data.frame import Dataset


def predict_path(model: Any, frames: Dataset, fidelity: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Energies (n_frames,) eV of the model's head `fidelity` (default: the model's default)
    along the frames, in order."""
    h = model.head_index(fidelity)
    dtype = next(model.parameters()).dtype
    packed = PackedData(frames, model.cutoff, list(model.fidelities), dtype=dtype)
    pred = predict_packed(model, packed, batch_size=batch_size, forces=False)
    return np.asarray(pred["energy"])[:, h].astype(float)


def count_extrema(e: np.ndarray, tolerance_meV: float = 1.0) -> list[int]:
    """Indices of the interior local extrema of the sequence `e` (eV).

    Hysteresis: a turning point counts only once the sequence has moved away from it by more
    than `tolerance_meV` in the other direction, so wiggles below the tolerance (noise) and
    flat stretches are not extrema; an end of the path is never one. On a plateau the first
    frame of it is reported."""
    e = np.asarray(e, dtype=float) * 1e3
    tol = float(tolerance_meV)
    out: list[int] = []
    if len(e) < 3:
        return out
    direction, lo, hi, anchor = 0, 0, 0, 0  # direction: +1 rising, −1 falling, 0 not yet known
    for i in range(1, len(e)):
        if direction == 0:
            lo = i if e[i] < e[lo] else lo
            hi = i if e[i] > e[hi] else hi
            if e[hi] - e[lo] > tol:  # the first move larger than the tolerance sets the direction
                direction, anchor = (1, hi) if hi > lo else (-1, lo)
                turn = lo if direction == 1 else hi
                if abs(e[0] - e[turn]) > tol:  # it went the other way first, by more than the tolerance
                    out.append(turn)
            continue
        if direction * (e[i] - e[anchor]) > 0:  # strictly further: a plateau keeps its first frame
            anchor = i
        elif direction * (e[anchor] - e[i]) > tol:
            out.append(anchor)
            direction, anchor = -direction, i
    return [i for i in out if 0 < i < len(e) - 1]


def path_coordinate(frames: Dataset) -> np.ndarray:
    """Cumulative root-mean-square atomic displacement along the frames (n_frames,) Å, from 0."""
    steps = [0.0] + [float(np.sqrt(np.mean(np.sum((b.positions - a.positions) ** 2, axis=1))))
                     for a, b in zip(frames, frames[1:])]
    return np.cumsum(steps)


@dataclass
class ScanReport:
    """A potential along one scan against its reference labels. Energies in eV in the
    arrays, errors in meV; `coordinate` in Å unless one was given."""

    n_frames: int
    energy_mae_meV: float  # after removing the mean offset (the scan's shape)
    energy_mae_raw_meV: float
    energy_max_error_meV: float
    second_difference_rmse_meV: float
    model_extrema: list[int]
    reference_extrema: list[int]
    spurious_extrema: int
    missing_extrema: int
    coordinate: np.ndarray = field(repr=False)
    e_model: np.ndarray = field(repr=False)
    e_ref: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable scalars and extrema (no arrays)."""
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, np.ndarray)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScanReport:
        """Back from `to_dict()` plus the arrays (coordinate, e_model, e_ref) as lists."""
        names = cls.__dataclass_fields__
        return cls(**{k: (np.asarray(v) if k in ("coordinate", "e_model", "e_ref") else v)
                      for k, v in d.items() if k in names})


def compare_scan(e_model: np.ndarray, e_ref: np.ndarray, coordinate: np.ndarray | None = None,
                 tolerance_meV: float = 1.0) -> ScanReport:
    """The report of model energies against reference energies along a scan (both eV)."""
    e_model, e_ref = np.asarray(e_model, float), np.asarray(e_ref, float)
    if e_model.shape != e_ref.shape:
        raise ValueError(f"{e_model.shape} model energies for {e_ref.shape} reference energies")
    err = (e_model - e_ref) * 1e3
    shape = err - err.mean()
    d2 = (np.diff(e_model, 2) - np.diff(e_ref, 2)) * 1e3
    mx, rx = count_extrema(e_model, tolerance_meV), count_extrema(e_ref, tolerance_meV)
    spurious = sum(1 for i in mx if not any(abs(i - j) <= 1 for j in rx))
    missing = sum(1 for j in rx if not any(abs(i - j) <= 1 for i in mx))
    coord = np.arange(len(e_ref), dtype=float) if coordinate is None else np.asarray(coordinate, float)
    return ScanReport(len(e_ref), float(np.mean(np.abs(shape))), float(np.mean(np.abs(err))),
                      float(np.max(np.abs(shape))), float(np.sqrt(np.mean(d2**2))) if len(d2) else 0.0,
                      mx, rx, spurious, missing, coord, e_model, e_ref)


def scan_report(model: Any, frames: Dataset, fidelity: str | None = None, reference: str | None = None,
                tolerance_meV: float = 1.0, coordinate: np.ndarray | None = None) -> ScanReport:
    """The model's head `fidelity` along the ordered `frames` against their energies at
    `reference` (default: the fidelity's name). coordinate (n_frames,): the scan variable
    (default: `path_coordinate`, Å)."""
    name = reference or fidelity or model.fidelities[model.head_index(None)]
    e_ref = []
    for k, f in enumerate(frames):
        lab = f.labels.get(name)
        if lab is None or lab.energy is None:
            raise DataError(f"{f.source or frames.name or 'scan'} (frame {k}): no reference energy at {name!r}; "
                            f"the frame has {sorted(f.labels)}")
        e_ref.append(lab.energy)
    with torch.no_grad():
        e_model = predict_path(model, frames, fidelity)
    coord = path_coordinate(frames) if coordinate is None else coordinate
    return compare_scan(e_model, np.array(e_ref), coord, tolerance_meV)


def plot_scan(reports: dict[str, ScanReport], path: str | Path, title: str = "") -> Path:
    """Energies relative to the reference minimum along the scan (reference and every model,
    one curve each) and the models' errors (offset removed), meV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    first = next(iter(reports.values()))
    ref0 = first.e_ref.min()
    a1.plot(first.coordinate, (first.e_ref - ref0) * 1e3, "k-", lw=2, label="reference")
    for name, r in reports.items():
        off = np.mean(r.e_model - r.e_ref)
        a1.plot(r.coordinate, (r.e_model - off - ref0) * 1e3, ".-", label=f"{name} (MAE {r.energy_mae_meV:.1f} meV)")
        a2.plot(r.coordinate, (r.e_model - r.e_ref - off) * 1e3, ".-", label=name)
    a1.set(ylabel="E − E_min (meV)", title=title)
    a2.set(xlabel="scan coordinate", ylabel="error (meV)")
    a2.axhline(0, color="k", lw=0.5)
    a1.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
