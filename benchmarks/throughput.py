#!/usr/bin/env python
"""Throughput of polyfid's HIP-NN beside hippynn's, same model, same machine, same clock.

Both sides use the HIP-NN of /work/shared/PEERS.md (128 features, 20 sensitivities, soft
0.85-4.5 Å, cutoff 5 Å, 2 interaction + 3 atom layers; parameter counts asserted within 5%),
float32, batch 32, torch.set_num_threads(--threads, default 1), rMD17 ethanol (950 training
frames of the seed-0 split; the 1000 test frames for inference). Measured:

  train_cfg_per_s          real optimiser steps with force training (create_graph): polyfid's
                           Trainer.run_epoch (Adam, EMA, gradient clipping, its batching);
                           hippynn's Database loader, GraphModules and loss nodes, Adam
  batched_cfg_per_s        energy + forces of the test geometries in batches of 32, from raw
                           geometries: polyfid.api.predict on ASE Atoms (vesin neighbour lists
                           included); hippynn's Predictor on (Z, R) arrays (its pair finder inside)
  batched_model_cfg_per_s  the same through the bare models: polyfid on pre-packed batches
                           (neighbour lists precomputed, as in training), hippynn's GraphModule
                           on (Z, R) batches
  single_calls_per_s       the MD case: 1000 distinct test geometries one after another through
                           each code's ASE calculator, energy and forces, neighbour list included
                           (polyfid.PolyfidCalculator with vesin; hippynn's HippynnCalculator with
                           ASE's neighbour list)

Each side runs in its own process (this script with --worker) and is driven over a pipe: both
set up and warm up (hippynn's torch.compile compiles and recompiles happen there), then measure in
windows of --window-s seconds, --repeats times per quantity, either both at once (1 thread each on
2 cores, --schedule concurrent, the default on CPU) or one after the other in ABBA order
(--schedule alternating, the default on a GPU), so that machine noise hits both alike. Medians
over the repeats are reported, with ratios polyfid / hippynn and each side's peak RSS
(ru_maxrss of its process).

  python benchmarks/throughput.py                   # full run (~6 min), results/throughput.json
  python benchmarks/throughput.py --quick           # smoke test (~2 min), in benchmarks/runs/
  python benchmarks/throughput.py --device cuda     # results/throughput_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import ARCH, FIDELITY  # noqa: E402

PHASES = ("train", "batched", "batched_model", "single")
METRIC = {
    "train": "train_cfg_per_s",
    "batched": "batched_cfg_per_s",
    "batched_model": "batched_model_cfg_per_s",
    "single": "single_calls_per_s",
}
BATCH = 32
CHUNK = 250  # frames per end-to-end batched-inference call (split into batches of 32 inside)
N_VAL = 50
PARAM_TOLERANCE = 0.05
PROTO = "@@ "


# ======================================================================================
# workers
# ======================================================================================
class Channel:
    """JSON lines to the parent on the original stdout; everything else printed goes to stderr."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, obj: dict[str, Any]) -> None:
        self.out.write(PROTO + json.dumps(obj, default=common._json_default) + "\n")
        self.out.flush()

    @staticmethod
    def recv() -> dict[str, Any]:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)  # parent gone
        return json.loads(line)


def _loop(unit, seconds: float) -> int:
    """Call unit() (which returns a count) until `seconds` have passed; returns the count."""
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        n += unit()
    return n


class Cycle:
    """Indices 0..n-1 in order, wrapping around; take(k) gives the next k."""

    def __init__(self, n: int) -> None:
        self.n, self.pos = n, 0

    def take(self, k: int) -> np.ndarray:
        idx = (self.pos + np.arange(k)) % self.n
        self.pos = int((self.pos + k) % self.n)
        return idx


