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

from polyfid.analysis.metrics import predict_packed
from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset
from polyfid.errors import DataError
from polyfid.neighbors.checks import model_geometry

_ARRAYS = ("coordinate", "e_model", "e_ref")


def predict_path(model: Any, frames: Dataset, fidelity: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Energies (n_frames,) eV, float64, of the model's head `fidelity` (None: the model's
    default head) at the frames, in their order. The frames' labels are not used."""
    h = model.head_index(fidelity)
    dtype = next(model.parameters()).dtype
    packed = PackedData(frames, model.cutoff, list(model.fidelities), dtype=dtype, **model_geometry(model))
    pred = predict_packed(model, packed, batch_size=batch_size, forces=False)
    return np.asarray(pred["energy"], dtype=np.float64)[:, h]


def count_extrema(e: np.ndarray, tolerance_meV: float = 1.0) -> list[int]:
    """Indices of the interior local extrema of the sequence `e` (n,) eV, ignoring wiggles
    of at most `tolerance_meV`.

    Hysteresis (zigzag) criterion: walking along the sequence, the running extreme in the
    current direction (the highest point while rising, the lowest while falling) becomes an
    extremum once the sequence has come back from it by more than the tolerance; the
    direction then flips. The first direction is set by the first rise or fall of more than
    the tolerance. So the extrema alternate (min, max, min, ...), each lies more than the
    tolerance beyond the frames on both sides of it up to the neighbouring extrema (a
    prominence above the tolerance), and noise of at most the tolerance is no extremum. The
    two ends of the sequence are never extrema; on a plateau (equal values) the first frame
    of it is reported. tolerance_meV = 0 gives the strict turning points.
    """
    e = np.asarray(e, dtype=float)
    if e.ndim != 1:
        raise ValueError(f"count_extrema needs a 1-D sequence, got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError("count_extrema: the sequence contains NaN or inf")
    if not tolerance_meV >= 0:
        raise ValueError(f"tolerance_meV must be >= 0, got {tolerance_meV}")
    e = e * 1e3  # meV, the tolerance's unit
    tol = float(tolerance_meV)
    out: list[int] = []
    direction, lo, hi, anchor = 0, 0, 0, 0  # direction: +1 rising, −1 falling, 0 not yet known
    for i in range(1, len(e)):
        if direction == 0:
            # strict comparisons: on a plateau the first frame stays the running extreme
            lo = i if e[i] < e[lo] else lo
            hi = i if e[i] > e[hi] else hi
            if e[hi] - e[lo] > tol:
                direction, anchor = (1, hi) if hi > lo else (-1, lo)
        elif direction * (e[i] - e[anchor]) > 0:
            anchor = i
        elif direction * (e[anchor] - e[i]) > tol:
            out.append(anchor)
            direction, anchor = -direction, i
    # an anchor is followed by a frame that came back from it, so never the last frame; the
    # first frame can never be one either (the direction is set after it): all are interior
    return out


def path_coordinate(frames: Dataset) -> np.ndarray:
    """Cumulative path length along the frames (n_frames,) Å, starting at 0: the sum of the
    root-mean-square atomic displacements between consecutive frames, without superposition
    (a scan displaces atoms in one fixed frame of reference). All frames need the same atoms."""
    n = {f.n_atoms for f in frames}
    if len(n) > 1:
        raise DataError(f"{frames.name or 'scan'}: frames with {sorted(n)} atoms are not one path; give a coordinate")
    steps = [0.0] + [
        float(np.sqrt(np.mean(np.sum((b.positions - a.positions) ** 2, axis=1)))) for a, b in zip(frames, frames[1:])
    ]
    return np.cumsum(steps)


@dataclass
class ScanReport:
    """A potential along one scan against its reference labels.

    Errors in meV; the arrays (n_frames,) hold energies in eV and the scan coordinate (Å
    unless one was given). energy_mae_meV and energy_max_error_meV are taken after removing
    the mean error along the scan (an energy offset does not change forces or the scan's
    shape); energy_mae_raw_meV keeps it. Extrema are frame indices (see `count_extrema`);
    spurious_indices: model extrema with no reference extremum within ±1 frame;
    missing_indices: reference extrema with no model extremum within ±1 frame; the
    *_extrema fields count them.
    """

    n_frames: int
    energy_mae_meV: float
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
    spurious_indices: list[int] = field(default_factory=list)
    missing_indices: list[int] = field(default_factory=list)
    tolerance_meV: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable scalars and lists of extrema (no arrays)."""
        return {k: v for k, v in self.__dict__.items() if k not in _ARRAYS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScanReport:
        """Back from `to_dict()` plus the arrays (coordinate, e_model, e_ref) as lists."""
        names = cls.__dataclass_fields__
        return cls(**{k: (np.asarray(v, dtype=float) if k in _ARRAYS else v) for k, v in d.items() if k in names})


def _unmatched(a: list[int], b: list[int]) -> list[int]:
    """The indices of `a` with no index of `b` within ±1."""
    return [i for i in a if not any(abs(i - j) <= 1 for j in b)]


def compare_scan(
    e_model: np.ndarray, e_ref: np.ndarray, coordinate: np.ndarray | None = None, tolerance_meV: float = 1.0
) -> ScanReport:
    """The report of model energies against reference energies (n_frames,) eV along a scan.

    coordinate (n_frames,): the scan variable (default: the frame index). The second
    difference is taken per frame (not divided by the coordinate step²), so it compares
    model and reference on the same grid whatever the spacing.
    """
    e_model, e_ref = np.asarray(e_model, dtype=float), np.asarray(e_ref, dtype=float)
    if e_model.ndim != 1 or e_model.shape != e_ref.shape or len(e_ref) == 0:
        raise ValueError(f"{e_model.shape} model energies for {e_ref.shape} reference energies")
    coord = np.arange(len(e_ref), dtype=float) if coordinate is None else np.asarray(coordinate, dtype=float)
    if coord.shape != e_ref.shape:
        raise ValueError(f"coordinate of shape {coord.shape} for {len(e_ref)} frames")
    err = (e_model - e_ref) * 1e3
    shape = err - err.mean()
    d2 = (np.diff(e_model, 2) - np.diff(e_ref, 2)) * 1e3
    mx, rx = count_extrema(e_model, tolerance_meV), count_extrema(e_ref, tolerance_meV)
    spurious, missing = _unmatched(mx, rx), _unmatched(rx, mx)
    return ScanReport(
        n_frames=len(e_ref),
        energy_mae_meV=float(np.mean(np.abs(shape))),
        energy_mae_raw_meV=float(np.mean(np.abs(err))),
        energy_max_error_meV=float(np.max(np.abs(shape))),
        second_difference_rmse_meV=float(np.sqrt(np.mean(d2**2))) if len(d2) else 0.0,
        model_extrema=mx,
        reference_extrema=rx,
        spurious_extrema=len(spurious),
        missing_extrema=len(missing),
        coordinate=coord,
        e_model=e_model,
        e_ref=e_ref,
        spurious_indices=spurious,
        missing_indices=missing,
        tolerance_meV=float(tolerance_meV),
    )


def reference_energies(frames: Dataset, reference: str) -> np.ndarray:
    """The energies (n_frames,) eV of label set `reference` of every frame; DataError naming
    the file and frame of the first frame without one."""
    out = np.empty(len(frames))
    for k, f in enumerate(frames):
        lab = f.labels.get(reference)
        if lab is None or lab.energy is None:
            raise DataError(
                f"{f.source or frames.name or 'scan'} (frame {k}): no reference energy at {reference!r}; "
                f"the frame has label sets {sorted(f.labels)}"
            )
        out[k] = lab.energy
    return out


def scan_report(
    model: Any,
    frames: Dataset,
    fidelity: str | None = None,
    reference: str | None = None,
    tolerance_meV: float = 1.0,
    coordinate: np.ndarray | None = None,
) -> ScanReport:
    """The model's head `fidelity` (None: its default head) along the ordered `frames`
    against their energies at label set `reference` (default: the head's name).

    coordinate (n_frames,): the scan variable (default: `path_coordinate`, the cumulative
    RMS-displacement path length in Å). See ScanReport for what is reported.
    """
    head = model.fidelities[model.head_index(fidelity)]
    e_ref = reference_energies(frames, reference or head)  # before predicting: fail fast
    coord = path_coordinate(frames) if coordinate is None else coordinate
    return compare_scan(predict_path(model, frames, head), e_ref, coord, tolerance_meV)


def plot_scan(reports: dict[str, ScanReport], path: str | Path, title: str = "") -> Path:
    """Plot one scan for one or several models: {label: report} with the same reference.

    Top panel: energies relative to the reference minimum (meV) against the coordinate, the
    reference and every model, each model shifted by its mean error (the offset the reports'
    MAE removes). Bottom panel: each model's error with that offset removed (meV). Saves a
    PNG to `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyfid.analysis.plots import save_figure

    if not reports:
        raise ValueError("plot_scan: no reports")
    first = next(iter(reports.values()))
    for name, r in reports.items():
        if r.e_ref.shape != first.e_ref.shape or not np.allclose(r.e_ref, first.e_ref, rtol=0, atol=1e-8):
            raise ValueError(f"plot_scan: report {name!r} is of another scan (its reference energies differ)")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ref0 = first.e_ref.min()
    a1.plot(first.coordinate, (first.e_ref - ref0) * 1e3, "k-", lw=2, label="reference")
    for name, r in reports.items():
        off = np.mean(r.e_model - r.e_ref)
        a1.plot(r.coordinate, (r.e_model - off - ref0) * 1e3, ".-", label=f"{name} (MAE {r.energy_mae_meV:.1f} meV)")
        a2.plot(r.coordinate, (r.e_model - r.e_ref - off) * 1e3, ".-", label=name)
    a1.set(ylabel="E − E_min(reference) (meV)", title=title)
    a2.set(xlabel="scan coordinate", ylabel="error − mean error (meV)")
    a2.axhline(0, color="k", lw=0.5)
    a1.legend(fontsize=8)
    return save_figure(fig, path)
