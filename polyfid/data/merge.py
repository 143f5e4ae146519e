"""Merging frames of the same geometry: one frame with a label set per fidelity.

Users hold multi-fidelity data as one file per level (PBE forces of 1000 frames in one file,
MP2 energies of 100 of those geometries in another). Every loader merges the data sets it is given
together, so the same geometry at two levels becomes one frame with two label sets, as the data
model says.

Two frames are the same geometry when they have the same atomic numbers in the same order, the
same pbc, charge and multiplicity, cells within the tolerance (or both none) and every position
within the tolerance (Å, largest component difference). Lookup is by a hash index: two fixed
random projections of the coordinates, normalised so that each moves by at most the largest
position difference, are binned at 4 x the tolerance; a frame is compared only with the frames in
the bins its projections ± tolerance reach (at most 2 per projection), so 10^5 frames merge in
seconds, also when many of them lie within a fraction of an Å of each other.

Periodic frames are compared as given: the same structure with atoms wrapped into the cell
differently (shifted by a lattice vector) is not recognised as the same geometry.

The same fidelity given twice for one geometry merges label by label: a label only one of them
has is kept, identical labels (within ENERGY_TOL eV, FORCE_TOL eV/Å, STRESS_TOL eV/Å³) are
counted as duplicates, different ones raise DataError naming both frames (file:index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from polyfid.errors import DataError

if TYPE_CHECKING:  # frame.py imports this module
    from polyfid.data.frame import Frame, Labels

#: default geometry tolerance, Å
MERGE_TOLERANCE = 1e-6
#: labels of one geometry at one level that differ by less are the same label
ENERGY_TOL = 1e-6  # eV
FORCE_TOL = 1e-5  # eV/Å
STRESS_TOL = 1e-6  # eV/Å³
_LABEL_TOL = {"energy": ENERGY_TOL, "forces": FORCE_TOL, "stress": STRESS_TOL}
_UNIT = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³"}


@dataclass
class MergeReport:
    """What a merge did: frames in and out, frames folded into an earlier frame of the same
    geometry, (geometry, fidelity) label sets given more than once (identical labels), and
    geometries that end up with labels at two or more fidelities."""

    frames_in: int = 0
    frames_out: int = 0
    merged_frames: int = 0
    duplicate_label_sets: int = 0
    multi_fidelity_geometries: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Projector:
    """Two random projections per atom count, each with Σ|w| = 1: |p(x) − p(y)| ≤ max|x − y|."""

    def __init__(self) -> None:
        self._w: dict[int, np.ndarray] = {}

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        n = positions.shape[0]
        w = self._w.get(n)
        if w is None:
            w = np.random.default_rng([1234, n]).normal(size=(2, n * 3))
            w /= np.abs(w).sum(axis=1, keepdims=True)
            self._w[n] = w
        return w @ positions.reshape(-1)


def _copy(f: Frame) -> Frame:
    """A shallow copy with its own label objects (the input stays unchanged), without re-validation."""
    g = object.__new__(type(f))
    g.__dict__.update(f.__dict__)
    g.labels = {k: type(v)(v.energy, v.forces, v.stress) for k, v in f.labels.items()}
    return g


def _group_key(f: Frame) -> tuple:
    """What must be equal exactly: atomic numbers in order, pbc, charge, multiplicity, cell or none."""
    return (f.numbers.tobytes(), f.pbc.tobytes(), int(f.charge), int(f.multiplicity), f.cell is None)


def _same_geometry(a: Frame, b: Frame, tol: float) -> bool:
    if np.max(np.abs(a.positions - b.positions)) > tol:
        return False
    return a.cell is None or bool(np.max(np.abs(a.cell - b.cell)) <= tol)


def _file(source: str) -> str:
    """The file part of a source "path:index" (the whole source if it has no index)."""
    head, sep, tail = source.rpartition(":")
    return head if sep and tail.isdigit() else source


def _merge_labels(into: Labels, new: Labels, fid: str, where_into: str, where_new: str) -> bool:
    """Fold `new` into `into` (same geometry, same fidelity); returns whether any label was
    given twice (and identical). Different values raise DataError naming both frames."""
    twice = False
    for key, tol in _LABEL_TOL.items():
        a, b = getattr(into, key), getattr(new, key)
        if b is None:
            continue
        if a is None:
            setattr(into, key, b)
            continue
        diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        if not diff <= tol:
            raise DataError(
                f"{where_new} and {where_into} hold the same geometry at fidelity {fid!r} with different {key} "
                f"(largest difference {diff:.3g} {_UNIT[key]}, tolerance {tol:g}): give each level its own "
                "fidelity name, or drop one of the two"
            )
        twice = True
    return twice


def merge_frames(frames: Sequence[Frame], tolerance: float = MERGE_TOLERANCE) -> tuple[list[Frame], MergeReport]:
    """Frames of the same geometry (within `tolerance` Å) folded into the first of them, in order
    of first appearance; the inputs are left unchanged. Returns the frames and a MergeReport."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise DataError(f"merge tolerance must be a number >= 0 (Å), got {tolerance!r}")
    tol = float(tolerance)
    # bin width of the projections: at least 2·tol, so that p ± tol reaches at most 2 bins per
    # projection; no wider, or frames close to each other (an MD trajectory) crowd into few bins
    q = max(4.0 * tol, 1e-9)
    project = _Projector()
    index: dict[tuple, list[int]] = {}
    out: list[Frame] = []
    sources: list[dict[str, str]] = []  # per output frame: fidelity -> source of its labels
    report = MergeReport(frames_in=len(frames))
    for f in frames:
        group = _group_key(f)
        p0, p1 = project(f.positions).tolist()
        near = ((group, b0, b1) for b0 in range(math.floor((p0 - tol) / q), math.floor((p0 + tol) / q) + 1)
                for b1 in range(math.floor((p1 - tol) / q), math.floor((p1 + tol) / q) + 1))
        match = next((j for key in near for j in index.get(key, ()) if _same_geometry(out[j], f, tol)), None)
        if match is None:
            j = len(out)
            out.append(_copy(f))
            sources.append(dict.fromkeys(f.labels, f.source))
            index.setdefault((group, math.floor(p0 / q), math.floor(p1 / q)), []).append(j)
            continue
        target = out[match]
        report.merged_frames += 1
        for fid, lab in f.labels.items():
            if fid in target.labels:
                if _merge_labels(target.labels[fid], lab, fid, sources[match][fid], f.source):
                    report.duplicate_label_sets += 1
            else:
                target.labels[fid] = type(lab)(lab.energy, lab.forces, lab.stress)  # its own object, as _copy
                sources[match][fid] = f.source
        if f.source and f.source not in target.source.split(" + "):
            target.source = f"{target.source} + {f.source}" if target.source else f.source
    report.frames_out = len(out)
    report.multi_fidelity_geometries = sum(1 for f in out if len(f.labels) > 1)
    return out, report


def files_per_fidelity(frames: Sequence[Frame]) -> dict[str, list[str]]:
    """fidelity -> the files (from each frame's source) whose frames carry it, in order."""
    out: dict[str, dict[str, None]] = {}
    for f in frames:
        files = [_file(s) for s in f.source.split(" + ")] if f.source else ["(unnamed)"]
        for fid in f.labels:
            for name in files:
                out.setdefault(fid, {})[name] = None
    return {k: list(v) for k, v in out.items()}
