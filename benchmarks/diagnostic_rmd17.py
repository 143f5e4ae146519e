#!/usr/bin/env python
"""Is a neural network worth it for rMD17 potentials? The descriptor diagnostic on ethanol and aspirin.

For each molecule, `polyfid.diagnose.potentials.diagnose_potential` fits on nested training sets
of N frames (default 50, 100, 250, 500, 950; the first N of the 950-frame pool that
`polyfid train` leaves after splitting 50 validation frames off ``rmd17_<molecule>_train_01.npz``
with seed 0, as benchmarks/rmd17.py does), and scores on all 1000 frames of
``rmd17_<molecule>_test_01.npz`` (PBE/def2-SVP labels):

  linear_invariants        ridge on the per-atom moment-tensor invariants (energies + forces)
  multilinear_invariants   the same plus pairwise products of principal components per element
  linear_hipnn_features    ridge readout of the frozen HIP-NN's last-layer atom features
  hipnn                    polyfid HIP-NN (PEERS.md architecture), --budget-s of training per size
  hiphop                   HIP-HOP-NN, with --networks hipnn hiphop

Test energy MAE (meV per molecule) and force MAE (meV/Å, all components) go to
``<out>/diagnostic_rmd17.json`` as {MOLECULE: {MODEL: {N_TRAIN: {"energy_mae_meV", "force_mae_meV_A"}}}}
(--quick: ``diagnostic_rmd17_quick.json`` in the work folder); the report of each molecule
(report.md, learning_curves.png, diagnosis.json with verdict, evidence, settings and timings) goes to
``<out>/diagnostic_rmd17/<molecule>/``, and its plot also to ``<out>/diagnostic_rmd17_<molecule>.png``.

  python benchmarks/diagnostic_rmd17.py                         # both molecules, 60 s per network (~25 min)
  python benchmarks/diagnostic_rmd17.py --budget-s 120          # ~35 min on the idle 2-core machine
  python benchmarks/diagnostic_rmd17.py --molecules ethanol
  python benchmarks/diagnostic_rmd17.py --quick                 # sizes 50, 200; 200 test frames; 20 s (~5 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import ARCH, FIDELITY  # noqa: E402

MOLECULES = ("ethanol", "aspirin")
N_VAL = 50
SIZES = (50, 100, 250, 500, 950)
QUICK_SIZES = (50, 200)
BUDGET_S = 60.0
QUICK_BUDGET_S = 20.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", nargs="+", default=list(MOLECULES), choices=["ethanol", "aspirin", "azobenzene"])
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR, help="folder holding rmd17/")
    p.add_argument("--budget-s", type=float, help=f"network training time per size (default {BUDGET_S:.0f} s; "
                   f"quick {QUICK_BUDGET_S:.0f} s)")
    p.add_argument("--sizes", type=int, nargs="+", help="training sizes (default 50 100 250 500 950; quick 50 200)")
    p.add_argument("--networks", nargs="+", default=["hipnn"], choices=["hipnn", "hiphop"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="sizes 50 and 200, the first 200 test frames, 20 s budgets")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --quick: the work folder)")
    p.add_argument("--work-dir", type=Path,
                   help="network run folders (default benchmarks/runs/diagnostic_rmd17[_quick])")
    args = p.parse_args(argv)

    common.set_threads(args.threads)
    from polyfid.diagnose.potentials import diagnose_potential, load_potential_data, write_potential_report

    stem = common.results_name("diagnostic_rmd17", "cpu", args.quick)
    work = args.work_dir or (common.DEFAULT_WORK / stem)
    out = args.out or (work if args.quick else common.DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / f"{stem}.json"
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    budget = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if args.quick else BUDGET_S)
    model_options = {k: v for k, v in ARCH.items() if k != "architecture"}

    t_all = time.perf_counter()
    verdicts = {}
    for mol in args.molecules:
        train, test = common.rmd17_files(args.data_dir, mol)
        print(f"[{mol}] sizes {list(sizes)}, networks {args.networks} at {budget:.0f} s each, "
              f"{args.threads} thread(s)", flush=True)
        data = load_potential_data(train, test, fidelity=FIDELITY, val_size=N_VAL, seed=args.seed,
                                   test_select="0:200" if args.quick else None)
        data.name = f"rMD17 {mol}"
        d = diagnose_potential(data, sizes=sizes, budget_s=budget, networks=args.networks, out=work / mol / "networks",
                               model_options=model_options, feature_tangents=6 if args.quick else 9, seed=args.seed,
                               threads=args.threads, log=lambda msg: print(msg, flush=True))
        d.settings["machine"] = common.machine_info("cpu")
        report = write_potential_report(d, out / "diagnostic_rmd17" / mol, title=f"rMD17 {mol}")
        png = out / f"diagnostic_rmd17_{mol}.png"
        shutil.copyfile(report.parent / "learning_curves.png", png)
        common.merge_json(results_path, {mol: d.mae_table()})
        verdicts[mol] = d.verdict
        print(f"[{mol}] verdict {d.verdict} ({d.timings['total_s']:.0f} s); report {report}; plot {png}", flush=True)
        for e in d.evidence:
            print(f"    - {e}")

    print(f"\n{results_path}  ({time.perf_counter() - t_all:.0f} s)")
    import json

    results = json.loads(results_path.read_text())
    rows = []
    for mol in args.molecules:
        for model, curve in results.get(mol, {}).items():
            for n, v in curve.items():
                rows.append([mol, model, int(n), v["energy_mae_meV"], v["force_mae_meV_A"]])
    common.print_table(["molecule", "model", "N", "E MAE meV", "F MAE meV/Å"], rows)
    for mol, v in verdicts.items():
        print(f"{mol}: verdict {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
