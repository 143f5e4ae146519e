"""Unit conversion into polyfid's internal units (eV, Å), using ASE's CODATA constants."""

from __future__ import annotations

from ase import units as _u

from polyfid.errors import DataError

#: factor that converts an energy in the named unit to eV
ENERGY_UNITS: dict[str, float] = {
    "ev": 1.0,
    "mev": 1e-3,
    "hartree": _u.Hartree,
    "ha": _u.Hartree,
    "kcal/mol": _u.kcal / _u.mol,
    "kj/mol": _u.kJ / _u.mol,
    "rydberg": _u.Rydberg,
    "ry": _u.Rydberg,
}

#: factor that converts a length in the named unit to Å
LENGTH_UNITS: dict[str, float] = {"a": 1.0, "angstrom": 1.0, "bohr": _u.Bohr, "nm": 10.0}


def energy_factor(unit: str) -> float:
    """Factor taking energies in `unit` to eV. Raises DataError for an unknown unit."""
    key = unit.strip().lower().replace("ångström", "angstrom").replace("å", "a")
    if key not in ENERGY_UNITS:
        raise DataError(f"unknown energy unit {unit!r}; expected one of {sorted(ENERGY_UNITS)}")
    return ENERGY_UNITS[key]


def length_factor(unit: str) -> float:
    """Factor taking lengths in `unit` to Å. Raises DataError for an unknown unit."""
    key = unit.strip().lower().replace("ångström", "angstrom").replace("å", "a")
    if key not in LENGTH_UNITS:
        raise DataError(f"unknown length unit {unit!r}; expected one of {sorted(LENGTH_UNITS)}")
    return LENGTH_UNITS[key]


def force_factor(unit: str) -> float:
    """Factor taking forces in `unit` ("ENERGY/LENGTH", e.g. "kcal/mol/A", "hartree/bohr") to eV/Å."""
    u = unit.strip().lower()
    for sep_unit in sorted(LENGTH_UNITS, key=len, reverse=True):
        if u.endswith("/" + sep_unit):
            return energy_factor(u[: -len(sep_unit) - 1]) / length_factor(sep_unit)
    raise DataError(f"unknown force unit {unit!r}; expected ENERGY/LENGTH such as 'eV/A', 'kcal/mol/A', 'hartree/bohr'")
