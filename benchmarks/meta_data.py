"""Data of the meta-learning benchmark (benchmarks/meta_learning.py): pre-training tasks, held-out
levels with their fine-tuning pools, test sets and scans, for two cases.

A task is one data set at one level of theory; every frame of ``CaseData.tasks`` carries labels
under its task name only (a geometry labelled at two levels appears once per task). Units: eV, Å.

ethanol_levels  ("one molecule, many levels")
    tasks      the 950 rMD17 ethanol training frames of benchmarks/multifidelity.py at four levels:
               gfn1-xtb, gfn2-xtb (tblite, computed here), pbe_def2svp (rMD17 ``energies``/``forces``)
               and md17_pbe_ts (the original MD17 ``old_*`` labels, PBE+vdW-TS); E+F everywhere.
               The two xTB tasks also hold the 250 geometries of the B3LYP fine-tuning pool (never
               its test frames): cheap labels on the geometries a new level will be fitted on are
               what a user of polyfid has, and rMD17's 300 K MD does not reach QM-22's geometries.
    b3lyp      QM-22 ethanol, B3LYP/6-311+G(d,p) (VWN5 flavour = PySCF ``b3lyp5``): pool = 250
               frames, test = 200 other frames (one seed-0 permutation of the file).
    mp2        MP2/cc-pVDZ E+F: pool = the 500 rMD17 training frames of
               ``multifidelity.high_subset(950, 500, 0)`` (in that order: pool[:k] are the N_high = k
               subsets of multifidelity.py), test = the 200 MP2-labelled rMD17 ethanol test frames.
    scans      BOTNet ethanol paths (normal modes 3005 and 874 cm^-1, O-H removal), relabelled at
               each held-out level with polyfid.label (energies only). Both levels are restricted
               closed-shell calculations, so the O-H removal path stops at H_REMOVAL_MAX_OH.
molecules_levels  ("many molecules, many levels")
    tasks      every data set of ../shared/data but 3BPA, each capped at CAP frames (seed 0): see
               TASKS_MOLECULES. E+F everywhere.
    3bpa       ωB97X/6-31G(d): pool = dataset_3BPA_train_300K.xyz (500 frames, seed-0 permutation),
               test = the frames of dataset_3BPA_train_mixedT.xyz that are not in train_300K
               (469: 31 geometries occur in both files). No scans.

Held-out pools are permuted once with seed 0, so ``pool[:k]`` are nested fine-tuning sets.
Labels computed here (xTB, MP2, B3LYP) live in a polyfid label store (default the store of
benchmarks/multifidelity.py, which already holds its MP2 and GFN2-xTB labels):

  .venv/bin/python benchmarks/meta_data.py [--quick] [--store PATH] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import multifidelity  # noqa: E402

from polyfid.data.frame import Dataset, Frame, Labels  # noqa: E402

DEFAULT_STORE = multifidelity.DEFAULT_STORE

#: pre-training tasks of ethanol_levels: task name = level
TASKS_ETHANOL = ("gfn1-xtb", "gfn2-xtb", "pbe_def2svp", "md17_pbe_ts")
HELD_OUT_ETHANOL = ("b3lyp", "mp2")
#: held-out name -> level string of polyfid.label (what the store holds)
LEVELS = {"b3lyp": "b3lyp5/6-311+g(d,p)", "mp2": multifidelity.MP2}
#: pre-training tasks of molecules_levels: task name -> (level, source)
TASKS_MOLECULES = {
    "pyseqm_pm6": ("PM6 (no D3H4)", "pyseqm_pm6_dft/ Etot_PM6, F_PM6"),
    "pyseqm_dft": ("hybrid DFT (likely ωB97X/def2-TZVP)", "pyseqm_pm6_dft/ Etot_DFT, F_DFT; same configs as pm6"),
    "rmd17_ethanol": ("PBE/def2-SVP", "rmd17/rmd17_ethanol_train_01.npz"),
    "rmd17_aspirin": ("PBE/def2-SVP", "rmd17/rmd17_aspirin_train_01.npz"),
    "rmd17_azobenzene": ("PBE/def2-SVP", "rmd17/rmd17_azobenzene_train_01.npz"),
    "acac_pbe_d3": ("PBE+D3/def2-SVP", "botnet/dataset_acac_train_300K.xyz + train_600K.xyz"),
    "s66x8_wb97x": ("ωB97X/6-31G(d)", "comp6_s66x8/s66x8_wb97x6-31gd.h5"),
    "water_mp2": ("MP2/def2-TZVP (frozen core)", "mbgdml_water/ monomers (sampled) + all 8 hexamers"),
    "qm22_ethanol_b3lyp": ("B3LYP/6-311+G(d,p)", "qm22/Ethanol.xyz"),
}
HELD_OUT_MOLECULES = ("3bpa",)
CAP, CAP_QUICK = 600, 60  # frames per task of molecules_levels
N_B3LYP_POOL, N_TEST = 250, 200
N_TEST_QUICK = 50  # test frames of the ethanol held-out levels in quick mode
N_3BPA_TEST_QUICK = 100
N_3BPA_OVERLAP = 31  # geometries in both 3BPA training files (README of ../shared/data)
N_ETHANOL_QUICK = 60  # frames per ethanol task in quick mode
SCANS = {
    "norm_mode_3005": "dataset_ethanol_test_norm_mode_3005.xyz",
    "norm_mode_874": "dataset_ethanol_test_norm_mode_874.xyz",
    "H_removal": "dataset_ethanol_test_H_removal.xyz",
}
#: restricted (closed-shell) B3LYP and RHF-based MP2 describe O-H homolysis wrongly far out;
#: the scan keeps frames with an O-H distance up to this (Å)
H_REMOVAL_MAX_OH = 2.0
SCAN_STEP_QUICK = 4  # quick mode: every 4th frame of each path


@dataclass
class HeldOut:
    """A held-out target: fine-tuning pool (already permuted with seed 0: pool[:k] is the k-frame
    set), disjoint test frames and ordered scans, all labelled under the held-out name."""

    pool: Dataset
    test: Dataset
    scans: dict[str, Dataset] = field(default_factory=dict)


@dataclass
class CaseData:
    """Pre-training tasks (each frame labelled under its task name only), their sizes, the
    held-out targets, and a line per task / target saying what it is."""

    tasks: Dataset
    task_sizes: dict[str, int]
    held_out: dict[str, HeldOut]
    notes: dict[str, str] = field(default_factory=dict)


# ---- helpers -------------------------------------------------------------------------------------
def _as_task(ds: Dataset, fidelity: str, name: str) -> Dataset:
    """New frames of `ds` with the labels of `fidelity` only, under `name`."""

    out = ds.restrict([fidelity]).rename_fidelity(fidelity, name)
    if len(out) != len(ds):
        raise ValueError(f"{name}: {len(ds) - len(out)} frames have no {fidelity!r} labels")
    out.name = name
    return out


def _cap(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """At most n frames, drawn with `seed`, in file order."""
    if len(ds) <= n:
        return ds
    return ds[np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))]


def _bare(ds: Dataset) -> Dataset:
    """The geometries of `ds` without labels (what polyfid.label needs)."""
    return Dataset([replace(f, labels={}) for f in ds], name=ds.name)


def _from_store(ds: Dataset, store, level: str, name: str, forces: bool, allow_missing: bool = False) -> Dataset:
    """Frames of `ds` labelled from the store's `level` results under `name` (forces if asked).
    Frames without a result raise SystemExit, unless `allow_missing` (then they are dropped)."""
    out, missing = [], []
    for k, f in enumerate(ds):
        got = store.get(f, level)
        if got is None or (forces and got[1] is None):
            missing.append(k)
            continue
        out.append(replace(f, labels={name: Labels(energy=got[0], forces=got[1] if forces else None)}))
    if missing and not allow_missing:
        raise SystemExit(f"{len(missing)} of {len(ds)} frames of {ds.name or name} lack {level} "
                         f"{'E+F' if forces else 'energies'} in {store.path}: run benchmarks/meta_data.py "
                         "(compute_labels) first")
    return Dataset(out, name=ds.name)


def _key(f: Frame, decimals: int = 6) -> bytes:
    return f.numbers.tobytes() + (np.round(f.positions, decimals) + 0.0).tobytes()


def _oh_distance(f: Frame) -> float:
    """Distance between the O atom (index 2) and the hydroxyl H (index 8) of BOTNet's ethanol."""
    return float(np.linalg.norm(f.positions[8] - f.positions[2]))


