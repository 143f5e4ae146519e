"""The polyfid demo: real GFN2-xTB data for ethanol, a HIP-NN trained on it, and MD with the result.

1. Data. Langevin MD of ethanol (``ase.build.molecule("CH3CH2OH")``) with GFN2-xTB forces from
   ``tblite`` (its ASE calculator returns eV and eV/Å) at several temperatures; frames are taken
   every ``stride`` steps after an equilibration and written as extended XYZ with their xTB energy
   and forces. The test set holds whole trajectories run from other seeds, so test frames are not
   close neighbours in time of training frames. The random number generators are seeded: the same
   settings give the same frames. Existing files are reused (delete them to regenerate).
2. Training through the library API (:func:`polyfid.train.run.run_training`), test errors per
   fidelity, loss curves and parity plots in the run folder.
3. NVE MD (velocity Verlet) with :class:`polyfid.calculators.ase.PolyfidCalculator` on the trained
   model: energy drift, and xTB single points on frames of that ML trajectory (force MAE).

``run_demo(out, quick)`` does all of it, prints a summary and writes ``summary.json``;
``polyfid demo`` is its command line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyfid.sample import one_thread, run_md, single_point, snapshot, thermalize, write_structures, xtb_calculator

#: fidelity name of the demo's labels
FIDELITY = "gfn2_xtb"
METHOD = "GFN2-xTB"


# ---- data generation ------------------------------------------------------------------------
@dataclass
class MDSettings:
    """Langevin MD sampling: one trajectory per temperature, seeded by (seed, temperature)."""

    temperatures_K: list[float] = field(default_factory=lambda: [300.0, 600.0, 1000.0])
    frames_per_temperature: int = 100
    stride: int = 10  # MD steps between saved frames
    equilibration: int = 200  # MD steps before the first saved frame
    timestep_fs: float = 0.5
    friction_per_fs: float = 0.02
    seed: int = 0


def generate(path: str | Path, settings: MDSettings, calc=None) -> list:
    """Run `settings` and write the frames (with xTB energy and forces) to `path` (extxyz)."""
    calc = calc if calc is not None else xtb_calculator()
    frames = []
    for t in settings.temperatures_K:
        frames += run_md(
            t, settings.frames_per_temperature, settings.stride, settings.equilibration,
            settings.timestep_fs, settings.friction_per_fs, settings.seed, calc=calc,
        )
    write_structures(path, frames)
    return frames


def load_or_generate(path: str | Path, settings: MDSettings, calc=None) -> tuple[list, bool]:
    """Frames of `path` if it exists (the cache), else generated and written; (frames, generated)."""
    import ase.io

    path = Path(path)
    if path.exists():
        return ase.io.read(path, index=":"), False
    return generate(path, settings, calc), True


# ---- the whole demo -------------------------------------------------------------------------
@dataclass
class DemoSettings:
    train: MDSettings
    test: MDSettings
    max_time_s: float
    md_steps: int = 200
    md_temperature_K: float = 300.0
    check_every: int = 40  # ML MD frames compared against xTB single points
    model: dict = field(
        default_factory=lambda: {"n_features": 64, "n_sensitivities": 20, "soft_min": 0.85, "soft_max": 4.5,
                                 "cutoff": 5.0, "n_interactions": 2, "n_atom_layers": 2}
    )


def demo_settings(quick: bool = False) -> DemoSettings:
    """Default: 3 × 200 training frames (300, 600, 1000 K; a frame every 10 steps), 3 × 30 test
    frames from trajectories with other seeds, 200 s of training. Quick: 3 × 60 training frames
    (every 5 steps) and 3 × 10 test frames, 45 s of training."""
    temps = [300.0, 600.0, 1000.0]
    if quick:
        return DemoSettings(
            train=MDSettings(temps, frames_per_temperature=60, stride=5, equilibration=100, seed=0),
            test=MDSettings(temps, frames_per_temperature=10, stride=5, equilibration=100, seed=1000),
            max_time_s=45.0,
        )
    return DemoSettings(
        train=MDSettings(temps, frames_per_temperature=200, stride=10, equilibration=200, seed=0),
        test=MDSettings(temps, frames_per_temperature=30, stride=10, equilibration=200, seed=1000),
        max_time_s=200.0,
    )


def training_config(train_file: Path, test_file: Path, run_dir: Path, s: DemoSettings) -> dict:
    """The configuration handed to run_training (the same keys as a YAML file for `polyfid train`)."""
    return {
        "data": {
            "train": [{"path": str(train_file), "fidelity": FIDELITY}],
            "test": [{"path": str(test_file), "fidelity": FIDELITY}],
            "val_fraction": 0.1,
            "seed": 0,
        },
        "model": {"architecture": "hipnn", **s.model},
        "training": {
            "epochs": 100000,
            "max_time_s": s.max_time_s,
            "batch_size": 8,
            "lr": 3e-3,
            "min_lr": 1e-5,
            "scheduler": "cosine",
            "early_stopping_patience": None,
            "energy_weight": 1.0,
            "force_weight": 100.0,
            "final_energy_weight": 1000.0,
            "final_fraction": 0.25,
            "ema_decay": 0.99,
            "seed": 0,
            # batches of a 9-atom molecule are too small for two threads to pay off, and on a
            # busy machine OpenMP threads that wait for each other slow training down many times
            "num_threads": 1,
        },
        "output": {"dir": str(run_dir), "tensorboard": False, "plots": True, "progress": False},
    }


def md_check(model, start_atoms, s: DemoSettings, calc_xtb, out: Path) -> dict[str, Any]:
    """NVE MD with the trained `model` (a model file or a Potential, which the calculator converts
    to float64 in place) from `start_atoms`; energy drift and comparison with xTB single points."""
    import ase.io
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from polyfid.calculators.ase import PolyfidCalculator

    atoms = start_atoms.copy()
    atoms.info = {}
    atoms.calc = PolyfidCalculator(model, fidelity=FIDELITY, dtype="float64")
    thermalize(atoms, s.md_temperature_K, np.random.default_rng(7))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    e_tot, temps, snaps = [], [], []

    def record() -> None:
        e_tot.append(float(atoms.get_potential_energy() + atoms.get_kinetic_energy()))
        temps.append(float(atoms.get_temperature()))
        if dyn.nsteps % s.check_every == 0:
            snaps.append(snapshot(atoms, float(atoms.get_potential_energy()), atoms.get_forces(),
                                   {"md_step": int(dyn.nsteps)}))

    dyn.attach(record, interval=1)
    t0 = time.perf_counter()
    with one_thread():  # one 9-atom molecule: more threads only add synchronisation
        dyn.run(s.md_steps)
    md_s = time.perf_counter() - t0
    ase.io.write(out / "ml_md.extxyz", snaps, format="extxyz")
    e = np.array(e_tot)
    n = len(atoms)
    # xTB single points on frames of the ML trajectory
    f_err, e_err = [], []
    for a in snaps:
        e_ref, f_ref = single_point(a, calc_xtb)
        e_err.append(a.get_potential_energy() - e_ref)
        f_err.append(np.abs(a.get_forces() - f_ref).ravel())
    e_err_arr = np.array(e_err)
    finite = bool(np.all(np.isfinite(e)))
    return {
        "steps": int(dyn.nsteps),
        "timestep_fs": 0.5,
        "start_temperature_K": s.md_temperature_K,
        "mean_temperature_K": float(np.mean(temps)),
        "seconds": md_s,
        "ms_per_step": 1e3 * md_s / max(int(dyn.nsteps), 1),
        "finite": finite,
        "total_energy_drift_meV_per_atom": 1e3 * float(e[-1] - e[0]) / n,
        "total_energy_spread_meV_per_atom": 1e3 * float(e.max() - e.min()) / n,
        "xtb_check_frames": len(snaps),
        "xtb_force_mae_meV_A": 1e3 * float(np.mean(np.concatenate(f_err))),
        "xtb_energy_mae_meV": 1e3 * float(np.mean(np.abs(e_err_arr))),
        "xtb_energy_error_spread_meV": 1e3 * float(e_err_arr.max() - e_err_arr.min()),
    }


def _label_stats(frames: list) -> dict[str, float]:
    e = np.array([a.get_potential_energy() for a in frames])
    f = np.concatenate([a.get_forces().ravel() for a in frames])
    return {"energy_std_meV": 1e3 * float(e.std()), "force_mae_from_zero_meV_A": 1e3 * float(np.mean(np.abs(f)))}


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    max_time_s: float | None = None,
    settings: DemoSettings | None = None,
) -> dict:
    """Generate (or reuse) the xTB data, train, evaluate, run ML MD; print and return the summary,
    also written to ``out/summary.json``. `max_time_s` overrides the training budget; `settings`
    replaces the default or quick settings altogether."""
    from polyfid.train.run import run_training

    t_start = time.perf_counter()
    s = settings if settings is not None else demo_settings(quick)
    if max_time_s is not None:
        s.max_time_s = float(max_time_s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "default"
    train_file = out / f"ethanol_gfn2xtb_{tag}_train.extxyz"
    test_file = out / f"ethanol_gfn2xtb_{tag}_test.extxyz"
    run_dir = out / f"run_{tag}"
    print(f"polyfid demo ({tag}): output in {out.resolve()}")

    # 1. data
    calc = xtb_calculator()
    t0 = time.perf_counter()
    train_frames, gen_train = load_or_generate(train_file, s.train, calc)
    test_frames, gen_test = load_or_generate(test_file, s.test, calc)
    data_s = time.perf_counter() - t0
    how = "generated" if (gen_train or gen_test) else "reused (cached)"
    temps = ", ".join(f"{t:g}" for t in s.train.temperatures_K)
    print(f"[1/4] data {how} in {data_s:.1f} s: ethanol, {METHOD} (tblite), Langevin MD at {temps} K, a frame "
          f"every {s.train.stride} steps of {s.train.timestep_fs} fs: {len(train_frames)} training frames (10% held "
          f"out for validation), {len(test_frames)} test frames from trajectories with other seeds")

    # 2. training
    cfg = training_config(train_file, test_file, run_dir, s)
    print(f"[2/4] training HIP-NN ({s.model['n_features']} features, {s.model['n_interactions']} interactions, "
          f"{s.model['n_atom_layers']} atom layers) for {s.max_time_s:g} s on "
          f"{cfg['training']['num_threads']} torch thread ...", flush=True)
    result = run_training(cfg)
    n_par = result.model.n_parameters()
    print(f"      {result.epochs} epochs in {result.train_s:.0f} s ({result.stopped}); {n_par} parameters; "
          f"model {run_dir / 'model.pt'}")

    # 3. test errors
    from polyfid.cli.evaluate_cmd import format_table

    stats = _label_stats(test_frames)
    print("[3/4] errors on the held-out test trajectories")
    print("      " + format_table(result.test_metrics).replace("\n", "\n      "))
    print(f"      (for scale: test energies spread {stats['energy_std_meV']:.0f} meV (std), "
          f"mean |force component| {stats['force_mae_from_zero_meV_A']:.0f} meV/Å)")

    # 4. ML MD
    print(f"[4/4] NVE MD with PolyfidCalculator: {s.md_steps} steps of 0.5 fs from a test geometry at "
          f"{s.md_temperature_K:g} K ...", flush=True)
    md = md_check(run_dir / "model.pt", test_frames[0], s, calc, out)
    print(f"      ran {md['steps']} steps ({md['ms_per_step']:.1f} ms/step), mean T {md['mean_temperature_K']:.0f} K; "
          f"total-energy drift {md['total_energy_drift_meV_per_atom']:+.3f} meV/atom, "
          f"spread {md['total_energy_spread_meV_per_atom']:.3f} meV/atom")
    print(f"      xTB single points on {md['xtb_check_frames']} ML-MD frames: force MAE "
          f"{md['xtb_force_mae_meV_A']:.1f} meV/Å, energy MAE {md['xtb_energy_mae_meV']:.1f} meV")

    test = result.test_metrics.get(FIDELITY, {})
    summary = {
        "mode": tag,
        "method": METHOD,
        "molecule": "ethanol",
        "data": {
            "train_file": str(train_file), "test_file": str(test_file), "generated": gen_train or gen_test,
            "seconds": data_s, "n_train_frames_total": len(train_frames), "n_test_frames": len(test_frames),
            "train_md": asdict(s.train), "test_md": asdict(s.test), "test_label_stats": stats,
        },
        "training": {
            "run_dir": str(run_dir), "epochs": result.epochs, "seconds": result.train_s, "stopped": result.stopped,
            "max_time_s": s.max_time_s, "model": s.model, "n_parameters": n_par,
        },
        "test": test,
        "validation": result.val_metrics.get(FIDELITY, {}),
        "md": md,
        "plots": sorted(str(p) for p in run_dir.glob("*.png")),
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nsummary")
    print(f"  test ({len(test_frames)} frames): energy MAE {test.get('energy_mae_meV', float('nan')):.1f} meV, "
          f"force MAE {test.get('force_mae_meV_A', float('nan')):.1f} meV/Å")
    print(f"  ML MD: {md['steps']} steps, drift {md['total_energy_drift_meV_per_atom']:+.3f} meV/atom; "
          f"vs xTB force MAE {md['xtb_force_mae_meV_A']:.1f} meV/Å")
    print(f"  plots: {', '.join(Path(p).name for p in summary['plots'])} in {run_dir}")
    print(f"  total {summary['total_seconds']:.0f} s; summary written to {out / 'summary.json'}")
    return summary
