"""Training-step cost of the polyfid networks, side by side: one force-and-energy loss step
(forward with forces, backward to the weights) on a batch of rMD17 frames, every model timed in
turn within each repeat so that the machine's noise hits all alike. Medians and ratios to the
first model.

The default models are architectures.py's (HIP-NN 128 features, HIP-HOP-NN 64 features / 16
tensor channels) and HIP-HOP-NN at the library's default widths (128 / 32):

  .venv/bin/python benchmarks/step_cost.py [--molecule aspirin] [--batch 32] [--repeats 15]

Writes benchmarks/results/step_cost.json: {"device", "machine", "molecule", "batch", "threads",
MODEL: {"median_ms", "ratio", "n_params"}}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import architectures  # noqa: E402
import common  # noqa: E402

MODELS = {
    "hipnn": architectures.POLYFID_ARCH["hipnn"],
    "hiphop": architectures.POLYFID_ARCH["hiphop"],
    "hiphop_128_32": architectures.POLYFID_ARCH["hiphop"] | {"n_features": 128, "tensor_features": 32},
}


def measure(molecule: str, batch_size: int, repeats: int, data_dir: Path) -> dict[str, dict[str, float]]:
    """Median wall time (ms) of one training step per model, interleaved over `repeats` rounds
    (the first round warms up and is dropped)."""
    import torch

    from polyfid.data.batch import PackedData
    from polyfid.data.readers import read
    from polyfid.models import build_potential

    train_f, _ = common.rmd17_files(data_dir, molecule)
    ds = read(train_f, fidelity=common.FIDELITY)
    ds = ds[list(range(batch_size))]
    cutoff = max(cfg["cutoff"] for cfg in MODELS.values())
    packed = PackedData(ds, cutoff, [common.FIDELITY], dtype=torch.float32)
    batch = packed.batch(list(range(batch_size)))
    models = {}
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        models[name] = build_potential(cfg, sorted(ds.elements), [common.FIDELITY])
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = model(batch, forces=True, create_graph=True)
            loss = out["forces"].square().sum() + out["energy"].square().sum()
            loss.backward()
            if rep:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(models))])
    return {name: {"median_ms": 1e3 * statistics.median(t), "ratio": statistics.median(t) / base,
                   "n_params": models[name].n_parameters()} for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", default="aspirin")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    res = measure(args.molecule, args.batch, args.repeats, args.data_dir)
    out = {"device": common.device_name("cpu"), "molecule": args.molecule, "batch": args.batch,
           "threads": args.threads, "repeats": args.repeats, "machine": common.machine_info("cpu")} | res
    args.out.mkdir(parents=True, exist_ok=True)
    common.merge_json(args.out / "step_cost.json", out)
    common.print_table(["model", "median ms", "ratio", "params"],
                       [[k, f"{v['median_ms']:.0f}", f"{v['ratio']:.2f}", v["n_params"]] for k, v in res.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