# ---- ethanol_levels ------------------------------------------------------------------------------
def _ethanol_frames(data_dir: Path, quick: bool) -> dict[str, Any]:
    """Geometries of ethanol_levels (labels from the files where they have them): the 950 rMD17
    training frames at both rMD17 levels, the MP2 pool and test frames, QM-22 pool and test, scans."""
    from polyfid.data.readers import read

    data_dir = Path(data_dir)
    train_f, _ = common.rmd17_files(data_dir, "ethanol")
    full = read(train_f)  # both levels: pbe_def2svp and md17_pbe_ts
    tr_idx, _ = common.train_val_split(len(full), 50, 0)
    train = full[np.sort(tr_idx)]  # exactly multifidelity._rmd17's 950 frames
    mf = multifidelity.case_frames("rmd17_mp2_ethanol", data_dir, quick=False)
    assert [_key(a) for a in train] == [_key(b) for b in mf["train"]], "rMD17 split differs from multifidelity.py"
    mp2_pool = _bare(train[multifidelity.high_subset(len(train), 500, 0)])
    mp2_test = _bare(mf["test"])
    qm22 = read(data_dir / "qm22" / "Ethanol.xyz", fidelity="b3lyp")
    perm = np.random.default_rng(0).permutation(len(qm22))
    b3_pool = qm22[perm[:N_B3LYP_POOL]]
    b3_test = qm22[perm[N_B3LYP_POOL : N_B3LYP_POOL + N_TEST]]
    if quick:
        train = train[np.sort(np.random.default_rng(0).permutation(len(train))[:N_ETHANOL_QUICK])]
        mp2_test, b3_test = mp2_test[np.arange(N_TEST_QUICK)], b3_test[np.arange(N_TEST_QUICK)]
    scans = {}
    for name, fname in SCANS.items():
        ds = _bare(read(data_dir / "botnet" / fname))
        if name == "H_removal":
            ds = ds[np.array([k for k, f in enumerate(ds) if _oh_distance(f) <= H_REMOVAL_MAX_OH + 1e-6])]
        if quick:
            ds = ds[np.arange(0, len(ds), SCAN_STEP_QUICK)]
        ds.name = name
        scans[name] = ds
    xtb = _bare(train) + _bare(b3_pool[np.arange(min(len(b3_pool), N_ETHANOL_QUICK))] if quick else b3_pool)
    return {"train": train, "xtb": xtb, "mp2_pool": mp2_pool, "mp2_test": mp2_test, "b3lyp_pool": b3_pool,
            "b3lyp_test": b3_test, "scans": scans}


