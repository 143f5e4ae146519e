"""Molecular dynamics with GFN-xTB (tblite's ASE calculator) for sampling structures.

Langevin MD at a temperature, seeded by (seed, temperature): the same settings give the same
frames. Each frame carries the xTB energy (eV) and forces (eV/Å) of the MD step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from polyfid.label.levels import XTB_METHODS


def xtb_calculator(method: str = "GFN2-xTB", charge: int = 0, multiplicity: int = 1):
    """tblite's ASE calculator, silent; `method` ``GFN2-xTB``/``gfn2-xtb`` or the GFN1 pair."""
    from tblite.ase import TBLite

    method = XTB_METHODS.get(method.lower(), method)
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
    """Maxwell-Boltzmann momenta at `temperature_K`, without centre-of-mass motion or rotation."""
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:  # older ASE
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
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
) -> list:
    """Langevin MD of `atoms` (default: ethanol) at `temperature_K` with xTB forces; returns
    `n_frames` ASE Atoms, one every `stride` steps after `equilibration` steps, each with a
    SinglePointCalculator holding its xTB energy (eV) and forces (eV/Å) and ``info`` keys
    ``temperature_K``, ``seed``, ``md_step``. Reproducible: the RNG is seeded by (seed, T)."""
    from ase import units
    from ase.build import molecule
    from ase.md.langevin import Langevin

    atoms = molecule("CH3CH2OH") if atoms is None else atoms.copy()
    atoms.calc = calc if calc is not None else xtb_calculator()
    rng = np.random.default_rng([int(seed), int(round(temperature_K))])
    thermalize(atoms, temperature_K, rng)
    dyn = Langevin(
        atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
        fixcm=False, rng=rng,
    )
    frames = []
    info = {"temperature_K": float(temperature_K), "seed": int(seed), "sampler": "md"}
    with one_thread():
        if equilibration:
            dyn.run(equilibration)
        for k in range(n_frames):
            dyn.run(stride)
            step = equilibration + (k + 1) * stride
            e, f = atoms.get_potential_energy(), atoms.get_forces()
            frames.append(snapshot(atoms, float(e), np.array(f), info | {"md_step": step}))
    return frames
