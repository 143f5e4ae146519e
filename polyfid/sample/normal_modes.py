"""Normal-mode sampling: random displacements along the harmonic modes of a relaxed structure.

The structure is relaxed (BFGS) and its Hessian taken by central finite differences of the
forces (``ase.vibrations.Vibrations``). Each displaced structure draws the mass-weighted mode
coordinates from the classical Boltzmann distribution at temperature T, q_k ~ N(0, kT/ω_k²),
and moves the atoms by M^{-1/2} Σ_k q_k e_k; modes with |ω| below a threshold (translations,
rotations) are left out. As in ANI's normal-mode sampling, this covers the anharmonic well
about the minimum without running dynamics.
"""

from __future__ import annotations

import tempfile

import numpy as np

from polyfid.sample.md import one_thread, single_point, snapshot


def relax(atoms, calc, fmax: float = 0.01, steps: int = 500):
    """A copy of `atoms` relaxed with BFGS to max force `fmax` (eV/Å)."""
    from ase.optimize import BFGS

    a = atoms.copy()
    a.calc = calc
    with one_thread():
        BFGS(a, logfile=None).run(fmax=fmax, steps=steps)
    return a


def harmonic_modes(atoms, calc, delta: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(ω² in eV/(Å² amu), (3N, N, 3) mass-weighted eigenvectors) at `atoms`' geometry."""
    from ase.vibrations import Vibrations

    a = atoms.copy()
    a.calc = calc
    with tempfile.TemporaryDirectory() as tmp, one_thread():
        vib = Vibrations(a, name=f"{tmp}/vib", delta=delta, nfree=2)
        vib.run()
        hessian = vib.get_vibrations().get_hessian_2d()  # eV/Å²
    m = np.repeat(a.get_masses(), 3)
    hw = hessian / np.sqrt(np.outer(m, m))
    w2, vec = np.linalg.eigh(0.5 * (hw + hw.T))
    return w2, vec.T.reshape(-1, len(a), 3)


def normal_mode_samples(
    atoms,
    calc,
    temperatures_K: list[float],
    n_per_temperature: int,
    seed: int = 0,
    relax_first: bool = True,
    min_frequency_cm: float = 50.0,
) -> list:
    """`n_per_temperature` displaced copies of `atoms` per temperature, each labelled with
    `calc`'s energy (eV) and forces (eV/Å); ``info`` holds ``temperature_K``, ``sampler``."""
    from ase import units

    base = relax(atoms, calc) if relax_first else atoms.copy()
    w2, modes = harmonic_modes(base, calc)
    # ω in cm⁻¹ from ω² in eV/(Å² amu): ħω = ħ sqrt(ω²) with ASE's unit system
    freq_cm = np.sign(w2) * np.sqrt(np.abs(w2)) * units._hbar * 1e10 / np.sqrt(units._amu * units._e) / units.invcm
    keep = freq_cm > min_frequency_cm
    w2, modes = w2[keep], modes[keep]
    inv_sqrt_m = 1.0 / np.sqrt(base.get_masses())[:, None]
    out = []
    for t in temperatures_K:
        rng = np.random.default_rng([int(seed), int(round(t)), 7])
        kt = units.kB * t
        for k in range(n_per_temperature):
            q = rng.normal(size=len(w2)) * np.sqrt(kt / w2)
            a = base.copy()
            a.positions = base.positions + inv_sqrt_m * np.einsum("k,kni->ni", q, modes)
            e, f = single_point(a, calc)
            out.append(snapshot(a, e, f, {"temperature_K": float(t), "seed": int(seed), "sampler": "normal_modes",
                                          "index": k}))
    return out