def _ethanol_jobs(fr: dict[str, Any]) -> list[tuple[str, str, Dataset, bool]]:
    """(what, level, frames, forces) that ethanol_levels needs from the label store."""
    jobs = [(f"tasks {lv}", lv, fr["xtb"], True) for lv in ("gfn1-xtb", "gfn2-xtb")]
    jobs += [("mp2 pool", LEVELS["mp2"], fr["mp2_pool"], True), ("mp2 test", LEVELS["mp2"], fr["mp2_test"], True)]
    for held in HELD_OUT_ETHANOL:
        jobs += [(f"{held} scan {name}", LEVELS[held], ds, False) for name, ds in fr["scans"].items()]
    return jobs


def ethanol_levels(data_dir: Path, store: Path = DEFAULT_STORE, quick: bool = False) -> CaseData:
    """"One molecule, many levels": ethanol at four pre-training levels, B3LYP and MP2 held out."""
    from polyfid.label import LabelStore

    fr = _ethanol_frames(data_dir, quick)
    train = fr["train"]
    with LabelStore(store) as st:
        parts = {lv: _from_store(fr["xtb"], st, lv, lv, True) for lv in ("gfn1-xtb", "gfn2-xtb")}
        parts |= {lv: _as_task(train, lv, lv) for lv in ("pbe_def2svp", "md17_pbe_ts")}
        held = {
            "b3lyp": HeldOut(_as_task(fr["b3lyp_pool"], "b3lyp", "b3lyp"),
                             _as_task(fr["b3lyp_test"], "b3lyp", "b3lyp")),
            "mp2": HeldOut(_from_store(fr["mp2_pool"], st, LEVELS["mp2"], "mp2", True),
                           _from_store(fr["mp2_test"], st, LEVELS["mp2"], "mp2", True)),
        }
        for name in HELD_OUT_ETHANOL:
            for scan, ds in fr["scans"].items():
                lab = _from_store(ds, st, LEVELS[name], name, False, allow_missing=True)
                if len(lab) < len(ds):
                    print(f"{name} scan {scan}: {len(ds) - len(lab)} of {len(ds)} frames have no {LEVELS[name]} "
                          "energy (failed or not computed) and are left out", flush=True)
                held[name].scans[scan] = lab
    tasks = [parts[t] for t in TASKS_ETHANOL]
    notes = {
        "gfn1-xtb": "GFN1-xTB (tblite) E+F, 950 rMD17 ethanol training frames and the B3LYP pool's geometries",
        "gfn2-xtb": "GFN2-xTB (tblite) E+F, the same frames",
        "pbe_def2svp": "rMD17 energies/forces: PBE/def2-SVP (ORCA), the same frames",
        "md17_pbe_ts": "rMD17 old_energies/old_forces: original MD17 PBE+vdW-TS (FHI-aims), the same frames",
        "b3lyp": "QM-22 ethanol, B3LYP(VWN5)/6-311+G(d,p) E+F; scans: PySCF b3lyp5/6-311+g(d,p) energies",
        "mp2": "MP2/cc-pVDZ (PySCF) E+F on rMD17 ethanol frames; scans: energies",
    }
    return CaseData(sum(tasks[1:], tasks[0]), {t: len(parts[t]) for t in TASKS_ETHANOL}, held, notes)


