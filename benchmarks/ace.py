#!/usr/bin/env python
"""ACE refinement benchmark: a Cartesian ACE basis, full against pruned to a functionally
independent subset, each feeding the same descriptor network (per-element MLPs, energy as a
sum over atoms, forces by autograd) trained for the same wall-clock time.

Data: rMD17 (PBE/def2-SVP), 950 training frames drawn with seed 0 from ``*_train_01.npz`` (the
split of benchmarks/rmd17.py without its 50 validation frames, which are not used here), test
on the 1000 frames of ``*_test_01.npz``. Basis: channels = neighbour element × radial function
(HIP-NN's inverse-distance Gaussians, 0.85-4.5 Å, cutoff 5 Å), tensors l ≤ 2, correlation
order ≤ 4 (up to 5-body), ACE total degree Σ(ν + l) ≤ --max-degree. Pruning: greedy Jacobian
rank with respect to the atomic-base coordinates (polyfid.invariants).

Both variants train at once, one thread each (2 cores), so they see the same machine.
Writes ``<out>/ace.json`` ({MOLECULE: {"counts": .., "full": {..}, "pruned": {..}}}) and
``<out>/ace.png``.

  python benchmarks/ace.py                       # ethanol, 300 s per variant (~6 min)
  python benchmarks/ace.py --molecules ethanol aspirin --budget-s 600
  python benchmarks/ace.py --quick               # 20 s, 200 test frames
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import FIDELITY  # noqa: E402


def _basis(args, elements):
    from polyfid.descriptors.ace import ACEBasis
    from polyfid.descriptors.moments import InverseGaussianRadial

    return ACEBasis(elements, InverseGaussianRadial(args.n_radial, 0.85, 4.5, 5.0), l_max=args.l_max,
                    max_correlation=args.max_correlation, max_degree=args.max_degree)


def worker(args) -> None:
    common.set_threads(1)
    import torch

    from polyfid.data.batch import PackedData
    from polyfid.data.readers import read
    from polyfid.descriptors.network import DescriptorNetwork, predict
    from polyfid.train.descriptor import DescriptorTraining, train_descriptor_network

    train_file, test_file = common.rmd17_files(args.data_dir, args.molecule)
    train = read(train_file, format="npz", fidelity=FIDELITY)
    test = read(test_file, format="npz", fidelity=FIDELITY)
    tr_idx, _ = common.train_val_split(len(train), 50, args.seed)
    if args.quick:
        test = test[np.arange(200)]
    full = _basis(args, train.elements)
    basis = full.prune() if args.variant == "pruned" else full
    tr = PackedData(train[tr_idx], 5.0, [FIDELITY], dtype=torch.float32)
    te = PackedData(test, 5.0, [FIDELITY], dtype=torch.float32)
    torch.manual_seed(args.seed)
    net = DescriptorNetwork(basis, basis.n_functions, train.elements, hidden=args.hidden)
    common.barrier(args.barrier, args.variant, 2)
    settings = DescriptorTraining(args.budget_s, batch_size=args.batch_size, seed=args.seed)
    fit = train_descriptor_network(net, tr, settings)
    t0 = time.perf_counter()
    e, f = predict(net, te)
    eval_s = time.perf_counter() - t0
    ref = te.batch(np.arange(te.n_frames))
    one = te.batch(np.arange(1))
    times = []
    for _ in range(50):  # one molecule at a time: the MD cost of the descriptors and the network
        t = time.perf_counter()
        net(one)
        times.append(time.perf_counter() - t)
    result = {
        "n_descriptors": basis.n_functions,
        "energy_mae_meV": 1000 * float(np.abs(e - ref.energy[:, 0].numpy()).mean()),
        "force_mae_meV_A": 1000 * float(np.abs(f - ref.forces[:, 0].numpy()).mean()),
        "train_cfg_per_s": fit.frames / fit.train_s,
        "epochs": fit.epochs,
        "batched_cfg_per_s": te.n_frames / eval_s,
        "single_ms": 1000 * float(np.median(times)),
        "n_params": sum(p.numel() for p in net.parameters()),
        "budget_s": args.budget_s,
    }
    Path(args.fragment).write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", nargs="+", default=["ethanol"])
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--n-radial", type=int, default=3)
    p.add_argument("--l-max", type=int, default=2)
    p.add_argument("--max-correlation", type=int, default=4)
    p.add_argument("--max-degree", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--molecule", help=argparse.SUPPRESS)
    p.add_argument("--fragment", help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.budget_s = min(args.budget_s, 20.0)
    work = common.DEFAULT_WORK / ("ace_quick" if args.quick else "ace")
    out_json = (work if args.quick else args.out) / ("ace_quick.json" if args.quick else "ace.json")
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for mol in args.molecules:
        from polyfid.data.readers import read
        from polyfid.descriptors.ace import ace_counts

        elements = read(common.rmd17_files(args.data_dir, mol)[1], format="npz", fidelity=FIDELITY).elements
        full = _basis(args, elements)
        counts = ace_counts(full, full.prune())
        barrier = work / f"barrier_{mol}_{time.time_ns()}"
        procs = {}
        for variant in ("full", "pruned"):
            frag = work / f"{mol}_{variant}.json"
            cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--molecule", mol,
                   "--data-dir", str(args.data_dir), "--budget-s", str(args.budget_s), "--fragment", str(frag),
                   "--barrier", str(barrier), "--n-radial", str(args.n_radial), "--l-max", str(args.l_max),
                   "--max-correlation", str(args.max_correlation), "--max-degree", str(args.max_degree),
                   "--hidden", str(args.hidden), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                   *(["--quick"] if args.quick else [])]
            procs[variant] = (subprocess.Popen(cmd, env=common.thread_env(1)), frag)
        entry = {"counts": counts, "basis": {"n_radial": args.n_radial, "l_max": args.l_max,
                                             "max_correlation": args.max_correlation, "max_degree": args.max_degree}}
        for variant, (proc, frag) in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"{mol} {variant}: worker failed (exit {proc.returncode})")
            entry[variant] = json.loads(frag.read_text())
        f, q = entry["full"], entry["pruned"]
        entry["checks"] = {"pruned_smaller": q["n_descriptors"] < f["n_descriptors"],
                           "pruned_force_mae_le_full": q["force_mae_meV_A"] <= f["force_mae_meV_A"]}
        results[mol] = entry
        print(f"{mol}: full {f['n_descriptors']} descriptors {f['force_mae_meV_A']:.1f} meV/Å "
              f"{f['train_cfg_per_s']:.0f} cfg/s; pruned {q['n_descriptors']} {q['force_mae_meV_A']:.1f} meV/Å "
              f"{q['train_cfg_per_s']:.0f} cfg/s", flush=True)
    merged = common.merge_json(out_json, {"machine": common.machine_info("cpu"), **results})
    plot(merged, out_json.with_suffix(".png"), args.molecules)
    print(f"wrote {out_json}")
    return 0


def plot(res: dict, path: Path, molecules: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(molecules), figsize=(5 * len(molecules), 4), squeeze=False)
    for ax, mol in zip(axes[0], molecules):
        for variant, color in (("full", "tab:red"), ("pruned", "tab:blue")):
            r = res[mol][variant]
            ax.scatter(r["train_cfg_per_s"], r["force_mae_meV_A"], s=60, color=color,
                       label=f"{variant} ({r['n_descriptors']} descriptors)")
        ax.set_xlabel("training configurations / s (1 thread)")
        ax.set_ylabel("test force MAE (meV/Å)")
        ax.set_title(f"ACE descriptor network, rMD17 {mol}, equal time")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