class PolyfidSide:
    name = "polyfid"

    def __init__(self, a: argparse.Namespace) -> None:
        import ase
        import torch

        import polyfid
        from polyfid.data.batch import PackedData
        from polyfid.data.readers import read
        from polyfid.models import build_potential
        from polyfid.train.config import TrainingConfig
        from polyfid.train.trainer import StepOptions, Trainer

        self.torch, self.device = torch, a.device
        train_file, test_file = common.rmd17_files(a.data_dir, a.molecule)
        train_ds = read(train_file, format="npz", fidelity=FIDELITY)
        tr_idx, _ = common.train_val_split(len(train_ds), N_VAL, a.seed)
        train_ds = train_ds[tr_idx]
        test_ds = read(test_file, format="npz", fidelity=FIDELITY)
        species = sorted(set(train_ds.elements))
        torch.manual_seed(a.seed)
        model = build_potential(dict(ARCH), species, [FIDELITY])
        self.train = PackedData(train_ds, model.cutoff, [FIDELITY], dtype=torch.float32)
        model.fit_reference_energies(self.train)
        self.model = model.to(dtype=torch.float32, device=a.device)
        self.params = model.n_parameters()
        # training: polyfid's own Trainer (defaults: Adam, EMA 0.99, gradient clipping 100)
        self.cfg = TrainingConfig(batch_size=BATCH, lr=1e-3, scheduler="none", dtype="float32", seed=a.seed,
                                  num_threads=a.threads, device=a.device, max_time_s=1.0)
        self.tmp = tempfile.TemporaryDirectory(prefix="polyfid-throughput-")
        self.trainer = Trainer(self.model, self.train, None, self.cfg, self.tmp.name, dict(ARCH),
                               options=StepOptions(progress=False))
        # inference on a copy (the ASE calculator switches parameter gradients off)
        self.infer = copy.deepcopy(self.model).eval()
        self.test = PackedData(test_ds, model.cutoff, [FIDELITY], dtype=torch.float32)
        self.atoms = [ase.Atoms(numbers=f.numbers, positions=f.positions) for f in test_ds]
        self.test_positions = np.stack([f.positions for f in test_ds])
        self.n_test = len(test_ds)
        self.cyc_batched, self.cyc_model, self.cyc_single = Cycle(self.n_test), Cycle(self.n_test), Cycle(self.n_test)
        self.calc_atoms = None
        self.info = {
            "code": f"polyfid {polyfid.__version__}",
            "train_path": "polyfid.train.trainer.Trainer.run_epoch (Adam, EMA 0.99, grad clip 100)",
            "batched_path": "polyfid.api.predict on ASE Atoms (Frame -> PackedData with vesin pairs -> batches)"
            if not a.device.startswith("cuda") else "Frame -> PackedData (vesin) -> predict_packed on the GPU",
            "batched_model_path": "Potential on pre-packed batches (pairs precomputed)",
            "single_path": "polyfid.PolyfidCalculator (vesin neighbour list per call"
            + (", compile=True: torch.compile'd inference, compiled during warm-up)" if not a.no_compile else ")"),
        }
        self.compile_single = not a.no_compile

    # ---- units -----------------------------------------------------------------------
    def run_train(self, seconds: float) -> int:
        """Trainer.run_epoch until `seconds` have passed; returns frames trained on."""
        tr = self.trainer
        tr.budget.max_time_s = seconds
        n, bs = self.train.n_frames, self.cfg.batch_size
        full = math.ceil(n / bs)
        t0 = time.perf_counter()
        frames = 0
        while time.perf_counter() - t0 < seconds:
            row = tr.run_epoch(t0, 0.0)
            k = int(row["train_steps"])
            frames += n if k == full else k * bs
            tr.state.epoch += 1
        return frames

    def unit_batched(self) -> int:
        idx = self.cyc_batched.take(CHUNK)
        if self.device.startswith("cuda"):
            from polyfid.analysis.metrics import predict_packed
            from polyfid.data.batch import PackedData
            from polyfid.data.frame import Dataset, Frame

            frames = [Frame(self.atoms[i].numbers, self.atoms[i].positions) for i in idx]
            packed = PackedData(Dataset(frames), self.infer.cutoff, self.infer.fidelities,
                                dtype=self.torch.float32)
            predict_packed(self.infer, packed, batch_size=BATCH, forces=True, device=self.device)
        else:
            from polyfid.api import predict

            predict(self.infer, [self.atoms[i] for i in idx], batch_size=BATCH)
        return len(idx)

    def unit_batched_model(self) -> int:
        idx = self.cyc_model.take(BATCH)
        b = self.test.batch(idx).to(self.device)
        out = self.infer(b, forces=True)
        out["forces"].detach()
        return len(idx)

    def unit_single(self) -> int:
        if self.calc_atoms is None:
            import ase

            from polyfid.calculators.ase import PolyfidCalculator

            self.calc_atoms = ase.Atoms(numbers=self.atoms[0].numbers, positions=self.atoms[0].positions)
            self.calc_atoms.calc = PolyfidCalculator(self.infer, dtype="float32", device=self.device,
                                                     compile=self.compile_single)
        k = int(self.cyc_single.take(1)[0])
        self.calc_atoms.positions = self.test_positions[k]
        self.calc_atoms.get_potential_energy()
        self.calc_atoms.get_forces()
        return 1

    def compiles(self) -> int:
        return 0


