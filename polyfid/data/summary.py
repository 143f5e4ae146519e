"""Summaries of a Dataset: sizes, elements, and label statistics per fidelity (eV, Å)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from polyfid.data.frame import Dataset
from polyfid.neighbors.checks import MAX_EXTENT, MIN_DISTANCE, check_frames


def summarize(dataset: Dataset, min_distance: float = MIN_DISTANCE, max_extent: float = MAX_EXTENT) -> dict[str, Any]:
    """Statistics of `dataset` as a plain dict, after the geometry checks training applies
    (`polyfid.neighbors.checks`: atoms at least `min_distance` Å apart, spanning at most
    `max_extent` Å): a frame that fails them raises GeometryError, so that it is found here
    rather than by a training run.

    Keys: ``name``, ``frames``, ``atoms`` (min/mean/max atoms per frame), ``elements`` (symbols),
    ``formulas`` (number of distinct formulas), ``fidelities``: name -> {``frames`` (frames with
    that label set), ``energies``, ``forces``, ``stress`` (counts of frames with that label),
    ``energy_per_atom_mean`` / ``_std`` (eV/atom), ``force_rms`` (RMS force component, eV/Å),
    ``force_max`` (largest |F| of an atom, eV/Å)}, ``multi_fidelity_geometries`` (frames with
    label sets at two or more fidelities), and ``merge`` (the MergeReport counts when the data set
    was made by merging files, else None). Statistics over no data are None.
    """
    from ase.data import chemical_symbols

    check_frames(dataset, min_distance, max_extent, name=dataset.name)
    n_atoms = np.array([f.n_atoms for f in dataset], dtype=np.int64)
    out: dict[str, Any] = {
        "name": dataset.name,
        "frames": len(dataset),
        "atoms": {
            "min": int(n_atoms.min()) if len(n_atoms) else None,
            "mean": float(n_atoms.mean()) if len(n_atoms) else None,
            "max": int(n_atoms.max()) if len(n_atoms) else None,
        },
        "elements": [chemical_symbols[z] for z in dataset.elements],
        "formulas": len(Counter(f.formula() for f in dataset)),
        "fidelities": {},
        "multi_fidelity_geometries": sum(1 for f in dataset if len(f.labels) > 1),
        "merge": dataset.merge_report.as_dict() if dataset.merge_report is not None else None,
    }
    for fid in dataset.fidelities:
        e_per_atom, sq_sum, n_comp, f_max = [], 0.0, 0, None
        counts = {"frames": 0, "energies": 0, "forces": 0, "stress": 0}
        for fr in dataset:
            lab = fr.labels.get(fid)
            if lab is None:
                continue
            counts["frames"] += 1
            if lab.energy is not None:
                counts["energies"] += 1
                e_per_atom.append(lab.energy / fr.n_atoms)
            if lab.forces is not None:
                counts["forces"] += 1
                sq_sum += float(np.sum(lab.forces**2))
                n_comp += lab.forces.size
                m = float(np.linalg.norm(lab.forces, axis=1).max())
                f_max = m if f_max is None else max(f_max, m)
            if lab.stress is not None:
                counts["stress"] += 1
        epa = np.array(e_per_atom)
        out["fidelities"][fid] = {
            **counts,
            "energy_per_atom_mean": float(epa.mean()) if len(epa) else None,
            "energy_per_atom_std": float(epa.std()) if len(epa) else None,
            "force_rms": float(np.sqrt(sq_sum / n_comp)) if n_comp else None,
            "force_max": f_max,
        }
    return out


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(summary: dict[str, Any]) -> str:
    """A readable text table of a :func:`summarize` result."""
    a = summary["atoms"]
    lines = [
        f"data set {summary.get('name') or '(unnamed)'}: {summary['frames']} frames, "
        f"atoms/frame {a['min']}..{a['max']} (mean {_fmt(a['mean'], '.1f')}), "
        f"{summary['formulas']} formula(s), elements {' '.join(summary['elements'])}",
    ]
    if len(summary["fidelities"]) > 1 or summary.get("merge"):
        line = f"geometries with labels at two or more fidelities: {summary['multi_fidelity_geometries']}"
        m = summary.get("merge")
        if m and m["merged_frames"]:
            twice = m["duplicate_label_sets"]
            line += (f" ({m['frames_in']} frames read, {m['merged_frames']} merged into a frame of the same geometry"
                     f"{f', {twice} label sets given twice, identical' if twice else ''})")
        lines.append(line)
    header = (
        "fidelity",
        "frames",
        "energies",
        "forces",
        "stress",
        "E/atom mean eV",
        "E/atom std eV",
        "F rms eV/A",
        "|F| max eV/A",
    )
    rows = [
        (
            fid,
            str(s["frames"]),
            str(s["energies"]),
            str(s["forces"]),
            str(s["stress"]),
            _fmt(s["energy_per_atom_mean"], ".6g"),
            _fmt(s["energy_per_atom_std"]),
            _fmt(s["force_rms"]),
            _fmt(s["force_max"]),
        )
        for fid, s in summary["fidelities"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)
