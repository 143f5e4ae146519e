"""Molecular dynamics with GFN-xTB (tblite's ASE calculator) for sampling structures.

Langevin MD at a temperature, seeded by (seed, temperature): the same settings give the same
frames. Each frame carries the xTB energy (eV) and forces (eV/Å) of the MD step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from polyfid.errors import ConfigError, LevelError, SourceError
from polyfid.label.levels import XTB_METHODS

#: heaviest element GFN1-xTB and GFN2-xTB have parameters for (radon)
XTB_MAX_Z = 86


def check_xtb_elements(atoms, name: str, method: str = "gfn2-xtb") -> None:
    """LevelError naming the structure and the element if `atoms` holds an element xTB has no
    parameters for (GFN1/GFN2-xTB: Z from 1 to 86)."""
    from ase.data import chemical_symbols

    bad = sorted({int(z) for z in np.asarray(atoms.numbers) if not 1 <= int(z) <= XTB_MAX_Z})
    if bad:
        names = ", ".join(f"{chemical_symbols[z] if 0 <= z < len(chemical_symbols) else '?'} (Z={z})"
                          for z in bad)
        raise LevelError(f"{name}: {method} has no parameters for {names}; GFN1/GFN2-xTB cover Z = 1 to "
                         f"{XTB_MAX_Z} (H to Rn)")


@contextlib.contextmanager
def xtb_failures(what: str):
    """Turn a failed xTB calculation (ASE's CalculatorError: tblite's InputError or
    CalculationFailed) inside the block into a SourceError starting with `what`."""
    from ase.calculators.calculator import CalculatorError

    try:
        yield
    except CalculatorError as e:
        raise SourceError(f"{what}: the xTB calculation failed ({type(e).__name__}: {e})") from e


def xtb_calculator(method: str = "GFN2-xTB", charge: int = 0, multiplicity: int = 1):
    """tblite's ASE calculator, silent; `method` ``GFN2-xTB``/``gfn2-xtb`` or the GFN1 pair."""
    from tblite.ase import TBLite

    if method.lower() not in XTB_METHODS:
        raise ConfigError(f"sampling method {method!r}: expected one of {', '.join(XTB_METHODS)}")
    method = XTB_METHODS[method.lower()]
    return TBLite(method=method, charge=charge, multiplicity=multiplicity, verbosity=0)


@contextlib.contextmanager
def one_thread():
    """Run tblite on one OpenMP thread (the molecules are tiny).

    tblite and torch both load ``libgomp.so.1``; once torch is loaded, tblite shares its OpenMP
    runtime, so OMP_NUM_THREADS set later has no effect and tblite runs with torch's thread
    count, whose spin-waiting threads slow it down many times on a busy machine. The thread
    count of the calling thread is set to 1 here and restored afterwards.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def single_point(atoms, calc) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) of `atoms` with `calc` (atoms are not modified)."""
    a = atoms.copy()
    a.calc = calc
    with one_thread():
        return float(a.get_potential_energy()), np.array(a.get_forces())


def thermalize(atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at `temperature_K`, without centre-of-mass motion or rotation
    (a single atom has no internal motion: its momentum is zero)."""
    if len(atoms) == 1 and not atoms.pbc.any():
        atoms.set_momenta(np.zeros((1, 3)))
        return
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:  # older ASE
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        with np.errstate(divide="ignore", invalid="ignore"):  # a linear molecule: one moment of inertia is 0
            ZeroRotation(atoms)


def snapshot(atoms, energy: float | None, forces: np.ndarray | None, info: dict[str, Any]):
    """A copy of `atoms` with `info` added and its energy/forces on a SinglePointCalculator."""
    from ase.calculators.singlepoint import SinglePointCalculator

    a = atoms.copy()
    a.info.update(info)
    if energy is not None:
        a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
    return a


def run_md(
    temperature_K: float,
    n_frames: int,
    stride: int = 10,
    equilibration: int = 200,
    timestep_fs: float = 0.5,
    friction_per_fs: float = 0.02,
    seed: int = 0,
    calc=None,
    atoms=None,
    name: str | None = None,
) -> list:
    """Langevin MD of `atoms` (default: ethanol) at `temperature_K` with xTB forces; returns
    `n_frames` ASE Atoms, one every `stride` steps after `equilibration` steps, each with a
    SinglePointCalculator holding its xTB energy (eV) and forces (eV/Å) and ``info`` keys
    ``temperature_K``, ``seed``, ``md_step``. Reproducible: the RNG is seeded by (seed, T).

    A failed xTB calculation is a SourceError naming the structure (`name`, default
    ``atoms.info["source"]``), the temperature and the MD step."""
    from ase import units
    from ase.build import molecule
    from ase.md.langevin import Langevin

    if not (np.isfinite(temperature_K) and temperature_K > 0):
        raise ConfigError(f"MD temperature: must be a finite number > 0 K, got {temperature_K}")
    if not (np.isfinite(timestep_fs) and timestep_fs > 0):
        raise ConfigError(f"MD time step: must be a finite number > 0 fs, got {timestep_fs}")
    if not (np.isfinite(friction_per_fs) and friction_per_fs >= 0):
        raise ConfigError(f"MD friction: must be a finite number >= 0 per fs, got {friction_per_fs}")
    if int(n_frames) < 0 or int(stride) < 1 or int(equilibration) < 0:
        raise ConfigError(f"MD frames {n_frames}, stride {stride}, equilibration {equilibration}: need frames >= 0, "
                          "stride >= 1 and equilibration >= 0")
    atoms = molecule("CH3CH2OH") if atoms is None else atoms.copy()
    name = name or atoms.info.get("source") or "structure"
    atoms.calc = calc if calc is not None else xtb_calculator()
    rng = np.random.default_rng([int(seed), int(round(temperature_K))])
    thermalize(atoms, temperature_K, rng)
    dyn = Langevin(
        atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
        fixcm=False, rng=rng,
    )
    frames = []
    info = {"temperature_K": float(temperature_K), "seed": int(seed), "sampler": "md"}
    from ase.calculators.calculator import CalculatorError

    try:
        with one_thread():
            if equilibration:
                dyn.run(equilibration)
            for k in range(n_frames):
                dyn.run(stride)
                step = equilibration + (k + 1) * stride
                e, f = atoms.get_potential_energy(), atoms.get_forces()
                frames.append(snapshot(atoms, float(e), np.array(f), info | {"md_step": step}))
    except CalculatorError as e:
        raise SourceError(f"{name}: the xTB calculation failed in MD at {temperature_K:g} K, step {dyn.nsteps} "
                          f"({type(e).__name__}: {e})") from e
    return frames