class HippynnSide:
    name = "hippynn"

    def __init__(self, a: argparse.Namespace) -> None:
        hippynn = common.import_hippynn(a.device)
        import ase
        import torch
        from hippynn.databases import Database
        from hippynn.graphs import Predictor
        from hippynn.pretraining import hierarchical_energy_initialization

        self.torch, self.device = torch, torch.device(a.device)
        torch.manual_seed(a.seed)
        train_file, test_file = common.rmd17_files(a.data_dir, a.molecule)
        tr, te = common.load_rmd17(train_file), common.load_rmd17(test_file)
        tr_idx, _ = common.train_val_split(len(tr["energies"]), N_VAL, a.seed)
        shift = float(tr["energies"][tr_idx].mean())
        self.n_atoms = len(tr["numbers"])
        arrays = {
            "Z": np.tile(tr["numbers"], (len(tr_idx), 1)),
            "R": tr["positions"][tr_idx].astype(np.float32),
            "T": (tr["energies"][tr_idx] - shift)[:, None].astype(np.float32),
            "F": tr["forces"][tr_idx].astype(np.float32),
        }
        species, positions, henergy, force = common.build_hippynn(sorted(set(tr["numbers"].tolist())))
        self.model, self.loss, in_names, tgt_names, _ = common.hippynn_training_graph(henergy, force)
        self.db = Database(arrays, inputs=in_names, targets=tgt_names, seed=a.seed, pin_memory=False, quiet=True)
        self.db.split_the_rest("train")
        hierarchical_energy_initialization(henergy, self.db, trainable_after=False)
        if self.device.type != "cpu":
            self.db.send_to_device(self.device)
        self.model.to(self.device)
        self.loss.to(self.device)
        self.params = common.n_params(self.model)
        self.n_in = len(in_names)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.batches = self._batches()
        # inference
        self.predictor = Predictor([species, positions], [henergy.mol_energy, force], model_device=self.device)
        n_test = len(te["energies"])
        self.Z = torch.as_tensor(np.tile(te["numbers"], (n_test, 1)))
        self.R = torch.as_tensor(te["positions"].astype(np.float32))
        self.test_positions = te["positions"]
        self.numbers = te["numbers"]
        self.henergy = henergy
        self.cyc_batched, self.cyc_model, self.cyc_single = Cycle(n_test), Cycle(n_test), Cycle(n_test)
        self.calc_atoms = None
        self.ase = ase
        import hippynn.custom_kernels as ck

        self.info = {
            "code": f"hippynn {hippynn.__version__}",
            "custom_kernels": str(ck.CUSTOM_KERNELS_ACTIVE),
            "train_path": "hippynn Database.make_generator + GraphModule model/loss (MSELoss nodes), Adam",
            "batched_path": "hippynn.graphs.Predictor on (Z, R) arrays, batch_size 32 (pairs found in the model)",
            "batched_model_path": "GraphModule on (Z, R) batches (pairs found in the model)",
            "single_path": "hippynn.interfaces.ase_interface.HippynnCalculator (ASE neighbour list per call)",
        }

    def _batches(self):
        while True:
            yield from self.db.make_generator("train", "train", batch_size=BATCH)

    def run_train(self, seconds: float) -> int:
        self.model.train()
        return _loop(self.unit_train, seconds)

    def unit_train(self) -> int:
        batch = [x.to(self.device, non_blocking=True) for x in next(self.batches)]
        inputs, targets = batch[: self.n_in], [x.requires_grad_(False) for x in batch[self.n_in :]]
        outs = self.model(*inputs)
        mse_e, mse_f = self.loss(*outs, *targets)
        loss = mse_e / self.n_atoms**2 + 100.0 * mse_f
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return int(inputs[0].shape[0])

    def unit_batched(self) -> int:
        idx = self.torch.as_tensor(self.cyc_batched.take(CHUNK))
        self.predictor(Z=self.Z[idx], R=self.R[idx], batch_size=BATCH)
        return len(idx)

    def unit_batched_model(self) -> int:
        self.model.eval()
        idx = self.torch.as_tensor(self.cyc_model.take(BATCH))
        outs = self.model(self.R[idx].to(self.device), self.Z[idx].to(self.device))  # inputs sorted by db name: R, Z
        outs[1].detach()
        return len(idx)

    def unit_single(self) -> int:
        if self.calc_atoms is None:
            from hippynn.interfaces.ase_interface import HippynnCalculator

            calc = HippynnCalculator(self.henergy, en_unit=self.ase.units.kcal / self.ase.units.mol)
            calc.to(self.torch.float32)
            calc.to(self.device)
            self.calc_atoms = self.ase.Atoms(numbers=self.numbers, positions=self.test_positions[0])
            self.calc_atoms.calc = calc
        k = int(self.cyc_single.take(1)[0])
        self.calc_atoms.positions = self.test_positions[k]
        self.calc_atoms.get_potential_energy()
        self.calc_atoms.get_forces()
        return 1

    def compiles(self) -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])


