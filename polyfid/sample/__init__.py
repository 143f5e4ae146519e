"""Sampling structures to label: starting structures from files, ASE names or SMILES; xTB
Langevin MD and normal-mode displacements; de-duplication; farthest-point selection of the
subset that gets expensive labels."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from polyfid.errors import ConfigError
from polyfid.sample.md import (
    XTB_MAX_Z,
    check_xtb_elements,
    one_thread,
    run_md,
    single_point,
    snapshot,
    thermalize,
    xtb_calculator,
    xtb_failures,
)
from polyfid.sample.normal_modes import normal_mode_samples, relax
from polyfid.sample.select import deduplicate, farthest_point, inverse_distance_descriptor
from polyfid.sample.structures import SourceError, from_smiles, load_structures

__all__ = [
    "XTB_MAX_Z",
    "SampleSettings",
    "SourceError",
    "check_starts",
    "check_xtb_elements",
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
    "xtb_failures",
]


@dataclass
class SampleSettings:
    """What `sample` does with each starting structure.

    md_frames: frames per temperature from Langevin MD (0: none), one every `stride` steps of
    `timestep_fs` after `equilibration` steps; normal_modes: displaced structures per
    temperature (0: none); method: the xTB level driving both (``gfn1-xtb``/``gfn2-xtb``);
    dedup_tolerance: RMS descriptor distance (1/Å) below which a structure is a duplicate
    (None: keep all). Values out of range are a ConfigError naming the field, when the settings
    are made and again when `sample` uses them.
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first field out of range."""
        def number(name: str, value, lo: float, strict: bool) -> None:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < lo or (strict and value == lo):
                raise ConfigError(f"SampleSettings.{name}: must be a finite number {'>' if strict else '>='} "
                                  f"{lo:g}, got {value!r}")

        def whole(name: str, value, lo: int) -> None:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
                raise ConfigError(f"SampleSettings.{name}: must be a whole number >= {lo}, got {value!r}")

        temps = self.temperatures_K
        if isinstance(temps, (numbers.Real, str)) or not list(temps):
            raise ConfigError(f"SampleSettings.temperatures_K: must be a non-empty list of temperatures (K), "
                              f"got {temps!r}")
        for t in temps:
            number("temperatures_K", t, 0.0, strict=True)
        whole("md_frames", self.md_frames, 0)
        whole("stride", self.stride, 1)
        whole("equilibration", self.equilibration, 0)
        number("timestep_fs", self.timestep_fs, 0.0, strict=True)
        number("friction_per_fs", self.friction_per_fs, 0.0, strict=False)
        whole("normal_modes", self.normal_modes, 0)
        whole("seed", self.seed, 0)
        if not isinstance(self.method, str) or self.method.lower() not in ("gfn1-xtb", "gfn2-xtb"):
            raise ConfigError(f"SampleSettings.method: expected gfn1-xtb or gfn2-xtb, got {self.method!r}")
        if self.dedup_tolerance is not None:
            number("dedup_tolerance", self.dedup_tolerance, 0.0, strict=False)


def _name(start, n: int) -> str:
    return str(start.info.get("source") or f"structure {n}")


def check_starts(starts: Sequence, method: str = "gfn2-xtb") -> None:
    """Before any xTB calculation: LevelError naming the structure for an element xTB has no
    parameters for, or a charge and multiplicity that do not fit its electron count."""
    from polyfid.label.runner import check_electrons

    for n, start in enumerate(starts):
        check_xtb_elements(start, _name(start, n), method)
    check_electrons([
        SimpleNamespace(numbers=start.numbers, charge=int(start.info.get("charge", 0)),
                        multiplicity=int(start.info.get("multiplicity", 1)), source=_name(start, n))
        for n, start in enumerate(starts)
    ])


def sample(starts: Sequence, settings: SampleSettings | None = None) -> list:
    """Structures sampled from each of `starts` (ASE Atoms), labelled with the xTB energy (eV)
    and forces (eV/Å) of the sampler, de-duplicated. With neither MD nor normal modes asked
    for, the starting structures themselves are returned (de-duplicated).

    Before any calculation, a structure xTB cannot compute (an element beyond Rn, a charge and
    multiplicity of the wrong parity) is a LevelError naming it; an xTB calculation failing on
    the way is a SourceError naming the structure (and the temperature and MD step)."""
    s = settings or SampleSettings()
    s.validate()
    starts = list(starts)
    if s.md_frames or s.normal_modes:
        check_starts(starts, s.method)
    out: list = []
    for n, start in enumerate(starts):
        if not s.md_frames and not s.normal_modes:
            out.append(start)
            continue
        name = _name(start, n)
        charge = int(start.info.get("charge", 0))
        mult = int(start.info.get("multiplicity", 1))
        calc = xtb_calculator(s.method, charge, mult)
        keep = {k: start.info[k] for k in ("charge", "multiplicity", "smiles", "source") if k in start.info}
        new: list = []
        if s.md_frames:
            for t in s.temperatures_K:
                new += run_md(t, s.md_frames, s.stride, s.equilibration, s.timestep_fs, s.friction_per_fs,
                              s.seed + 1000 * n, calc=calc, atoms=start, name=name)
        if s.normal_modes:
            with xtb_failures(f"{name}: normal-mode sampling ({s.method})"):
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
