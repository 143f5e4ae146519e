"""Which low level should the multi-fidelity demo use? Cost against force gap to MP2/cc-pVDZ.

Ethanol structures from GFN2-xTB Langevin MD (the demo's sampler, other seeds) are labelled with
energies and forces at each candidate level and at MP2/cc-pVDZ (PySCF, tblite), one calculation
per process and one thread each. For each candidate: the median seconds of one energy+forces
calculation and its force MAE / RMSE from MP2 (the gap a multi-fidelity model has to close with
the few MP2 energies). Writes results/low_level_choice.json (machine, date, command).

    python benchmarks/low_level_choice.py [--n-per-temperature 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT, DEFAULT_WORK, cpu_model  # noqa: E402

CANDIDATES = ["gfn1-xtb", "gfn2-xtb", "hf/sto-3g", "hf/6-31g", "pbe/sto-3g", "pbe/6-31g", "pbe/def2-svp",
              "r2scan/def2-svp", "b3lyp/6-31g"]
REFERENCE = "mp2/cc-pvdz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-per-temperature", type=int, default=8, help="structures per MD temperature (300, 600, "
                    "1000 K)")
    ap.add_argument("--levels", nargs="+", default=CANDIDATES)
    ap.add_argument("--workers", type=int, default=2, help="calculations at once (one thread each)")
    ap.add_argument("--work", default=str(DEFAULT_WORK / "low_level_choice"), help="structures and label store")
    ap.add_argument("--out", default=str(DEFAULT_OUT / "low_level_choice.json"))
    args = ap.parse_args(argv)

    import ase.io

    from polyfid.data.readers.ase_io import frame_from_atoms
    from polyfid.label import LabelStore, label_frames
    from polyfid.label.store import frame_key
    from polyfid.sample import SampleSettings, load_structures, sample, write_structures

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    xyz = work / f"ethanol_{args.n_per_temperature}.extxyz"
    if not xyz.exists():
        frames = sample(load_structures("CH3CH2OH"), SampleSettings(
            md_frames=args.n_per_temperature, temperatures_K=[300.0, 600.0, 1000.0], stride=10, equilibration=200,
            method="gfn2-xtb", seed=2000))
        write_structures(xyz, frames)
    frames = [frame_from_atoms(a, f"{xyz}:{i}") for i, a in enumerate(ase.io.read(xyz, ":"))]
    store = work / "labels.sqlite"
    wall = {}
    for level in [REFERENCE, *args.levels]:
        t0 = time.perf_counter()
        rep = label_frames(frames, level, store, forces=True, workers=args.workers, progress=False)
        wall[level] = time.perf_counter() - t0
        print(rep, flush=True)

    keys = [frame_key(f) for f in frames]
    results: dict[str, dict] = {}
    with LabelStore(store, create=False) as st:
        ref = [st.get(f, REFERENCE) for f in frames]
        for level in args.levels:
            got = [st.get(f, level) for f in frames]
            both = [(r[1], g[1]) for r, g in zip(ref, got) if r and g and r[1] is not None and g[1] is not None]
            err = np.concatenate([(g - r).ravel() for r, g in both])
            secs = [t for _, t in st.timings(level, forces=True)]
            results[level] = {
                "force_mae_meV_A": 1e3 * float(np.mean(np.abs(err))),
                "force_rmse_meV_A": 1e3 * float(np.sqrt(np.mean(err ** 2))),
                "seconds_per_calc_median": float(np.median(secs)),
                "n_frames": len(both),
            }
        ref_secs = [t for _, t in st.timings(REFERENCE, forces=True)]
    ref_median = float(np.median(ref_secs))
    for r in results.values():
        r["cost_over_mp2"] = r["seconds_per_calc_median"] / ref_median
    doc = {
        "machine": {"cpu": cpu_model(), "date": datetime.date.today().isoformat()},
        "command": "python benchmarks/low_level_choice.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "reference": REFERENCE,
        "reference_seconds_per_calc_median": ref_median,
        "n_structures": len(keys),
        "note": "energy+forces, one thread per calculation, medians of the store's per-calculation times",
        "levels": results,
        "labelling_wall_s": wall,  # per level, this run (0-ish where the store already held them)
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"{'level':18s} {'F MAE':>8s} {'F RMSE':>8s} {'s/calc':>8s} {'cost/MP2':>9s}")
    for level, r in sorted(results.items(), key=lambda kv: kv[1]["force_mae_meV_A"]):
        print(f"{level:18s} {r['force_mae_meV_A']:8.1f} {r['force_rmse_meV_A']:8.1f} "
              f"{r['seconds_per_calc_median']:8.3g} {r['cost_over_mp2']:9.3g}")
    print(f"{REFERENCE}: {ref_median:.2f} s per energy+forces calculation; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
