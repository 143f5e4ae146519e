"""Sampling structures to label: starting structures from files, ASE names or SMILES; xTB
Langevin MD and normal-mode displacements; de-duplication; farthest-point selection of the
subset that gets expensive labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polyfid.sample.md import one_thread, run_md, single_point, snapshot, thermalize, xtb_calculator
from polyfid.sample.normal_modes import normal_mode_samples, relax
from polyfid.sample.select import deduplicate, farthest_point, inverse_distance_descriptor
from polyfid.sample.structures import SourceError, from_smiles, load_structures

__all__ = [
    "SampleSettings",
    "SourceError",
    "deduplicate",
    "farthest_point",
    "from_smiles",
    "inverse_distance_descriptor",
    "load_structures",
    "normal_mode_samples",
    "one_thread",
    "relax",
    "run_md",
    "sample",
    "single_point",
    "snapshot",
    "thermalize",
    "write_structures",
    "xtb_calculator",
]


@dataclass
class SampleSettings:
    """What `sample` does with each starting structure.

    md_frames: frames per temperature from Langevin MD (0: none), one every `stride` steps of
    `timestep_fs` after `equilibration` steps; normal_modes: displaced structures per
    temperature (0: none); method: the xTB level driving both (``gfn1-xtb``/``gfn2-xtb``);
    dedup_tolerance: RMS descriptor distance (1/Å) below which a structure is a duplicate
    (None: keep all).
    """

    temperatures_K: list[float] = field(default_factory=lambda: [300.0, 600.0, 1000.0])
    md_frames: int = 100
    stride: int = 10
    equilibration: int = 200
    timestep_fs: float = 0.5
    friction_per_fs: float = 0.02
    normal_modes: int = 0
    method: str = "gfn2-xtb"
    seed: int = 0
    dedup_tolerance: float | None = 1e-3


def sample(starts: Sequence, settings: SampleSettings | None = None) -> list:
    """Structures sampled from each of `starts` (ASE Atoms), labelled with the xTB energy (eV)
    and forces (eV/Å) of the sampler, de-duplicated. With neither MD nor normal modes asked
    for, the starting structures themselves are returned (de-duplicated)."""
    s = settings or SampleSettings()
    out: list = []
    for n, start in enumerate(starts):
        if not s.md_frames and not s.normal_modes:
            out.append(start)
            continue
        charge = int(start.info.get("charge", 0))
        mult = int(start.info.get("multiplicity", 1))
        calc = xtb_calculator(s.method, charge, mult)
        keep = {k: start.info[k] for k in ("charge", "multiplicity", "smiles", "source") if k in start.info}
        new: list = []
        if s.md_frames:
            for t in s.temperatures_K:
                new += run_md(t, s.md_frames, s.stride, s.equilibration, s.timestep_fs, s.friction_per_fs,
                              s.seed + 1000 * n, calc=calc, atoms=start)
        if s.normal_modes:
            new += normal_mode_samples(start, calc, s.temperatures_K, s.normal_modes, seed=s.seed + 1000 * n)
        for a in new:
            a.info.update(keep)
            a.info["start"] = n
        out += new
    if s.dedup_tolerance is not None and len(out) > 1:
        out = [out[i] for i in deduplicate(out, s.dedup_tolerance)]
    return out


def write_structures(path: str | Path, structures: Sequence) -> Path:
    """Write `structures` to `path` (extxyz) through a temporary file, so a killed run never
    leaves half a file."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # fixed: the next write of `path` overwrites a killed one's
    ase.io.write(tmp, list(structures), format="extxyz")
    tmp.replace(path)
    return path
