"""Shared pieces of the benchmarks: data, the HIP-NN configuration of /work/shared/PEERS.md for
polyfid and for hippynn, thread and device setup, JSON merging, parity plots.

The benchmark scripts import this module as a sibling (``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
DEFAULT_OUT = BENCH_DIR / "results"
DEFAULT_WORK = BENCH_DIR / "runs"  # ignored by git (runs/): run folders, logs, prediction arrays

#: rMD17 label set used everywhere (PBE/def2-SVP, the `energies`/`forces` arrays of the files)
FIDELITY = "pbe_def2svp"
#: kcal/mol in eV (ASE's CODATA constants, as polyfid.data.units uses)
KCAL_MOL_EV = 0.0433641043157  # overwritten below from ase.units when ASE is importable

try:  # keep the exact constant polyfid uses
    from ase import units as _ase_units

    KCAL_MOL_EV = _ase_units.kcal / _ase_units.mol
except ImportError:  # pragma: no cover
    pass

#: the HIP-NN of PEERS.md: 128 features, 20 sensitivities, soft 0.85-4.5 Å, cutoff 5 Å,
#: 2 interaction blocks with 3 atom layers each (polyfid ModelConfig names)
ARCH = {
    "architecture": "hipnn",
    "n_features": 128,
    "n_sensitivities": 20,
    "soft_min": 0.85,
    "soft_max": 4.5,
    "cutoff": 5.0,
    "n_interactions": 2,
    "n_atom_layers": 3,
    "resnet": True,
    "activation": "softplus",
}

#: the training recipe of PEERS.md: loss 1·MSE(E/N) + 100·MSE(F), energy weight 1000 for the
#: last quarter, cosine decay of the learning rate over the wall-clock budget, Adam 1e-3, batch 32
PEERS_RECIPE = {
    "batch_size": 32,
    "lr": 1e-3,
    "min_lr": 1e-6,
    "scheduler": "cosine",
    "energy_weight": 1.0,
    "force_weight": 100.0,
    "final_energy_weight": 1000.0,
    "final_fraction": 0.25,
}
#: PEERS_RECIPE as tuned for polyfid on rMD17 ethanol's validation frames (rmd17.py --mode long):
#: Adam 3e-3 with weight decay 1e-4, Huber loss (δ = 0.01), EMA 0.99
TUNED_RECIPE = PEERS_RECIPE | {"ema_decay": 0.99, "grad_clip": 100.0, "lr": 3e-3, "loss": "huber",
                               "huber_delta": 0.01, "weight_decay": 1e-4}


# ---- environment ---------------------------------------------------------------------
def set_threads(n: int) -> None:
    """Pin torch (and BLAS/OpenMP) to `n` threads; call before heavy imports where possible."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (interop threads can be set once per process)
        pass


