"""Frames and data sets: one geometry, labels per level of theory (fidelity).

Units inside polyfid are eV and Å. Readers convert at the door.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from polyfid.data.merge import MERGE_TOLERANCE, MergeReport, merge_frames
from polyfid.errors import DataError


@dataclass
class Labels:
    """Labels of one frame at one level of theory.

    energy: total energy in eV (or None); forces: (n_atoms, 3) eV/Å (or None);
    stress: (3, 3) eV/Å³ (or None). Missing labels are normal and get masked.
    """

    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None

    def has(self, key: str) -> bool:
        return getattr(self, key) is not None


@dataclass
class Frame:
    """One geometry with labels per fidelity.

    numbers: (n,) atomic numbers; positions: (n, 3) Å; cell: (3, 3) Å rows are lattice
    vectors, or None; pbc: (3,) bool; labels: fidelity name -> Labels; source: where it came
    from ("file:index"), used in error messages; charge and multiplicity for labelling.
    """

    numbers: np.ndarray
    positions: np.ndarray
    labels: dict[str, Labels] = field(default_factory=dict)
    cell: np.ndarray | None = None
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    source: str = ""
    charge: int = 0
    multiplicity: int = 1

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self.pbc = np.asarray(self.pbc, dtype=bool).reshape(3)
        if self.cell is not None:
            self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.validate()

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    def validate(self) -> None:
        """Check shapes and finiteness; raise DataError naming the frame's source."""
        where = self.source or "frame"
        n = self.numbers.shape[0]
        if self.numbers.ndim != 1 or n == 0:
            raise DataError(
                f"{where}: expected a non-empty 1-D array of atomic numbers, got shape {self.numbers.shape}"
            )
        if np.any(self.numbers < 1) or np.any(self.numbers > 118):
            raise DataError(f"{where}: atomic numbers must lie in 1..118, got {sorted(set(self.numbers.tolist()))}")
        if self.positions.shape != (n, 3):
            raise DataError(f"{where}: positions have shape {self.positions.shape}, expected ({n}, 3) for {n} atoms")
        if not np.all(np.isfinite(self.positions)):
            raise DataError(f"{where}: positions contain NaN or inf")
        if self.pbc.any() and self.cell is None:
            raise DataError(f"{where}: periodic boundary conditions {self.pbc.tolist()} but no cell")
        for fid, lab in self.labels.items():
            if lab.energy is not None:
                lab.energy = float(lab.energy)
                if not np.isfinite(lab.energy):
                    raise DataError(f"{where}: fidelity {fid!r}: energy is {lab.energy}")
            if lab.forces is not None:
                lab.forces = np.asarray(lab.forces, dtype=np.float64)
                if lab.forces.shape != (n, 3):
                    raise DataError(
                        f"{where}: fidelity {fid!r}: forces have shape {lab.forces.shape}, expected ({n}, 3)"
                    )
                if not np.all(np.isfinite(lab.forces)):
                    raise DataError(f"{where}: fidelity {fid!r}: forces contain NaN or inf")
            if lab.stress is not None:
                lab.stress = np.asarray(lab.stress, dtype=np.float64)
                if lab.stress.size == 6:  # Voigt xx yy zz yz xz xy
                    xx, yy, zz, yz, xz, xy = lab.stress.reshape(6)
                    lab.stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
                if lab.stress.shape != (3, 3) or not np.all(np.isfinite(lab.stress)):
                    raise DataError(f"{where}: fidelity {fid!r}: stress must be a finite 3x3 or Voigt 6 array")

    def formula(self) -> str:
        from ase.symbols import Symbols

        return Symbols(self.numbers).get_chemical_formula()


