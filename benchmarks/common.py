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
def merge_json(path: str | Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into the JSON file at `path` (two levels deep: molecule -> model)."""
    path = Path(path)
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            for k2, v2 in value.items():
                data[key][k2] = v2
        else:
            data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return data


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