def units(side) -> dict[str, Any]:
    return {"batched": side.unit_batched, "batched_model": side.unit_batched_model, "single": side.unit_single}


def run_phase(side, phase: str, seconds: float) -> int:
    if phase == "train":
        return side.run_train(seconds)
    return _loop(units(side)[phase], seconds)


#: units per warm-up pass, enough to meet every batch shape once (a training epoch and one more
#: step, the 1000 test frames); passes repeat until one triggers no torch.compile compilation
PASS_UNITS = {
    "train": math.ceil((1000 - N_VAL) / BATCH) + 1,
    "batched": math.ceil(1000 / CHUNK),
    "batched_model": math.ceil(1000 / BATCH),
    "single": 100,
}
MAX_PASSES = 6


def warmup(side, phase: str, quick: bool) -> dict[str, Any]:
    """Warm up `phase` outside the measurement: whole passes until one compiles nothing, then a
    short timed run at steady state."""
    t0 = time.perf_counter()
    c0 = side.compiles()
    passes = 0
    if phase == "train" and not hasattr(side, "unit_train"):
        side.run_train(1.0 if quick else 3.0)  # polyfid: no compilation
        passes = 1
    else:
        unit = side.unit_train if phase == "train" else units(side)[phase]
        while passes < MAX_PASSES:
            c = side.compiles()
            for _ in range(PASS_UNITS[phase]):
                unit()
            passes += 1
            if side.compiles() == c:
                break
        run_phase(side, phase, 0.5 if quick else 2.0)
    return {"warmup_s": time.perf_counter() - t0, "passes": passes, "compiles": side.compiles() - c0}


