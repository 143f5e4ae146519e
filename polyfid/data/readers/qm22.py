"""Reader for QM-22 multi-frame xyz files (energy and gradient per frame).

Source: QM-22, Bowman group, Emory University (https://github.com/jmbowma/QM-22; Bowman et al.,
"The MD17 datasets from the perspective of datasets for gas-phase 'small' molecule potentials",
J. Chem. Phys. 156, 240901 (2022), https://doi.org/10.1063/5.0089200).

Each frame is::

    n_atoms
    energy                          (Hartree)
    El  x  y  z  gx  gy  gz         (n_atoms lines: Å, then the GRADIENT dE/dx in Hartree/bohr)

Forces are stored as −gradient, converted to eV/Å. Blank lines after the last frame are allowed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.units import energy_factor, force_factor, length_factor
from polyfid.errors import DataError


def _header_int(text: str, path: Path, line: int, frame: int) -> int:
    try:
        n = int(text.strip())
    except ValueError:
        hint = ""
        if frame > 0 and len(text.split()) == 7:
            hint = f" (looks like an atom line: is the atom count of frame {frame - 1} too small?)"
        raise DataError(
            f"{path}: line {line} (frame {frame}): expected the atom count, got {text.strip()[:60]!r}{hint}"
        ) from None
    if n <= 0:
        raise DataError(f"{path}: line {line} (frame {frame}): atom count must be positive, got {n}")
    return n


def read_qm22(
    path: str | Path,
    fidelity: str | None = None,
    *,
    energy_unit: str = "hartree",
    gradient_unit: str = "hartree/bohr",
    length_unit: str = "A",
    gradient: bool = True,
) -> Dataset:
    """Read a QM-22 multi-frame xyz file (source in the module docstring).

    Parameters
    ----------
    path: the ``.xyz`` file.
    fidelity: fidelity name for the labels (default ``"default"``).
    energy_unit: unit of the energy line (default Hartree).
    gradient_unit: unit of the last three columns (default Hartree/bohr).
    length_unit: unit of the coordinates (default Å).
    gradient: True (default) when the last three columns are dE/dx; False if they are already forces.

    Returns a Dataset of frames with positions (n, 3) Å, energy eV and forces (n, 3) eV/Å
    (= −gradient), ``source = f"{path}:{frame}"``. Malformed input (truncated file, wrong atom count,
    non-numeric fields) raises DataError naming the file, line and frame.
    """
    from ase.data import atomic_numbers

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = fidelity or "default"
    try:
        e_fac = energy_factor(energy_unit)
        g_fac = force_factor(gradient_unit) * (-1.0 if gradient else 1.0)
        r_fac = length_factor(length_unit)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text file: {err}") from None
    while lines and not lines[-1].strip():
        lines.pop()

    frames: list[Frame] = []
    n_lines = len(lines)
    start = 0
    while start < n_lines:
        frame = len(frames)
        n = _header_int(lines[start], path, start + 1, frame)
        if start + 2 + n > n_lines:
            have = max(n_lines - start - 2, 0)
            raise DataError(
                f"{path}: frame {frame} (header at line {start + 1}) is truncated: the header says {n} atoms "
                f"but the file ends after {have} atom line(s)"
            )
        try:
            energy = float(lines[start + 1])
        except ValueError:
            raise DataError(
                f"{path}: line {start + 2} (frame {frame}): expected the energy, got {lines[start + 1].strip()[:60]!r}"
            ) from None
        rows = [ln.split() for ln in lines[start + 2 : start + 2 + n]]
        for k, row in enumerate(rows):
            if len(row) != 7:
                hint = " (is the atom count in the header right?)" if len(row) < 4 else ""
                raise DataError(
                    f"{path}: line {start + 3 + k} (frame {frame}, atom {k}): expected 7 fields "
                    f"'El x y z gx gy gz', got {len(row)}{hint}: {lines[start + 2 + k].strip()[:80]!r}"
                )
        try:
            values = np.array([row[1:] for row in rows], dtype=np.float64)
        except ValueError:
            for k, row in enumerate(rows):
                try:
                    [float(v) for v in row[1:]]
                except ValueError:
                    raise DataError(
                        f"{path}: line {start + 3 + k} (frame {frame}, atom {k}): non-numeric field in "
                        f"{lines[start + 2 + k].strip()[:80]!r}"
                    ) from None
            raise
        try:
            numbers = [atomic_numbers[row[0]] for row in rows]
        except KeyError as err:
            raise DataError(f"{path}: frame {frame} (line {start + 3}...): unknown element symbol {err}") from None
        frames.append(
            Frame(
                numbers=np.array(numbers),
                positions=values[:, :3] * r_fac,
                labels={name: Labels(energy=energy * e_fac, forces=values[:, 3:] * g_fac)},
                source=f"{path}:{frame}",
            )
        )
        start += n + 2
    return Dataset(frames, name=path.stem)
