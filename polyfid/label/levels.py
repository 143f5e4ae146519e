"""Levels of theory and single-point calculations with real engines.

A level is a string: ``gfn1-xtb`` / ``gfn2-xtb`` (tblite), or ``METHOD/BASIS`` for PySCF
with METHOD one of ``hf``, ``mp2``, ``ccsd``, ``ccsd(t)`` or a DFT functional PySCF knows
(``pbe/def2-svp``, ``b3lyp/6-31g*``). Results are converted at the door: energies in eV,
forces in eV/Å.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
from ase.units import Bohr, Hartree

from polyfid.errors import CalculationFailed, LevelError

XTB_METHODS = {"gfn1-xtb": "GFN1-xTB", "gfn2-xtb": "GFN2-xTB"}
WAVEFUNCTION_METHODS = ("hf", "mp2", "ccsd", "ccsd(t)")
#: methods whose analytic nuclear gradients PySCF provides
ANALYTIC_GRADIENTS = ("hf", "mp2", "ccsd", "dft")


@dataclass(frozen=True)
class Level:
    """A parsed level: engine ('tblite' | 'pyscf'), method, basis (PySCF only)."""

    name: str
    engine: str
    method: str
    basis: str | None = None

    @property
    def kind(self) -> str:
        """'xtb', 'hf', 'mp2', 'ccsd', 'ccsd(t)' or 'dft'."""
        if self.engine == "tblite":
            return "xtb"
        return self.method if self.method in WAVEFUNCTION_METHODS else "dft"

    @property
    def has_forces(self) -> bool:
        return self.kind == "xtb" or self.kind in ANALYTIC_GRADIENTS


def parse_level(text: str) -> Level:
    """Parse ``gfn2-xtb`` or ``METHOD/BASIS`` (case-insensitive) into a Level."""
    name = text.strip().lower()
    if name in XTB_METHODS:
        return Level(name, "tblite", XTB_METHODS[name])
    if "/" not in name:
        raise LevelError(
            f"level {text!r}: expected gfn1-xtb, gfn2-xtb or METHOD/BASIS (e.g. mp2/cc-pvdz, pbe/def2-svp)"
        )
    method, basis = (s.strip() for s in name.split("/", 1))
    if not method or not basis:
        raise LevelError(f"level {text!r}: method and basis must both be given, as in mp2/cc-pvdz")
    if method not in WAVEFUNCTION_METHODS:
        from pyscf import dft

        try:
            dft.libxc.parse_xc(method)
        except (KeyError, ValueError) as e:
            raise LevelError(f"level {text!r}: {method!r} is neither hf/mp2/ccsd/ccsd(t) nor a functional "
                             f"PySCF knows ({e})") from None
    why = _basis_problem(basis)
    if why:
        raise LevelError(f"level {text!r}: basis {basis!r} {why}")
    return Level(name, "pyscf", method, basis)


@functools.cache
def _basis_problem(basis: str) -> str | None:
    """Why PySCF cannot use the basis set `basis` (None: it can), found by building a hydrogen
    atom with it (milliseconds; cached). A basis PySCF knows that has no hydrogen passes."""
    from pyscf import gto
    from pyscf.lib.exceptions import BasisNotFoundError

    try:
        with warnings.catch_warnings():  # "Basis may be available in basis-set-exchange"
            warnings.simplefilter("ignore")
            gto.M(atom="H 0 0 0", basis=basis, spin=1, verbose=0)
    except BasisNotFoundError as e:
        if "not found for H" in str(e):  # a basis PySCF has, without hydrogen
            return None
        return ("is not a basis set PySCF knows (e.g. sto-3g, 6-31g*, cc-pvdz, aug-cc-pvtz, def2-svp, "
                f"def2-tzvp; {str(e).splitlines()[0]})")
    except Exception as e:  # a malformed name PySCF's basis parser cannot read
        return f"cannot be read by PySCF ({type(e).__name__}: {e})"
    return None


def compute(
    level: Level | str,
    numbers: np.ndarray,
    positions: np.ndarray,
    forces: bool = False,
    charge: int = 0,
    multiplicity: int = 1,
) -> tuple[float, np.ndarray | None]:
    """Energy (eV) and, if asked, forces (N, 3) eV/Å of one structure (positions in Å).

    Raises CalculationFailed when the engine gives no converged result, LevelError when
    forces are asked of a method without analytic gradients.
    """
    lv = parse_level(level) if isinstance(level, str) else level
    numbers = np.asarray(numbers, dtype=int)
    positions = np.asarray(positions, dtype=float)
    if forces and not lv.has_forces:
        raise LevelError(f"level {lv.name!r}: PySCF has no analytic gradients for {lv.method}; ask for energies only")
    if len(numbers) > 1:
        d = np.linalg.norm(positions[:, None] - positions[None], axis=-1) + np.eye(len(numbers)) * 1e9
        if d.min() < 0.3:
            i, j = np.unravel_index(np.argmin(d), d.shape)
            raise CalculationFailed(f"atoms {i} and {j} overlap ({d.min():.3f} Å apart)")
    if lv.engine == "tblite":
        return _xtb(lv, numbers, positions, forces, charge, multiplicity)
    return _pyscf(lv, numbers, positions, forces, charge, multiplicity)


def _xtb(lv: Level, numbers, positions, forces, charge, multiplicity):
    from tblite.interface import Calculator

    calc = Calculator(lv.method, numbers, positions / Bohr, charge=float(charge), uhf=multiplicity - 1)
    calc.set("verbosity", 0)
    try:
        res = calc.singlepoint()
    except RuntimeError as e:
        raise CalculationFailed(f"tblite {lv.method}: {e}") from None
    energy = float(res.get("energy")) * Hartree
    f = -np.asarray(res.get("gradient")) * (Hartree / Bohr) if forces else None
    return energy, f


def _pyscf(lv: Level, numbers, positions, forces, charge, multiplicity):
    from pyscf import gto

    mol = gto.M(
        atom=[(int(z), tuple(p)) for z, p in zip(numbers, positions)],
        basis=lv.basis,
        charge=charge,
        spin=multiplicity - 1,
        unit="Angstrom",
        verbose=0,
    )
    restricted = multiplicity == 1
    kind = lv.kind
    if kind == "dft":
        from pyscf import dft

        mf = (dft.RKS if restricted else dft.UKS)(mol)
        mf.xc = lv.method
    else:
        from pyscf import scf

        mf = (scf.RHF if restricted else scf.UHF)(mol)
    e = mf.kernel()
    if not mf.converged:
        raise CalculationFailed(f"SCF did not converge ({lv.name})")
    post = None
    if kind == "mp2":
        post = mf.MP2().run()
        e = post.e_tot
    elif kind in ("ccsd", "ccsd(t)"):
        post = mf.CCSD().run()
        if not post.converged:
            raise CalculationFailed(f"CCSD did not converge ({lv.name})")
        e = post.e_tot + (post.ccsd_t() if kind == "ccsd(t)" else 0.0)
    f = None
    if forces:
        grad = (post if post is not None else mf).nuc_grad_method().kernel()
        f = -np.asarray(grad) * (Hartree / Bohr)
    return float(e) * Hartree, f