def worker(a: argparse.Namespace) -> None:
    common.set_threads(a.threads)
    ch = Channel()
    t0 = time.perf_counter()
    side = PolyfidSide(a) if a.worker == "polyfid" else HippynnSide(a)
    ch.send({"ready": True, "params": side.params, "setup_s": time.perf_counter() - t0, "info": side.info})
    while True:
        msg = ch.recv()
        cmd = msg["cmd"]
        if cmd == "warmup":
            w = warmup(side, msg["phase"], msg.get("quick", False))
            common.synchronize(a.device)
            ch.send(w)
        elif cmd == "measure":
            c0 = side.compiles()
            t0 = time.perf_counter()
            n = run_phase(side, msg["phase"], msg["window_s"])
            common.synchronize(a.device)
            dt = time.perf_counter() - t0
            ch.send({"n": n, "s": dt, "rate": n / dt, "compiles": side.compiles() - c0})
        elif cmd == "finish":
            out = {"peak_rss_mb": common.peak_rss_mb()}
            if a.device.startswith("cuda"):
                out["cuda_peak_mb"] = side.torch.cuda.max_memory_allocated() / 2**20
            ch.send(out)
            return


# ======================================================================================
# parent
# ======================================================================================
class Worker:
    def __init__(self, name: str, args: argparse.Namespace, log: Path) -> None:
        self.name = name
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self.log = open(log, "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--molecule", args.molecule,
               "--data-dir", str(args.data_dir), "--device", args.device, "--threads", str(args.threads),
               "--seed", str(args.seed)] + (["--no-compile"] if args.no_compile else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=common.thread_env(args.threads))

    def send(self, obj: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.flush()
                tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-25:])
                raise RuntimeError(f"{self.name} worker ended unexpectedly; log {self.log_path}:\n{tail}")
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])

    def close(self) -> None:
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
        self.log.close()


