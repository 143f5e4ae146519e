"""Tables for the diagnostic: a CSV file, or the examples that ship (generated offline).

- ``diabetes``: scikit-learn's bundled diabetes data (442 patients, 10 baseline variables,
  disease progression after one year).
- ``xtb-molecules``: a materials table the project generates itself: the closed-shell molecules
  of ASE's G2 collection with composition and geometry descriptors, and their GFN2-xTB
  HOMO-LUMO gap (eV) computed with tblite. Cached as CSV (default ``~/.cache/polyfid``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polyfid.errors import DataError

EXAMPLES = ("diabetes", "xtb-molecules")
CACHE = Path.home() / ".cache" / "polyfid"


def read_table(path: str | Path, target: str, features: list[str] | None = None):
    """(X, y, feature names) from a CSV file; every used column must be numeric and finite."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read as CSV ({e})") from None
    if target not in df.columns:
        raise DataError(f"{path}: no column {target!r}; columns are {list(df.columns)}")
    cols = features or [c for c in df.columns if c != target]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; columns are {list(df.columns)}")
    for c in [*cols, target]:
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise DataError(f"{path}: column {c!r} is not numeric (e.g. {df[c].iloc[0]!r}); "
                            "encode it or leave it out with --features")
        bad = np.flatnonzero(~np.isfinite(df[c].to_numpy(dtype=float)))
        if len(bad):
            raise DataError(f"{path}: column {c!r} has a missing or non-finite value in data row {bad[0] + 1}")
    if len(df) < 20:
        raise DataError(f"{path}: {len(df)} rows; the diagnostic needs at least 20")
    return df[cols].to_numpy(dtype=float), df[target].to_numpy(dtype=float), list(cols)


def diabetes():
    """scikit-learn's diabetes table: (X, y, names, target, unit)."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return d.data, d.target, list(d.feature_names), "progression", ""


def xtb_molecules(cache: str | Path | None = None):
    """The G2 closed-shell molecules with descriptors and GFN2-xTB HOMO-LUMO gaps; (X, y, names,
    target, unit). Computed once (seconds) and cached as CSV."""
    import pandas as pd

    path = Path(cache or CACHE) / "xtb_molecules_gap.csv"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # fixed: the next write overwrites a killed one's
        make_xtb_molecules_table().to_csv(tmp, index=False)
        tmp.replace(path)
    df = pd.read_csv(path)
    names = [c for c in df.columns if c not in ("name", "gap_eV")]
    return df[names].to_numpy(float), df["gap_eV"].to_numpy(float), names, "gap_eV", "eV"


def make_xtb_molecules_table():
    """DataFrame: one row per closed-shell G2 molecule: counts of H, C, N, O, other heavy atoms;
    mean electronegativity (Pauling); radius of gyration (Å); largest interatomic distance
    (Å); number of bonded pairs (covalent radii); and the GFN2-xTB HOMO-LUMO gap (eV)."""
    import pandas as pd
    from ase.build import molecule
    from ase.collections import g2
    from ase.data import covalent_radii
    from ase.units import Bohr, Hartree
    from tblite.interface import Calculator

    from polyfid.sample.md import one_thread

    pauling = {1: 2.20, 3: 0.98, 4: 1.57, 5: 2.04, 6: 2.55, 7: 3.04, 8: 3.44, 9: 3.98, 11: 0.93, 13: 1.61,
               14: 1.90, 15: 2.19, 16: 2.58, 17: 3.16}
    rows = []
    for name in g2.names:
        a = molecule(name)
        z = a.numbers
        if len(a) < 2 or a.get_initial_magnetic_moments().any() or sum(z) % 2 or any(int(k) not in pauling for k in z):
            continue
        calc = Calculator("GFN2-xTB", z, a.positions / Bohr)
        calc.set("verbosity", 0)
        with one_thread():
            res = calc.singlepoint()
        eps, occ = np.asarray(res.get("orbital-energies")), np.asarray(res.get("orbital-occupations"))
        homo, lumo = eps[occ > 1e-3].max(), eps[occ <= 1e-3].min()
        r = a.positions
        d = np.linalg.norm(r[:, None] - r[None], axis=-1)
        rc = covalent_radii[z]
        bonded = (d < 1.2 * (rc[:, None] + rc[None])) & ~np.eye(len(a), dtype=bool)
        rows.append({
            "name": name, "n_H": int((z == 1).sum()), "n_C": int((z == 6).sum()), "n_N": int((z == 7).sum()),
            "n_O": int((z == 8).sum()), "n_other": int(((z != 1) & (z != 6) & (z != 7) & (z != 8)).sum()),
            "mean_electronegativity": float(np.mean([pauling[int(k)] for k in z])),
            "radius_of_gyration": float(np.sqrt(((r - r.mean(0)) ** 2).sum(1).mean())),
            "max_distance": float(d.max()), "n_bonds": int(bonded.sum() // 2),
            "gap_eV": float((lumo - homo) * Hartree),
        })
    return pd.DataFrame(rows)


def example(name: str):
    """(X, y, names, target, unit) of a shipped example."""
    if name == "diabetes":
        return diabetes()
    if name == "xtb-molecules":
        return xtb_molecules()
    raise DataError(f"unknown example {name!r}; examples: {', '.join(EXAMPLES)}")