# ---- molecules_levels ----------------------------------------------------------------------------
def _threebpa(data_dir: Path, quick: bool) -> HeldOut:
    from polyfid.data.readers import read

    d = Path(data_dir) / "botnet"
    train = _as_task(read(d / "dataset_3BPA_train_300K.xyz"), "default", "3bpa")
    mixed = _as_task(read(d / "dataset_3BPA_train_mixedT.xyz"), "default", "3bpa")
    seen = {_key(f) for f in train}
    keep = np.array([k for k, f in enumerate(mixed) if _key(f) not in seen])
    n_overlap = len(mixed) - len(keep)
    print(f"3bpa: {n_overlap} train_mixedT geometries also in train_300K; test = the other {len(keep)}", flush=True)
    assert n_overlap == N_3BPA_OVERLAP, f"expected {N_3BPA_OVERLAP} shared 3BPA geometries, found {n_overlap}"
    test = mixed[keep]
    if quick:  # a random subset: the file is not in random order
        test = test[np.sort(np.random.default_rng(0).choice(len(test), N_3BPA_TEST_QUICK, replace=False))]
    pool = train[np.random.default_rng(0).permutation(len(train))]
    return HeldOut(pool, test, {})


def molecules_levels(data_dir: Path, quick: bool = False) -> CaseData:
    """"Many molecules, many levels": one task per data set of ../shared/data but 3BPA (at most
    CAP frames each, seed 0); 3BPA held out."""
    from polyfid.data.readers import read

    d = Path(data_dir)
    cap = CAP_QUICK if quick else CAP
    parts: dict[str, Dataset] = {}
    pyseqm = _cap(read(d / "pyseqm_pm6_dft"), cap)  # the same configurations at both levels
    parts["pyseqm_pm6"] = _as_task(pyseqm, "pm6", "pyseqm_pm6")
    parts["pyseqm_dft"] = _as_task(pyseqm, "dft", "pyseqm_dft")
    for mol in ("ethanol", "aspirin", "azobenzene"):
        train_f, _ = common.rmd17_files(d, mol)
        parts[f"rmd17_{mol}"] = _as_task(_cap(read(train_f, fidelity="pbe_def2svp"), cap), "pbe_def2svp",
                                         f"rmd17_{mol}")
    acac = read(d / "botnet" / "dataset_acac_train_300K.xyz") + read(d / "botnet" / "dataset_acac_train_600K.xyz")
    parts["acac_pbe_d3"] = _as_task(_cap(acac, cap), "default", "acac_pbe_d3")
    parts["s66x8_wb97x"] = _as_task(_cap(read(d / "comp6_s66x8" / "s66x8_wb97x6-31gd.h5"), cap), "default",
                                    "s66x8_wb97x")
    water = d / "mbgdml_water"
    hexamers = read(water / "6h2o.temelso.etal-dset.npz")
    monomers = _cap(read(water / "140h2o.sphere.gfn2.md.500k.prod1.3h2o.dset.1h2o-dset.npz"), cap - len(hexamers))
    parts["water_mp2"] = _as_task(monomers + hexamers, "default", "water_mp2")
    parts["qm22_ethanol_b3lyp"] = _as_task(_cap(read(d / "qm22" / "Ethanol.xyz"), cap), "default",
                                           "qm22_ethanol_b3lyp")
    for name, ds in parts.items():
        small = [f.source for f in ds if f.n_atoms < 2]
        assert not small, f"{name}: isolated atoms among the frames: {small[:3]}"
    tasks = [parts[t] for t in TASKS_MOLECULES]
    notes = {t: f"{lv}; {src}" for t, (lv, src) in TASKS_MOLECULES.items()}
    notes["3bpa"] = "ωB97X/6-31G(d) (BOTNet 3BPA): pool train_300K, test train_mixedT minus train_300K"
    return CaseData(sum(tasks[1:], tasks[0]), {t: len(parts[t]) for t in TASKS_MOLECULES},
                    {"3bpa": _threebpa(d, quick)}, notes)


