#!/usr/bin/env python
"""Architectures on rMD17: polyfid's HIP-NN, HIP-NN-TS and HIP-HOP-NN beside MACE, accuracy against cost.

Data (split 01 of revised MD17, PBE/def2-SVP labels), as in rmd17.py: 950 training and 50
validation frames drawn with seed 0 from ``rmd17_<molecule>_train_01.npz``, test on all 1000
frames of ``rmd17_<molecule>_test_01.npz``. Every model gets the same wall-clock training
budget (--budget-s, default 600 s), 1 thread (--threads), float32, and the loss of
/work/shared/PEERS.md: 1·MSE(E/N) + 100·MSE(F), energy weight 1000 for the last quarter of the
budget, cosine decay of the learning rate over the budget. Models (result keys):

  hipnn     polyfid HIP-NN of PEERS.md (128 features, 20 sensitivities, soft 0.85-4.5 Å, cutoff
            5 Å, 2 interaction + 3 atom layers); common.TUNED_RECIPE: Adam 3e-3, weight decay
            1e-4, Huber loss (δ 0.01), batch 32, EMA 0.99, gradient clipping at 100
  hipnn_ts  polyfid "hipnn_ts", the same sizes, l_max 2; the same recipe
  hiphop    polyfid "hiphop", 64 features, 16 tensor channels, l_max 3, max_tensors 4, otherwise
            the same sizes; the same recipe (the widths chosen on validation, see POLYFID_ARCH)
  mace      mace-torch 0.3.16, the small standard model of PEERS.md (ScaleShiftMACE as its
            default "MACE" model: hidden irreps 32x0e+32x1o, max_ell 3, correlation 3,
            2 interactions, r_max 5, 8 Bessel functions, radial MLP [64, 64, 64], MLP irreps
            16x0e), float32, Adam (amsgrad) 1e-2, batch 10, EMA 0.99 (torch_ema), MACE's default
            weight decay 5e-7 (its decay groups) and gradient clipping at 10; our own loop over
            MACE's AtomicData and torch_geometric loader, so that the budget is wall-clock exact

Per model and molecule (each model in its own process, this script with --worker):
  force_mae_meV_A, energy_mae_meV  test errors of the weights at the end of the budget (EMA)
  train_cfg_per_s                  frames trained on / training seconds
  single_calls_per_s               the MD case, as throughput.py: the test geometries one after
                                   another through the model's ASE calculator, energy + forces,
                                   neighbour list included (polyfid.PolyfidCalculator with vesin,
                                   torch.compile'd where the architecture has explicit forces
                                   (hipnn), compiled during warm-up; mace.calculators.MACECalculator
                                   with its own neighbour list), after 20 warm-up calls
  batched_cfg_per_s                energy + forces of the test set from raw geometries in chunks
                                   of 250 frames, batches of 32, neighbour lists included
                                   (polyfid.api.predict; MACE AtomicData.from_config + its loader
                                   + the model), after one warm-up chunk, whole passes over the
                                   test set for at least --infer-window-s (default 10 s)
  n_params, peak_rss_mb            parameters; ru_maxrss of the worker process

Results merge into ``<out>/architectures.json`` (GPU: ``architectures_gpu.json``; --quick:
``benchmarks/runs/architectures_quick/architectures_quick.json``) as {molecule: {model: ...}}, so
partial runs (--molecules, --models) accumulate; ``architectures.png`` plots force MAE against
single-molecule calls/s, one panel per molecule. ``checks``: on aspirin, hiphop's force MAE at most
0.8 x hipnn's, and hiphop's single-molecule calls/s at least 3 x MACE's.

Architecture and training options are overridable: --set MODEL.KEY=VALUE, KEY an option of
polyfid's model: or training: section (polyfid models), or of MACE_ARCH / MACE_RECIPE below (mace),
e.g. --set hiphop.n_features=64 --set hiphop.lr=2e-3 --set mace.max_ell=2.

  python benchmarks/architectures.py                          # full run: 4 models x 2 molecules (~95 min)
  python benchmarks/architectures.py --parallel 2             # two workers at a time (~50 min; noisier timings)
  python benchmarks/architectures.py --molecules aspirin --models hiphop --set hiphop.n_features=64
  python benchmarks/architectures.py --quick --molecules ethanol --models hipnn mace   # smoke test
  python benchmarks/architectures.py --extra-molecules azobenzene
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import ARCH, KCAL_MOL_EV, PEERS_RECIPE  # noqa: E402

MOLECULES = ("ethanol", "aspirin")
EXTRA_MOLECULES = ("azobenzene",)  # the third rMD17 molecule in ../shared/data/rmd17
MODELS = ("hipnn", "hipnn_ts", "hiphop", "mace")
N_VAL = 50
BUDGET_S = 600.0
QUICK_BUDGET_S = 30.0
QUICK_N_TEST = 200
CHUNK = 250  # frames per batched-inference call (as throughput.py)
BATCH = 32  # inference batch size (as throughput.py)
N_WARMUP_CALLS = 20

#: polyfid networks: ModelConfig options
POLYFID_ARCH = {
    "hipnn": dict(ARCH),
    "hipnn_ts": ARCH | {"architecture": "hipnn_ts", "l_max": 2},
    # half the width, 16 tensor channels, chosen on validation before the monomial harmonics: at
    # equal CPU time on aspirin the 128-feature, 32-channel model (then 4.1x HIP-NN's step time)
    # trained too few epochs (validation F MAE 159 against HIP-NN's 96); 64/16 (then 2.2x) reached
    # 85.0 against 96.6 in the same run, 64/8 (1.5x) 87.3 against 87.4. Now 1.17x and 2.37x
    # (step_cost.py, after the compact invariants' cheaper derivative)
    "hiphop": ARCH | {"architecture": "hiphop", "l_max": 3, "max_tensors": 4, "n_features": 64,
                      "tensor_features": 16},
}
#: polyfid recipe: PEERS.md's loss and schedule with the optimiser settings tuned on rMD17 ethanol's
#: validation frames (rmd17.py's long runs), the same for the three polyfid networks
POLYFID_RECIPE = dict(common.TUNED_RECIPE)
#: architectures whose single-molecule calls go through torch.compile: faster for HIP-NN; HIP-HOP-NN's
#: compiled CPU code is slower than eager (aspirin, 1 thread: 15 against 68 calls/s), HIP-NN-TS has no
#: explicit forces
COMPILE_SINGLE = ("hipnn",)

#: MACE's small standard model (PEERS.md), the rest as mace's own defaults for --model MACE
MACE_ARCH = {
    "hidden_irreps": "32x0e+32x1o",
    "max_ell": 3,
    "correlation": 3,
    "num_interactions": 2,
    "r_max": 5.0,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "MLP_irreps": "16x0e",
    "radial_MLP": [64, 64, 64],
    "gate": "silu",
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticInteractionBlock",
    "scaling": "rms_forces_scaling",
}
#: the same loss and schedule as the polyfid models; MACE's optimiser settings
MACE_RECIPE = PEERS_RECIPE | {
    "batch_size": 10,
    "lr": 1e-2,
    "amsgrad": True,
    "weight_decay": 5e-7,
    "grad_clip": 10.0,
    "ema_decay": 0.99,
}

LABELS = {"hipnn": "HIP-NN", "hipnn_ts": "HIP-NN-TS", "hiphop": "HIP-HOP-NN", "mace": "MACE"}
COLORS = {"hipnn": "tab:blue", "hipnn_ts": "tab:green", "hiphop": "tab:red", "mace": "tab:purple"}
REQUIRED = ("force_mae_meV_A", "energy_mae_meV", "train_cfg_per_s", "single_calls_per_s", "batched_cfg_per_s",
            "n_params", "peak_rss_mb")


# ======================================================================================
# workers
# ======================================================================================
def _rate_passes(run_pass, n_per_pass: int, min_s: float, device: str) -> tuple[float, int, float]:
    """Repeat run_pass() (n_per_pass frames each) until min_s seconds have passed (at least once);
    returns (frames per second, frames, seconds)."""
    t0 = time.perf_counter()
    n = 0
    while True:
        run_pass()
        n += n_per_pass
        common.synchronize(device)
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return n / dt, n, dt


def _single_calls(atoms, positions: np.ndarray, device: str) -> tuple[float, float]:
    """Energy and forces of each geometry in turn through atoms' calculator: N_WARMUP_CALLS
    warm-up calls (not timed), then every geometry once. Returns (calls per second, warm-up s)."""
    t0 = time.perf_counter()
    for k in range(N_WARMUP_CALLS):
        atoms.positions = positions[k % len(positions)]
        atoms.get_potential_energy()
        atoms.get_forces()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for pos in positions:
        atoms.positions = pos
        atoms.get_potential_energy()
        atoms.get_forces()
    common.synchronize(device)
    return len(positions) / (time.perf_counter() - t0), warm_s


def _write(a: argparse.Namespace, result: dict[str, Any], pred: dict[str, np.ndarray]) -> None:
    result["peak_rss_mb"] = common.peak_rss_mb()
    result = {k: result[k] for k in REQUIRED} | {k: v for k, v in result.items() if k not in REQUIRED}
    arrays = {k: np.asarray(v, dtype=np.float64 if k.startswith("e_") else np.float32) for k, v in pred.items()}
    np.savez(a.pred, **arrays)
    Path(a.fragment).write_text(json.dumps(result, indent=2, default=common._json_default))


def polyfid_worker(a: argparse.Namespace) -> None:
    common.set_threads(a.threads)
    import ase

    from polyfid.api import predict
    from polyfid.calculators.ase import PolyfidCalculator

    arch, recipe = json.loads(a.arch), json.loads(a.recipe)
    out = common.train_polyfid_rmd17(a.data_dir, a.molecule, arch, recipe, a.budget_s, a.run_dir,
                                     threads=a.threads, device=a.device, seed=a.seed, n_val=N_VAL, n_test=a.n_test)
    result, pred, model, test_ds = out["result"], out["pred"], out["model"], out["test"]
    model.eval()

    # batched inference from raw geometries (as throughput.py): polyfid.api.predict on ASE Atoms
    atoms = [ase.Atoms(numbers=f.numbers, positions=f.positions) for f in test_ds]
    chunks = [atoms[i:i + CHUNK] for i in range(0, len(atoms), CHUNK)]
    if a.device.startswith("cuda"):
        import torch

        from polyfid.analysis.metrics import predict_packed
        from polyfid.data.batch import PackedData
        from polyfid.data.frame import Dataset, Frame

        def run_chunk(c):
            packed = PackedData(Dataset([Frame(x.numbers, x.positions) for x in c]), model.cutoff, model.fidelities,
                                dtype=torch.float32)
            predict_packed(model, packed, batch_size=BATCH, forces=True, device=a.device)
        batched_path = "Frame -> PackedData (vesin) -> predict_packed on the GPU"
    else:
        def run_chunk(c):
            predict(model, c, batch_size=BATCH)
        batched_path = "polyfid.api.predict on ASE Atoms (vesin neighbour lists), batch 32"

    def one_pass():
        for c in chunks:
            run_chunk(c)

    run_chunk(chunks[0])  # warm-up
    batched, _, _ = _rate_passes(one_pass, len(atoms), a.infer_window_s, a.device)

    # single-molecule calls through the ASE calculator (compiled where the architecture allows)
    compiled = bool(model.explicit and arch["architecture"] in COMPILE_SINGLE and not a.no_compile)
    positions = np.stack([f.positions for f in test_ds])
    calc_atoms = ase.Atoms(numbers=test_ds[0].numbers, positions=positions[0])
    calc_atoms.calc = PolyfidCalculator(model, dtype="float32", device=a.device, compile=compiled)
    single, warm_s = _single_calls(calc_atoms, positions, a.device)

    result |= {
        "n_params": result.pop("params"),
        "single_calls_per_s": single,
        "batched_cfg_per_s": batched,
        "single_path": "polyfid.PolyfidCalculator (vesin neighbour list per call"
                       + (", torch.compile'd during warm-up)" if compiled else ", not compiled: "
                          + ("--no-compile)" if a.no_compile else "eager, see COMPILE_SINGLE)")),
        "single_compiled": compiled,
        "single_warmup_s": warm_s,
        "batched_path": batched_path,
        "architecture": arch["architecture"],
    }
    _write(a, result, pred)


def import_mace():
    """Import mace with PEERS.md's workaround: e3nn 0.4.4 torch.load()s its constants, which
    torch >= 2.6 refuses unless `slice` is an allowed global."""
    if importlib.util.find_spec("mace") is None:
        raise SystemExit("mace-torch is not installed: pip install -e '.[peers]' (pins mace-torch==0.3.16)")
    import torch

    torch.serialization.add_safe_globals([slice])
    warnings.filterwarnings("ignore", category=UserWarning)  # TorchScript annotation warnings of e3nn
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the calculator logs its dtype choice at warning level
    import mace

    return mace


def mace_worker(a: argparse.Namespace) -> None:
    """MACE trained with our own wall-clock loop over mace's AtomicData, torch_geometric loader and
    model; energies in eV relative to the mean training energy (float64), E0s zero (one
    composition: MACE's least-squares "average" E0s would give the same up to that constant)."""
    common.set_threads(a.threads)
    import_mace()
    import mace
    import torch
    from e3nn import o3
    from mace import data as mdata
    from mace import modules, tools
    from mace.calculators import MACECalculator
    from mace.tools import torch_geometric
    from torch_ema import ExponentialMovingAverage

    arch, recipe = json.loads(a.arch), json.loads(a.recipe)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    device = torch.device(a.device)
    t_setup = time.perf_counter()

    train_file, test_file = common.rmd17_files(a.data_dir, a.molecule)
    tr, te = common.load_rmd17(train_file), common.load_rmd17(test_file)
    if a.n_test is not None:
        te = {k: (v if k == "numbers" else v[: a.n_test]) for k, v in te.items()}
    train_idx, val_idx = common.train_val_split(len(tr["energies"]), N_VAL, a.seed)
    numbers = tr["numbers"]
    shift = float(tr["energies"][train_idx].mean())  # kcal/mol, float64
    zs = sorted(set(numbers.tolist()))
    z_table = tools.AtomicNumberTable(zs)
    r_max = float(arch["r_max"])

    def to_data(positions, energy=None, forces=None):
        props = {} if energy is None else {"energy": (energy - shift) * KCAL_MOL_EV, "forces": forces * KCAL_MOL_EV}
        cfg = mdata.Configuration(atomic_numbers=numbers, positions=positions, properties=props,
                                  property_weights={"energy": 1.0, "forces": 1.0}, pbc=(False, False, False),
                                  cell=np.zeros((3, 3)))
        return mdata.AtomicData.from_config(cfg, z_table=z_table, cutoff=r_max)

    def dataset(d, idx):
        return [to_data(d["positions"][i], d["energies"][i], d["forces"][i]) for i in idx]

    train_set, val_set = dataset(tr, train_idx), dataset(tr, val_idx)
    test_set = dataset(te, range(len(te["energies"])))
    bs = int(recipe["batch_size"])
    loader = torch_geometric.dataloader.DataLoader(train_set, batch_size=bs, shuffle=True, drop_last=False)
    stats_loader = torch_geometric.dataloader.DataLoader(train_set, batch_size=100, shuffle=False)
    avg_num_neighbors = modules.compute_avg_num_neighbors(stats_loader)
    atomic_energies = np.zeros(len(zs))
    _, std = modules.scaling_classes[arch["scaling"]](stats_loader, atomic_energies)
    model = modules.ScaleShiftMACE(
        r_max=r_max,
        num_bessel=int(arch["num_bessel"]),
        num_polynomial_cutoff=int(arch["num_polynomial_cutoff"]),
        max_ell=int(arch["max_ell"]),
        interaction_cls=modules.interaction_classes[arch["interaction"]],
        interaction_cls_first=modules.interaction_classes[arch["interaction_first"]],
        num_interactions=int(arch["num_interactions"]),
        num_elements=len(zs),
        hidden_irreps=o3.Irreps(arch["hidden_irreps"]),
        MLP_irreps=o3.Irreps(arch["MLP_irreps"]),
        atomic_energies=atomic_energies,
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=zs,
        correlation=int(arch["correlation"]),
        gate=modules.gate_dict[arch["gate"]],
        atomic_inter_scale=std,
        atomic_inter_shift=0.0,
        radial_MLP=list(arch["radial_MLP"]),
        radial_type="bessel",
    ).to(device)

    # MACE's parameter groups (mace.tools.scripts_utils.get_params_options): weight decay only on the
    # interactions' linear weights and the products
    decay, no_decay = [], []
    for name, p in model.interactions.named_parameters():
        (decay if ("linear.weight" in name or "skip_tp_full.weight" in name) else no_decay).append(p)
    wd = float(recipe["weight_decay"])
    groups = [
        {"params": list(model.node_embedding.parameters()), "weight_decay": 0.0},
        {"params": decay, "weight_decay": wd},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": list(model.products.parameters()), "weight_decay": wd},
        {"params": list(model.readouts.parameters()), "weight_decay": 0.0},
    ]
    optimizer = torch.optim.Adam(groups, lr=float(recipe["lr"]), amsgrad=bool(recipe["amsgrad"]))
    ema = ExponentialMovingAverage(model.parameters(), decay=float(recipe["ema_decay"])) \
        if recipe.get("ema_decay") else None
    w_f = float(recipe["force_weight"])
    clip = recipe.get("grad_clip")
    budget = float(a.budget_s)
    setup_s = time.perf_counter() - t_setup

    # training: loss w_e·MSE(E/N) + w_f·MSE(F) in eV, cosine learning rate over the wall-clock budget
    model.train()
    steps = frames = 0
    schedule = common.BudgetSchedule(budget, optimizer, recipe)
    t_start = time.perf_counter()
    for batch, energy_weight in schedule.run(lambda: loader):
        batch = batch.to(device)
        out = model(batch.to_dict(), training=True, compute_force=True)
        n_per = (batch.ptr[1:] - batch.ptr[:-1]).to(out["energy"].dtype)
        mse_e = torch.mean(((out["energy"] - batch.energy) / n_per) ** 2)
        mse_f = torch.mean((out["forces"] - batch.forces) ** 2)
        loss = energy_weight * mse_e + w_f * mse_f
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(clip))
        optimizer.step()
        if ema is not None:
            ema.update()
        steps += 1
        frames += int(batch.num_graphs)
    epochs = schedule.epochs
    common.synchronize(a.device)
    train_s = time.perf_counter() - t_start

    # the final (EMA) weights, in a copy for inference
    t0 = time.perf_counter()
    if ema is not None:
        ema.copy_to(model.parameters())
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)

    def predict(data_list) -> tuple[np.ndarray, np.ndarray]:
        es, fs = [], []
        for b in torch_geometric.dataloader.DataLoader(data_list, batch_size=50, shuffle=False):
            o = net(b.to(device).to_dict(), training=False, compute_force=True)
            es.append(o["energy"].detach().double().cpu().numpy())
            fs.append(o["forces"].detach().double().cpu().numpy())
        return np.concatenate(es) + shift * KCAL_MOL_EV, np.concatenate(fs)

    e_pred, f_pred = predict(test_set)
    pred = {"e_ref": te["energies"] * KCAL_MOL_EV, "e_pred": e_pred,
            "f_ref": (te["forces"] * KCAL_MOL_EV).reshape(-1, 3), "f_pred": f_pred}
    errs = common.errors(**pred)
    ve, vf = predict(val_set)
    val = common.errors(tr["energies"][val_idx] * KCAL_MOL_EV, ve, tr["forces"][val_idx].reshape(-1, 3) * KCAL_MOL_EV,
                        vf, prefix="val_")
    eval_s = time.perf_counter() - t0

    # batched inference from raw geometries: MACE's neighbour list (AtomicData.from_config), its
    # loader, the model; chunks of 250 frames, batches of 32
    positions = te["positions"]
    chunks = [positions[i:i + CHUNK] for i in range(0, len(positions), CHUNK)]

    def run_chunk(c):
        data_list = [to_data(p) for p in c]
        for b in torch_geometric.dataloader.DataLoader(data_list, batch_size=BATCH, shuffle=False):
            o = net(b.to(device).to_dict(), training=False, compute_force=True)
            o["forces"].detach().cpu()

    def one_pass():
        for c in chunks:
            run_chunk(c)

    run_chunk(chunks[0])  # warm-up
    batched, _, _ = _rate_passes(one_pass, len(positions), a.infer_window_s, a.device)

    # single-molecule calls through MACE's ASE calculator (its own neighbour list per call)
    import ase

    calc = MACECalculator(models=copy.deepcopy(net), device=a.device, default_dtype="float32")
    calc_atoms = ase.Atoms(numbers=numbers, positions=positions[0])
    calc_atoms.calc = calc
    single, warm_s = _single_calls(calc_atoms, positions, a.device)

    result = {
        "force_mae_meV_A": errs["force_mae_meV_A"],
        "energy_mae_meV": errs["energy_mae_meV"],
        "train_cfg_per_s": frames / train_s if train_s > 0 else float("nan"),
        "single_calls_per_s": single,
        "batched_cfg_per_s": batched,
        "n_params": common.n_params(model),
        "energy_rmse_meV": errs["energy_rmse_meV"],
        "force_rmse_meV_A": errs["force_rmse_meV_A"],
        "val_energy_mae_meV": val["val_energy_mae_meV"],
        "val_force_mae_meV_A": val["val_force_mae_meV_A"],
        "train_s": train_s,
        "code": f"mace-torch {mace.__version__}",
        "threads": a.threads,
        "budget_s": a.budget_s,
        "epochs": epochs,
        "steps": steps,
        "frames": frames,
        "setup_s": setup_s,
        "eval_s": eval_s,
        "weights": "final EMA" if ema is not None else "final",
        "recipe": recipe,
        "model": arch | {"class": "ScaleShiftMACE", "avg_num_neighbors": avg_num_neighbors,
                         "atomic_inter_scale": float(np.asarray(std).ravel()[0]), "atomic_inter_shift": 0.0,
                         "E0s": "zero (energies relative to the mean training energy)"},
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_test": len(te["energies"]),
        "single_path": "mace.calculators.MACECalculator(models=..., default_dtype='float32') (its neighbour "
                       "list per call; not compiled)",
        "single_compiled": False,
        "single_warmup_s": warm_s,
        "batched_path": "mace AtomicData.from_config (its neighbour list) + torch_geometric loader + model, batch 32",
        "units": "trained in eV; errors in meV, meV/Å",
    }
    _write(a, result, pred)