class Dataset(Sequence[Frame]):
    """An ordered collection of frames; the same geometry at two levels is one frame
    (`Dataset.merge`, which every loader applies to data sets given together)."""

    def __init__(self, frames: Iterable[Frame], name: str = "") -> None:
        self.frames = list(frames)
        self.name = name
        #: what the merge that made this data set did (None: not made by a merge)
        self.merge_report: MergeReport | None = None

    @classmethod
    def merge(cls, datasets: Iterable[Dataset], tolerance: float | None = MERGE_TOLERANCE,
              name: str = "") -> Dataset:
        """The frames of `datasets`, in order, with frames of the same geometry (positions within
        `tolerance` Å; see polyfid.data.merge) folded into one frame that carries every label
        set. The same fidelity twice for one geometry: identical labels merge (counted in
        `merge_report`), different ones raise DataError naming both frames. `tolerance=None`
        concatenates without merging. The input frames are left unchanged."""
        sets = list(datasets)
        frames = [f for ds in sets for f in ds]
        name = name or " + ".join(ds.name for ds in sets if ds.name)
        if tolerance is None:
            return cls(frames, name=name)
        merged, report = merge_frames(frames, tolerance)
        out = cls(merged, name=name)
        out.merge_report = report
        return out

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, idx):  # type: ignore[override]
        if isinstance(idx, (slice, np.ndarray, list)):
            sel = np.arange(len(self.frames))[idx] if isinstance(idx, slice) else np.asarray(idx)
            return Dataset([self.frames[int(i)] for i in sel], name=self.name)
        return self.frames[idx]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __add__(self, other: Dataset) -> Dataset:
        return Dataset(self.frames + other.frames, name=self.name or other.name)

    @property
    def fidelities(self) -> list[str]:
        """Fidelity names in order of first appearance."""
        seen: dict[str, None] = {}
        for f in self.frames:
            for k in f.labels:
                seen.setdefault(k, None)
        return list(seen)

    @property
    def elements(self) -> list[int]:
        """Sorted atomic numbers present."""
        if not self.frames:
            return []
        return sorted(set(np.concatenate([f.numbers for f in self.frames]).tolist()))

    def rename_fidelity(self, old: str, new: str) -> Dataset:
        """Return a data set whose label set `old` is called `new` (frames are shared)."""
        for f in self.frames:
            if old in f.labels:
                f.labels[new] = f.labels.pop(old)
        return self

    def select_labels(self, fidelity: str, use: Sequence[str]) -> Dataset:
        """Drop the labels of `fidelity` not named in `use` (e.g. ["energy"])."""
        unknown = set(use) - {"energy", "forces", "stress"}
        if unknown:
            raise DataError(f"{self.name}: unknown label kind(s) {sorted(unknown)}; expected energy, forces, stress")
        for f in self.frames:
            lab = f.labels.get(fidelity)
            if lab is None:
                continue
            for key in ("energy", "forces", "stress"):
                if key not in use:
                    setattr(lab, key, None)
        return self

    def restrict(self, fidelities: Sequence[str]) -> Dataset:
        """A data set of the frames with their labels at `fidelities` only; frames left
        without labels are dropped (frames and labels are shared, not copied)."""
        out = []
        for f in self.frames:
            labels = {k: v for k, v in f.labels.items() if k in fidelities}
            if labels:
                out.append(replace(f, labels=labels))
        return Dataset(out, name=self.name)

    def delta(self, target: str, base: str) -> Dataset:
        """The frames labelled at both levels, with labels target − base under the name
        `target` (energies where both have energies, forces where both have forces): the
        data of a Δ model."""
        out = []
        for f in self.frames:
            t, b = f.labels.get(target), f.labels.get(base)
            if t is None or b is None:
                continue
            e = t.energy - b.energy if t.energy is not None and b.energy is not None else None
            fo = t.forces - b.forces if t.forces is not None and b.forces is not None else None
            if e is not None or fo is not None:
                out.append(replace(f, labels={target: Labels(energy=e, forces=fo)}))
        return Dataset(out, name=self.name)

    def count(self, fidelity: str, key: str) -> int:
        """Number of frames that carry label `key` at `fidelity`."""
        return sum(1 for f in self.frames if fidelity in f.labels and f.labels[fidelity].has(key))