def plot(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [ph for ph in PHASES if METRIC[ph] in res["ratios"]]
    fig, axes = plt.subplots(1, len(phases), figsize=(3 * len(phases), 3.4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        key = METRIC[phase]
        vals = [res[s][key] for s in ("polyfid", "hippynn")]
        samples = [res[s]["samples"][key] for s in ("polyfid", "hippynn")]
        lo = [v - min(x) for v, x in zip(vals, samples)]
        hi = [max(x) - v for v, x in zip(vals, samples)]
        ax.bar(["polyfid", "hippynn"], vals, yerr=[lo, hi], color=["tab:blue", "tab:orange"], capsize=4)
        ratio = res["ratios"].get(key)
        ax.set_title(f"{key}\nratio {ratio:.2f}" if ratio else key, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"HIP-NN throughput, rMD17 {res['molecule']}, {res['device']}, {res['threads']} thread(s), "
                 f"medians of {res['repeats']} x {res['window_s']:g} s ({res['schedule']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", default="ethanol", choices=["ethanol", "aspirin", "azobenzene"])
    p.add_argument("--window-s", type=float, default=None, help="seconds per measurement window (default 10)")
    p.add_argument("--repeats", type=int, default=None, help="windows per quantity and side (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1)")
    p.add_argument("--schedule", choices=["concurrent", "alternating"], default=None,
                   help="both sides at once (default on CPU) or one after the other in ABBA order (default on GPU)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                   "with --quick benchmarks/runs/throughput_quick)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s windows, 2 repeats, short warm-ups")
    p.add_argument("--no-compile", action="store_true",
                   help="polyfid's calculator without torch.compile (the default compiles, as hippynn's kernels are)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["polyfid", "hippynn"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(args)
        return 0

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch")
    window = args.window_s or (2.0 if args.quick else 10.0)
    repeats = args.repeats or (2 if args.quick else 5)
    schedule = args.schedule or ("alternating" if args.device.startswith("cuda") else "concurrent")
    stem = common.results_name("throughput", args.device, args.quick)
    out = args.out or (common.DEFAULT_WORK / stem if args.quick else common.DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    logs = common.DEFAULT_WORK / stem / "logs"

    t_all = time.perf_counter()
    workers = {name: Worker(name, args, logs / f"{name}.log") for name in ("polyfid", "hippynn")}
    res: dict[str, Any] = {"device": common.device_name(args.device)}
    try:
        ready = {name: w.recv() for name, w in workers.items()}
        pp, hp = ready["polyfid"]["params"], ready["hippynn"]["params"]
        rel = abs(pp - hp) / hp
        print(f"parameters: polyfid {pp}, hippynn {hp} ({100 * rel:.2f}% apart)")
        assert rel <= PARAM_TOLERANCE, f"parameter counts differ by {100 * rel:.1f}% (> {100 * PARAM_TOLERANCE:.0f}%)"
        samples: dict[str, dict[str, list[float]]] = {n: {} for n in workers}
        compiles: dict[str, dict[str, int]] = {n: {} for n in workers}
        warmups: dict[str, dict[str, Any]] = {n: {} for n in workers}
        for phase in args.phases:
            for w in workers.values():
                w.send({"cmd": "warmup", "phase": phase, "quick": args.quick})
            for name, w in workers.items():
                warmups[name][phase] = w.recv()
            key = METRIC[phase]
            for r in range(repeats):
                msg = {"cmd": "measure", "phase": phase, "window_s": window}
                names = list(workers)
                if schedule == "concurrent":
                    for n in names:
                        workers[n].send(msg)
                    got = {n: workers[n].recv() for n in names}
                else:
                    order = names if r % 2 == 0 else names[::-1]
                    got = {}
                    for n in order:
                        workers[n].send(msg)
                        got[n] = workers[n].recv()
                for n, g in got.items():
                    samples[n].setdefault(key, []).append(g["rate"])
                    compiles[n][key] = compiles[n].get(key, 0) + g["compiles"]
            print(f"  {key:24s} polyfid {statistics.median(samples['polyfid'][key]):8.1f}   "
                  f"hippynn {statistics.median(samples['hippynn'][key]):8.1f}", flush=True)
        for name, w in workers.items():
            w.send({"cmd": "finish"})
            fin = w.recv()
            res[name] = {
                "params": ready[name]["params"],
                **{METRIC[ph]: statistics.median(samples[name][METRIC[ph]]) for ph in args.phases},
                "peak_rss_mb": fin["peak_rss_mb"],
                **({"cuda_peak_mb": fin["cuda_peak_mb"]} if "cuda_peak_mb" in fin else {}),
                "samples": samples[name],
                "warmup": warmups[name],
                "setup_s": ready[name]["setup_s"],
                "compiles_during_measurement": compiles[name],
                **ready[name]["info"],
            }
    finally:
        for w in workers.values():
            if w.proc.poll() is None and w.proc.stdin:
                try:
                    w.proc.stdin.close()
                except OSError:
                    pass
            w.close()

    res["ratios"] = {METRIC[ph]: res["polyfid"][METRIC[ph]] / res["hippynn"][METRIC[ph]] for ph in args.phases}
    res |= {
        "param_ratio": pp / hp,
        "molecule": args.molecule,
        "threads": args.threads,
        "dtype": "float32",
        "batch_size": BATCH,
        "window_s": window,
        "repeats": repeats,
        "schedule": schedule,
        "statistic": "median over repeats",
        "machine": common.machine_info(args.device),
        "quick": args.quick,
        "phases": list(args.phases),
    }
    path = out / f"{stem}.json"
    path.write_text(json.dumps(res, indent=2, default=common._json_default) + "\n")
    plot(out / f"{stem}.png", res)
    print(f"\n{path}  (device {res['device']}, {time.perf_counter() - t_all:.0f} s)")
    rows = [[METRIC[ph], res["polyfid"][METRIC[ph]], res["hippynn"][METRIC[ph]], res["ratios"][METRIC[ph]]]
            for ph in args.phases]
    rows.append(["peak_rss_mb", res["polyfid"]["peak_rss_mb"], res["hippynn"]["peak_rss_mb"],
                 res["polyfid"]["peak_rss_mb"] / res["hippynn"]["peak_rss_mb"]])
    rows.append(["params", pp, hp, pp / hp])
    common.print_table(["quantity", "polyfid", "hippynn", "ratio"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