# ======================================================================================
# parent: launch workers, merge, plot, print
# ======================================================================================
def polyfid_option_keys() -> tuple[set[str], set[str]]:
    """(ModelConfig option names, TrainingConfig option names) of polyfid."""
    import dataclasses

    from polyfid.train.config import ModelConfig, TrainingConfig

    return {f.name for f in dataclasses.fields(ModelConfig)}, {f.name for f in dataclasses.fields(TrainingConfig)}


def parse_overrides(items: list[str], models: list[str]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """--set MODEL.KEY=VALUE -> {model: (architecture options, recipe options)}: the defaults with
    the overrides applied (values parsed as YAML)."""

    out = {m: (dict(POLYFID_ARCH[m]), dict(POLYFID_RECIPE)) if m != "mace" else (dict(MACE_ARCH), dict(MACE_RECIPE))
           for m in MODELS}
    model_keys, training_keys = polyfid_option_keys()
    for item in items:
        name, eq, value = item.partition("=")
        model, dot, key = name.strip().partition(".")
        if not eq or not dot or model not in MODELS:
            raise SystemExit(f"--set expects MODEL.KEY=VALUE with MODEL one of {', '.join(MODELS)}, got {item!r}")
        v = common.parse_value(value)
        arch, recipe = out[model]
        if model == "mace":
            arch_keys, recipe_keys = set(MACE_ARCH), set(MACE_RECIPE)
        else:
            arch_keys, recipe_keys = model_keys - {"architecture"}, training_keys
        if key in arch_keys:
            arch[key] = v
        elif key in recipe_keys:
            recipe[key] = v
        else:
            raise SystemExit(f"--set {item}: {key!r} is neither a model nor a training option of {model} "
                             f"(model: {', '.join(sorted(arch_keys))}; training: {', '.join(sorted(recipe_keys))})")
    return {m: out[m] for m in models}


def _spec(args, work: Path, molecule: str, model: str, arch: dict, recipe: dict, budget: float) -> dict[str, Any]:
    tag = f"{molecule}_{model}"
    fragment, pred = work / "fragments" / f"{tag}.json", work / "predictions" / f"{tag}.npz"
    return {
        "key": model,
        "molecule": molecule,
        "threads": args.threads,
        "log": work / "logs" / f"{tag}.log",
        "fragment": fragment,
        "pred": pred,
        "cmd": [
            sys.executable, str(Path(__file__).resolve()), "--worker", "mace" if model == "mace" else "polyfid",
            "--molecules", molecule, "--data-dir", str(args.data_dir), "--device", args.device,
            "--seed", str(args.seed), "--worker-budget-s", str(budget), "--threads", str(args.threads),
            "--arch", json.dumps(arch), "--recipe", json.dumps(recipe),
            "--fragment", str(fragment), "--pred", str(pred), "--run-dir", str(work / "polyfid_runs" / tag),
            "--infer-window-s", str(args.infer_window_s),
            *(["--n-test", str(args.n_test)] if args.n_test else []),
            *(["--no-compile"] if args.no_compile else []),
        ],
    }


def run_pool(specs: list[dict[str, Any]], parallel: int, on_done) -> list[str]:
    """Run the worker processes, `parallel` at a time, in order; on_done(spec, fragment) after each
    success. Returns the failures (one line each); a failed worker does not stop the others."""
    pending, running, failures = list(specs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            s = pending.pop(0)
            for p in (s["log"], s["fragment"], s["pred"]):
                p.parent.mkdir(parents=True, exist_ok=True)
            s["fragment"].unlink(missing_ok=True)
            print(f"  start {s['molecule']} {s['key']}; log {s['log']}", flush=True)
            fh = open(s["log"], "w")
            s["t0"] = time.perf_counter()
            running.append((s, subprocess.Popen(s["cmd"], stdout=fh, stderr=subprocess.STDOUT,
                                                env=common.thread_env(s["threads"])),
                            fh))
        time.sleep(0.5)
        for item in list(running):
            s, p, fh = item
            if p.poll() is None:
                continue
            running.remove(item)
            fh.close()
            if p.returncode != 0 or not s["fragment"].exists():
                tail = "".join(s["log"].read_text().splitlines(keepends=True)[-25:])
                msg = f"{s['molecule']} {s['key']} failed (exit {p.returncode}); log {s['log']}"
                print(f"  FAILED {msg}:\n{tail}", flush=True)
                failures.append(msg)
            else:
                frag = json.loads(s["fragment"].read_text())
                frag["worker_wall_s"] = time.perf_counter() - s["t0"]
                on_done(s, frag)
    return failures


def checks(results: dict[str, Any]) -> tuple[dict[str, bool], dict[str, Any]]:
    """The targets: on aspirin, hiphop's force MAE <= 0.8 x hipnn's and hiphop's single-molecule
    calls/s >= 3 x MACE's. Returns (checks, the ratios behind them, for every molecule)."""
    out: dict[str, bool] = {}
    ratios: dict[str, Any] = {}
    for mol, r in results.items():
        if not isinstance(r, dict) or "hiphop" not in r:
            continue
        h = r["hiphop"]
        rat = {}
        if "hipnn" in r:
            rat["hiphop_over_hipnn_force_mae"] = h["force_mae_meV_A"] / r["hipnn"]["force_mae_meV_A"]
        if "mace" in r:
            rat["hiphop_over_mace_single_calls"] = h["single_calls_per_s"] / r["mace"]["single_calls_per_s"]
            rat["hiphop_over_mace_force_mae"] = h["force_mae_meV_A"] / r["mace"]["force_mae_meV_A"]
        if rat:
            ratios[mol] = rat
        if mol == "aspirin":
            if "hiphop_over_hipnn_force_mae" in rat:
                out["aspirin_hiphop_force_mae<=0.8x_hipnn"] = bool(rat["hiphop_over_hipnn_force_mae"] <= 0.8)
            if "hiphop_over_mace_single_calls" in rat:
                out["aspirin_hiphop_single_calls_per_s>=3x_mace"] = bool(rat["hiphop_over_mace_single_calls"] >= 3.0)
    return out, ratios


def plot(path: Path, results: dict[str, Any]) -> Path | None:
    """Force MAE against single-molecule calls/s, one panel per molecule, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    threads = results.get("protocol", {}).get("threads", 1)
    mols = [m for m in (*MOLECULES, *EXTRA_MOLECULES) if isinstance(results.get(m), dict) and results[m]]
    if not mols:
        return None
    fig, axes = plt.subplots(1, len(mols), figsize=(4.6 * len(mols), 4.0), squeeze=False)
    for ax, mol in zip(axes[0], mols):
        budgets = set()
        for key, r in results[mol].items():
            if not all(k in r for k in ("single_calls_per_s", "force_mae_meV_A")):
                continue
            budgets.add(r.get("budget_s"))
            x, y = r["single_calls_per_s"], r["force_mae_meV_A"]
            ax.scatter([x], [y], s=60, color=COLORS.get(key, "k"), zorder=3)
            ax.annotate(f"{LABELS.get(key, key)}\n{r['n_params'] / 1e3:.0f}k params", (x, y), fontsize=7,
                        xytext=(5, 4), textcoords="offset points")
        ax.set_xscale("log")
        xs = [r["single_calls_per_s"] for r in results[mol].values() if "single_calls_per_s" in r]
        if xs:  # room for the labels; ticks at 1, 2, 5 x 10^k
            ax.set_xlim(min(xs) / 1.5, max(xs) * 3)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.15)
        ax.set_xlabel(f"single-molecule E+F calls/s (ASE calculator, {threads} thread(s))", fontsize=8)
        ax.set_ylabel("test force MAE (meV/Å)", fontsize=8)
        b = ", ".join(f"{x:g} s" for x in sorted(v for v in budgets if v is not None))
        ax.set_title(f"rMD17 {mol} ({b} training)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"accuracy against cost, {results.get('device', 'cpu')}: lower right is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_mols = (*MOLECULES, *EXTRA_MOLECULES)
    p.add_argument("--molecules", nargs="+", default=list(MOLECULES), choices=all_mols)
    p.add_argument("--extra-molecules", nargs="+", default=[], choices=EXTRA_MOLECULES,
                   help="more rMD17 molecules after --molecules (pyseqm is not supported)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"training budget per model and molecule (default {BUDGET_S:.0f} s; "
                   f"--quick {QUICK_BUDGET_S:.0f} s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--parallel", type=int, default=1, help="workers at a time (default 1: one after the other)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE", dest="overrides",
                   help="override a model or training option, e.g. --set hiphop.n_features=64")
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                   "with --quick the work folder)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="run folders, logs and predictions (default benchmarks/runs/architectures[_gpu][_quick])")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_BUDGET_S:.0f} s budgets, {QUICK_N_TEST} test frames, results in the "
                   "work folder")
    p.add_argument("--n-test", type=int, default=None, help="test frames (default all 1000; --quick 200)")
    p.add_argument("--infer-window-s", type=float, default=None,
                   help="batched inference: whole passes over the test set for at least this long (default 10 s; "
                   "--quick 2 s)")
    p.add_argument("--no-compile", action="store_true",
                   help="polyfid's calculator without torch.compile (by default HIP-NN's is compiled, as in "
                   "throughput.py; hipnn_ts and hiphop run eager, see COMPILE_SINGLE)")
    p.add_argument("--seed", type=int, default=0)
    # worker (internal)
    p.add_argument("--worker", choices=["polyfid", "mace"], help=argparse.SUPPRESS)
    p.add_argument("--worker-budget-s", type=float, help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--fragment", help=argparse.SUPPRESS)
    p.add_argument("--pred", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.infer_window_s = args.infer_window_s or (2.0 if args.quick else 10.0)
    args.n_test = args.n_test or (QUICK_N_TEST if args.quick else None)

    if args.worker:
        args.molecule = args.molecules[0]
        args.budget_s = args.worker_budget_s
        (mace_worker if args.worker == "mace" else polyfid_worker)(args)
        return 0

    if "mace" in args.models and importlib.util.find_spec("mace") is None:
        raise SystemExit("mace was requested but mace-torch is not installed: pip install -e '.[peers]' "
                         "(pins mace-torch==0.3.16), or leave it out with --models hipnn hipnn_ts hiphop")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch")
    molecules = list(dict.fromkeys([*args.molecules, *args.extra_molecules]))
    for mol in molecules:
        common.rmd17_files(args.data_dir, mol)  # fail early on missing data
    settings = parse_overrides(args.overrides, args.models)
    budget = args.budget_s or (QUICK_BUDGET_S if args.quick else BUDGET_S)
    stem = common.results_name("architectures", args.device, args.quick)
    work = args.work_dir or (common.DEFAULT_WORK / stem)
    out = args.out or (work if args.quick else common.DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / f"{stem}.json"
    parallel = max(1, args.parallel)

    print(f"{len(molecules)} molecule(s) x {len(args.models)} model(s), {budget:.0f} s budget each, "
          f"{args.threads} thread(s) per worker, {parallel} worker(s) at a time -> {results_path}", flush=True)
    t_all = time.perf_counter()
    specs = [_spec(args, work, mol, m, *settings[m], budget) for mol in molecules for m in args.models]
    device = common.device_name(args.device)

    def on_done(s: dict[str, Any], frag: dict[str, Any]) -> None:
        frag["schedule"] = "sequential" if parallel == 1 else f"{parallel} workers at a time"
        common.merge_json(results_path, {"device": device, s["molecule"]: {s["key"]: frag}})
        print(f"    {s['molecule']} {s['key']}: F MAE {frag['force_mae_meV_A']:.1f} meV/Å, "
              f"E MAE {frag['energy_mae_meV']:.2f} meV, train {frag['train_cfg_per_s']:.0f} cfg/s, "
              f"single {frag['single_calls_per_s']:.1f} calls/s, batched {frag['batched_cfg_per_s']:.0f} cfg/s, "
              f"{frag['n_params']} params, {frag['peak_rss_mb']:.0f} MB ({frag['worker_wall_s']:.0f} s)", flush=True)

    failures = run_pool(specs, parallel, on_done)

    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    ok, ratios = checks(results)
    results = common.merge_json(results_path, {
        "device": device,
        "machine": common.machine_info(args.device),
        "budget_s": budget,
        "checks": ok,
        "ratios": ratios,
        "protocol": {
            "n_train": 1000 - N_VAL, "n_val": N_VAL, "split_seed": args.seed, "n_test": args.n_test or 1000,
            "budget_s": budget, "threads": args.threads, "parallel": parallel, "dtype": "float32",
            "infer_window_s": args.infer_window_s, "single_warmup_calls": N_WARMUP_CALLS,
            "polyfid_recipe": POLYFID_RECIPE, "mace_recipe": MACE_RECIPE, "overrides": args.overrides,
            "quick": args.quick,
        },
    })
    png = plot(out / f"{stem}.png", results)
    print(f"\n{results_path}  (device {results['device']}, {time.perf_counter() - t_all:.0f} s)")
    if png:
        print(f"plot {png}")
    rows = []
    for mol in all_mols:
        for key in MODELS:
            r = results.get(mol, {}).get(key)
            if r:
                rows.append([mol, key, r["force_mae_meV_A"], r["energy_mae_meV"], r["train_cfg_per_s"],
                             r["single_calls_per_s"], r["batched_cfg_per_s"], r["n_params"], r["peak_rss_mb"]])
    common.print_table(["molecule", "model", "F MAE meV/Å", "E MAE meV", "train cfg/s", "single calls/s",
                        "batched cfg/s", "params", "RSS MB"], rows)
    for name, passed in results.get("checks", {}).items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    if failures:
        print("failed workers:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