# ---- labels ----------------------------------------------------------------------------------------
def compute_labels(data_dir: Path, store: Path = DEFAULT_STORE, quick: bool = False, workers: int = 2) -> dict:
    """Compute every QM label both cases need (only ethanol_levels needs any) into `store`; what is
    there already is skipped, and a kill loses nothing finished. Failed scan frames are reported
    (and left out of the scans); any other failure raises SystemExit.

    Returns {what: {level, frames, computed, cached, failed, seconds, s_per_calc}} where
    s_per_calc is the mean single-process time of one calculation of those frames (from the store)."""
    from polyfid.label import LabelStore, frame_key, label_frames

    fr = _ethanol_frames(data_dir, quick)
    out: dict[str, Any] = {}
    for what, level, frames, forces in _ethanol_jobs(fr):
        rep = label_frames(list(frames), level, store, forces=forces, workers=workers, threads_per_worker=1,
                           progress=False)
        with LabelStore(store) as st:
            keys = {frame_key(f) for f in frames}
            secs = [s for k, s in st._con.execute(
                "SELECT key, seconds FROM labels WHERE level = ? AND status = 'ok'", (level,)) if k in keys]
        out[what] = {"level": level, "forces": forces, "frames": len(frames), "computed": rep.computed,
                     "cached": rep.cached, "failed": len(rep.failed), "seconds": round(rep.seconds, 1),
                     "s_per_calc": round(float(np.mean(secs)), 3) if secs else None}
        print(f"  {what}: {rep}  ({rep.seconds:.0f} s; {out[what]['s_per_calc']} s per calculation)", flush=True)
        if rep.failed:
            print(f"    failures: {rep.failed[:5]}", flush=True)
            if "scan" not in what:
                raise SystemExit(f"{what}: {len(rep.failed)} {level} calculations failed")
    return out


def describe(name: str, data: CaseData) -> None:
    """Print sizes, elements and energy ranges of a case."""
    from ase.data import chemical_symbols

    def line(label: str, ds: Dataset, fid: str) -> str:
        e = np.array([f.labels[fid].energy for f in ds if f.labels[fid].energy is not None])
        nf = ds.count(fid, "forces")
        els = "".join(chemical_symbols[z] for z in ds.elements)
        fmax = max((float(np.abs(f.labels[fid].forces).max()) for f in ds if f.labels[fid].forces is not None),
                   default=float("nan"))
        return (f"  {label:<28s} n={len(ds):5d} F={nf:5d} {els:<5s} E [{e.min():10.2f}, {e.max():10.2f}] eV "
                f"(span {e.max() - e.min():7.2f}) |F|max {fmax:6.2f} eV/Å")


    print(f"{name}: {len(data.tasks)} pre-training frames, tasks {data.task_sizes}")
    for t in data.task_sizes:
        print(line(t, data.tasks.restrict([t]), t))
    for h, ho in data.held_out.items():
        print(line(f"{h} pool", ho.pool, h))
        print(line(f"{h} test", ho.test, h))
        for s, ds in ho.scans.items():
            print(line(f"{h} scan {s}", ds, h))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR)
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="label store (SQLite), outside the repo")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, default=2, help="label processes (one thread each)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print(f"labels -> {args.store}", flush=True)
    compute_labels(args.data_dir, args.store, args.quick, args.workers)
    print(f"labels done in {time.perf_counter() - t0:.0f} s", flush=True)
    describe("ethanol_levels", ethanol_levels(args.data_dir, args.store, args.quick))
    describe("molecules_levels", molecules_levels(args.data_dir, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