def thread_env(n: int) -> dict[str, str]:
    """Environment for a child process limited to `n` threads."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(n)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def device_name(device: str) -> str:
    """"cpu" or the GPU's name (the results files' "device" field)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict[str, Any]:
    import torch

    return {
        "device": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB; ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def results_name(stem: str, device: str, quick: bool) -> str:
    """rmd17.json, rmd17_gpu.json, rmd17_quick.json, ..."""
    return stem + ("_gpu" if device.startswith("cuda") else "") + ("_quick" if quick else "")


# ---- data ----------------------------------------------------------------------------
def rmd17_files(data_dir: str | Path, molecule: str) -> tuple[Path, Path]:
    """(train, test) files of split 01 of revised MD17 for `molecule`."""
    base = Path(data_dir) / "rmd17"
    train, test = base / f"rmd17_{molecule}_train_01.npz", base / f"rmd17_{molecule}_test_01.npz"
    for p in (train, test):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: pass --data-dir (the folder that holds rmd17/)")
    return train, test


def load_rmd17(path: str | Path) -> dict[str, np.ndarray]:
    """numbers (n,), positions (F, n, 3) Å, energies (F,) kcal/mol, forces (F, n, 3) kcal/mol/Å
    (the PBE/def2-SVP labels; float64)."""
    with np.load(path) as d:
        return {
            "numbers": d["nuclear_charges"].astype(np.int64),
            "positions": d["coords"].astype(np.float64),
            "energies": d["energies"].astype(np.float64),
            "forces": d["forces"].astype(np.float64),
        }


def train_val_split(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split polyfid's run_training makes (val_size=n_val, seed): split_indices(n, [n - n_val, n_val])."""
    from polyfid.data.splits import split_indices

    tr, va = split_indices(n, [n - n_val, n_val], seed=seed)
    return tr, va


# ---- hippynn -------------------------------------------------------------------------
def import_hippynn(device: str = "cpu", compile_threads: int | None = 1):
    """Import hippynn with the settings PEERS.md found necessary: dynamo's recompile limit raised
    to 64 (hippynn's CPU kernels go through torch.compile; with varying batch shapes the default
    limit of 8 makes it fall back to code ~2.5x slower), no progress bars, no low-distance warnings."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    if hasattr(torch._dynamo.config, "cache_size_limit"):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if compile_threads is not None:
        try:
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = compile_threads  # no compile worker pool beside a 1-thread run
        except ImportError:  # pragma: no cover
            pass
    import hippynn

    hippynn.settings.WARN_LOW_DISTANCES = False
    hippynn.settings.PROGRESS = None
    return hippynn


def hippynn_network_params(species: list[int]) -> dict[str, Any]:
    """hippynn.networks.Hipnn keywords for the PEERS.md HIP-NN (species without the padding 0)."""
    return {
        "possible_species": [0, *sorted(int(z) for z in species)],
        "n_features": ARCH["n_features"],
        "n_sensitivities": ARCH["n_sensitivities"],
        "dist_soft_min": ARCH["soft_min"],
        "dist_soft_max": ARCH["soft_max"],
        "dist_hard_max": ARCH["cutoff"],
        "n_interaction_layers": ARCH["n_interactions"],
        "n_atom_layers": ARCH["n_atom_layers"],
        "resnet": ARCH["resnet"],
    }


def build_hippynn(species: list[int]):
    """hippynn graph: species/positions inputs -> Hipnn -> HEnergyNode, forces by GradientNode(sign=-1).

    Returns (species_node, positions_node, henergy, force) with db names Z, R, T, F.
    """
    from hippynn.graphs import inputs, networks, physics, targets

    species_node = inputs.SpeciesNode(db_name="Z")
    positions = inputs.PositionsNode(db_name="R")
    net = networks.Hipnn("hipnn", (species_node, positions), module_kwargs=hippynn_network_params(species))
    henergy = targets.HEnergyNode("HEnergy", net)
    force = physics.GradientNode("forces", (henergy, positions), sign=-1)
    henergy.mol_energy.db_name = "T"
    force.db_name = "F"
    return species_node, positions, henergy, force


def hippynn_training_graph(henergy, force):
    """Model and loss GraphModules from hippynn's own loss nodes.

    Returns (model, loss_module, input_db_names, target_db_names, output_nodes): model(*inputs)
    -> outputs (in the order of output_nodes) and loss_module(*outputs, *targets) -> [MSE(E), MSE(F)],
    combined with the recipe's weights by the caller (the energy weight changes during training).
    """
    from hippynn.experiment.assembly import determine_out_in_targ
    from hippynn.graphs import GraphModule
    from hippynn.graphs.nodes.loss import MSELoss

    loss_e, loss_f = MSELoss.of_node(henergy), MSELoss.of_node(force)
    ins, outs, tgts = determine_out_in_targ(loss_e, loss_f)
    # fixed orders (determine_out_in_targ returns them from sets)
    ins = sorted(ins, key=lambda n: n.db_name)
    outs = sorted(outs, key=lambda n: n.name)
    tgts = sorted(tgts, key=lambda n: n.db_name)
    model = GraphModule(ins, outs)
    loss_module = GraphModule((*[o.pred for o in outs], *[t.true for t in tgts]), [loss_e, loss_f])
    return model, loss_module, [n.db_name for n in ins], [n.db_name for n in tgts], outs


def n_params(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---- barrier between worker processes --------------------------------------------------
def barrier(folder: str | Path | None, name: str, n: int, timeout_s: float = 3600.0) -> None:
    """Wait until `n` processes have called barrier() on `folder` (a file each), so that
    side-by-side runs start their clocks together."""
    if folder is None or n <= 1:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.ready").write_text(str(os.getpid()))
    t0 = time.monotonic()
    while len(list(folder.glob("*.ready"))) < n:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"barrier {folder}: waited {timeout_s:.0f} s for {n} processes")
        time.sleep(0.05)


# ---- results -------------------------------------------------------------------------
def merge_json(path: str | Path, update: dict[str, Any], depth: int | None = 2) -> dict[str, Any]:
    """Merge `update` into the JSON file at `path` and write it atomically. Dictionaries merge
    `depth` levels deep (2: molecule -> model, each model's results replaced whole; None: all
    the way down); below that a value replaces what was there."""
    path = Path(path)
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    _merge(data, update, depth)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return data


def _merge(into: dict[str, Any], update: dict[str, Any], depth: int | None) -> None:
    for key, value in update.items():
        if (depth is None or depth > 1) and isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, None if depth is None else depth - 1)
        else:
            into[key] = value


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return str(x)


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def plot_parity(path: str | Path, title: str, entries: list[dict[str, Any]], max_points: int = 6000) -> Path:
    """One row per model: energy parity (per molecule, relative to the mean reference, meV)
    and force-component parity (meV/Å). entries: {label, e_ref, e_pred (eV), f_ref, f_pred (eV/Å)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyfid.analysis.plots import save_figure

    n = max(len(entries), 1)
    fig, axes = plt.subplots(n, 2, figsize=(8, 3.6 * n), squeeze=False)
    rng = np.random.default_rng(0)
    for row, e in zip(axes, entries):
        e_ref, e_pred = 1e3 * np.asarray(e["e_ref"]), 1e3 * np.asarray(e["e_pred"])
        shift = e_ref.mean()
        f_ref, f_pred = 1e3 * np.asarray(e["f_ref"]).ravel(), 1e3 * np.asarray(e["f_pred"]).ravel()
        e_mae, f_mae = float(np.mean(np.abs(e_pred - e_ref))), float(np.mean(np.abs(f_pred - f_ref)))
        if len(f_ref) > max_points:
            keep = rng.choice(len(f_ref), max_points, replace=False)
            f_ref, f_pred = f_ref[keep], f_pred[keep]
        for ax, ref, pred, what, unit, mae in (
            (row[0], e_ref - shift, e_pred - shift, "energy - mean (meV)", "meV", e_mae),
            (row[1], f_ref, f_pred, "force component (meV/Å)", "meV/Å", f_mae),
        ):
            ax.scatter(ref, pred, s=1.0, color="tab:blue", rasterized=True, linewidths=0)
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
            ax.set_xlabel(f"reference {what}", fontsize=8)
            ax.set_ylabel(f"predicted {what}", fontsize=8)
            ax.set_title(f"{e['label']}: MAE {mae:.3g} {unit}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=72)


class BudgetSchedule:
    """Batches for a wall-clock budget (s): cosine learning rate from lr0 to min_lr over the
    budget, energy weight raised to final_energy_weight for the last final_fraction of it (the
    PEERS.md recipe). Iterate `run(make_batches)` to get (batch, energy_weight); `epochs`
    counts the passes completed and `elapsed` the time since the first batch."""

    def __init__(self, budget_s: float, optimizer, recipe: dict[str, Any]) -> None:
        self.budget, self.optimizer = float(budget_s), optimizer
        self.lr0, self.min_lr = float(recipe["lr"]), float(recipe.get("min_lr", 0.0))
        self.w_e = float(recipe["energy_weight"])
        self.w_e_final = recipe.get("final_energy_weight")
        self.final_fraction = float(recipe.get("final_fraction", 0.25))
        self.epochs, self.elapsed = 0, 0.0

    def run(self, make_batches):
        from polyfid.train.loop import cosine_lr

        t_start = time.perf_counter()
        while True:
            for batch in make_batches():
                self.elapsed = time.perf_counter() - t_start
                if self.elapsed >= self.budget:
                    return
                frac = min(self.elapsed / self.budget, 1.0)
                for g in self.optimizer.param_groups:
                    g["lr"] = cosine_lr(self.lr0, self.min_lr, frac)
                final = self.w_e_final is not None and frac >= 1.0 - self.final_fraction
                yield batch, (float(self.w_e_final) if final else self.w_e)
            self.epochs += 1


def parse_value(text: str) -> Any:
    """A command-line value as YAML, with 2e-3 read as a number (YAML 1.1 reads it as a string)."""
    import yaml

    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


# ---- polyfid on rMD17 (shared by the benchmark scripts) -------------------------------
def errors(e_ref, e_pred, f_ref, f_pred, prefix: str = "") -> dict[str, float]:
    """MAE/RMSE in meV (per molecule) and meV/Å (all Cartesian components) from eV arrays."""
    de, df = 1e3 * (np.asarray(e_pred) - np.asarray(e_ref)), 1e3 * (np.asarray(f_pred) - np.asarray(f_ref))
    return {
        f"{prefix}energy_mae_meV": float(np.mean(np.abs(de))),
        f"{prefix}force_mae_meV_A": float(np.mean(np.abs(df))),
        f"{prefix}energy_rmse_meV": float(np.sqrt(np.mean(de**2))),
        f"{prefix}force_rmse_meV_A": float(np.sqrt(np.mean(df**2))),
    }


def train_polyfid_rmd17(
    data_dir: str | Path,
    molecule: str,
    model: dict[str, Any],
    recipe: dict[str, Any],
    budget_s: float,
    run_dir: str | Path,
    *,
    threads: int = 1,
    device: str = "cpu",
    seed: int = 0,
    n_val: int = 50,
    n_test: int | None = None,
    barrier_dir: str | Path | None = None,
    barrier_name: str = "polyfid",
    barrier_n: int = 1,
) -> dict[str, Any]:
    """Train polyfid (`model`: ModelConfig options, `recipe`: TrainingConfig options) on the rMD17
    split of the benchmarks (train file, `n_val` validation frames drawn with `seed`), for a
    wall-clock budget, without validation inside the budget; evaluate the final (EMA) weights on
    the test file (its first `n_test` frames if given).

    The same steps as rmd17.py's polyfid worker. Returns {"result": the JSON fields, "pred":
    {e_ref, e_pred, f_ref, f_pred} in eV and eV/Å, "model": the trained Potential,
    "test": the test Dataset}."""
    import csv
    import shutil

    import torch

    import polyfid
    from polyfid.analysis.metrics import error_metrics
    from polyfid.data.batch import PackedData
    from polyfid.data.readers import read
    from polyfid.train.run import run_training

    train_file, test_file = rmd17_files(data_dir, molecule)
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    config = {
        "data": {
            "train": [{"path": str(train_file), "format": "npz", "fidelity": FIDELITY}],
            "val_size": n_val,
            "seed": seed,
        },
        "model": dict(model),
        "training": {
            "epochs": 10**8,  # the wall-clock budget ends training
            "max_time_s": budget_s,
            "dtype": "float32",
            "seed": seed,
            "num_threads": threads,
            "device": device,
            # no validation inside the budget: the final (EMA) weights are evaluated
            "eval_every": 10**9,
            "early_stopping_patience": None,
            **recipe,
        },
        "output": {"dir": str(run_dir), "tensorboard": False, "plots": False, "progress": False},
    }
    barrier(barrier_dir, barrier_name, barrier_n)
    t_start = time.perf_counter()
    res = run_training(config)
    wall_s = time.perf_counter() - t_start

    # frames actually trained on, from the per-epoch log (the last epoch may be cut by the budget)
    with np.load(train_file) as d:
        n_frames = len(d["energies"])
    n_train = n_frames - n_val
    bs = int(config["training"]["batch_size"])
    full = math.ceil(n_train / bs)
    frames = steps = 0
    with open(run_dir / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            k = int(float(row["train_steps"]))
            steps += k
            frames += n_train if k == full else k * bs

    t0 = time.perf_counter()
    net = res.model
    test_ds = read(test_file, format="npz", fidelity=FIDELITY)
    if n_test is not None and n_test < len(test_ds):
        test_ds = test_ds[np.arange(n_test)]
    test = PackedData(test_ds, net.cutoff, net.fidelities, dtype=torch.float32)
    m = error_metrics(net, test, device=device)
    eval_s = time.perf_counter() - t0
    arr = m["_arrays"][FIDELITY]
    n_atoms = test.n_atoms.astype(float)
    pred = {
        "e_ref": arr["energy_ref"] * n_atoms, "e_pred": arr["energy_pred"] * n_atoms,
        "f_ref": arr["forces_ref"], "f_pred": arr["forces_pred"],
    }
    errs = errors(**pred)
    val = res.val_metrics.get(FIDELITY, {})
    result = {
        "energy_mae_meV": errs["energy_mae_meV"],
        "force_mae_meV_A": errs["force_mae_meV_A"],
        "train_s": res.train_s,
        "train_cfg_per_s": frames / res.train_s if res.train_s > 0 else float("nan"),
        "energy_rmse_meV": errs["energy_rmse_meV"],
        "force_rmse_meV_A": errs["force_rmse_meV_A"],
        "val_energy_mae_meV": val.get("energy_mae_meV"),
        "val_force_mae_meV_A": val.get("force_mae_meV_A"),
        "code": f"polyfid {polyfid.__version__}",
        "params": net.n_parameters(),
        "threads": threads,
        "budget_s": budget_s,
        "epochs": res.epochs,
        "steps": steps,
        "frames": frames,
        "stopped": res.stopped,
        "setup_s": wall_s - res.train_s,
        "eval_s": eval_s,
        "weights": "final EMA" if recipe.get("ema_decay") else "final",
        "recipe": dict(recipe),
        "model": dict(model),
        "n_train": n_train,
        "n_val": n_val,
        "n_test": test.n_frames,
        "run_dir": str(run_dir),
    }
    return {"result": result, "pred": pred, "model": net, "test": test_ds}
