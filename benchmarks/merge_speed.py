"""How long merging takes: 10^5 frames at a low level and 10^4 of the same geometries at a high
level (one file per level, as users hold them), merged with `Dataset.merge`.

The geometries are the 1000 rMD17 ethanol training frames, each repeated with 100 small random
displacements (0.01 Å, far above the 1e-6 Å merge tolerance: all distinct); the high level holds
every tenth of them with its positions moved by 1e-8 Å. Writes `results/merge_speed.json` (the
median of --repeats timings, the machine, the date and the command).

  python benchmarks/merge_speed.py [--frames 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_sets(data_dir: Path, n_frames: int):
    from polyfid.data.frame import Dataset, Frame, Labels

    raw = common.load_rmd17(common.rmd17_files(data_dir, "ethanol")[0])
    rng = np.random.default_rng(0)
    base = raw["positions"][np.arange(n_frames) % len(raw["positions"])]
    pos = base + rng.normal(scale=0.01, size=base.shape)
    energy = rng.normal(size=n_frames)
    forces = rng.normal(size=pos.shape)
    z = raw["numbers"]
    low = Dataset([Frame(z, pos[i], {"pbe": Labels(energy[i], forces[i])}, source=f"low.xyz:{i}")
                   for i in range(n_frames)])
    high = Dataset([Frame(z, pos[i] + 1e-8, {"mp2": Labels(energy[i] + 1.0)}, source=f"high.xyz:{j}")
                    for j, i in enumerate(range(0, n_frames, 10))])
    return low, high


def main(argv: list[str] | None = None) -> int:
    from polyfid.data.frame import Dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    args = p.parse_args(argv)
    low, high = make_sets(args.data_dir, args.frames)
    times, report = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        merged = Dataset.merge([low, high])
        times.append(time.perf_counter() - t0)
        report = merged.merge_report.as_dict()
    assert report["merged_frames"] == len(high) and report["frames_out"] == len(low), report
    result = {"frames_low": len(low), "frames_high": len(high), "merge_s_median": statistics.median(times),
              "merge_s": times, "report": report, "machine": common.machine_info("cpu"),
              "command": "python benchmarks/merge_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"merged {len(low)} + {len(high)} frames: median {result['merge_s_median']:.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}) -> {args.out / 'merge_speed.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
