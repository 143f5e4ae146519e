"""Merging data sets: the same geometry in two files becomes one frame with both label sets.

Two tiny extxyz files with shared geometries (a low level with energies and forces, a high level
with energies of some of the same geometries, in another order), the conflict error, the
tolerance, what must match exactly, the summary counts, the hash index against brute force, and
two-file delta / transfer / multi-head runs from a configuration.
"""

from __future__ import annotations

import json
import re

import ase.io
import numpy as np
import pytest
from ase.calculators.lj import LennardJones
from conftest import toy_molecules

from polyfid.cli.main import main
from polyfid.data import DataError, Dataset, Frame, Labels, read
from polyfid.data.merge import merge_frames
from polyfid.train.config import ConfigError, load_config
from polyfid.train.run import build_datasets, run_training

MODEL = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0}


def write_two_levels(tmp_path, n_low: int = 24, shared: tuple[int, ...] = (3, 0, 7, 11, 5, 19, 2, 14),
                     n_other: int = 2, jitter: float = 0.0):
    """low.extxyz: n_low LJ frames with energies and forces; high.extxyz: energies of another LJ
    on the `shared` low frames (in that order, positions moved by `jitter` Å) plus `n_other`
    geometries of their own. Returns the two paths and the high-level energies by low index."""
    low = toy_molecules(n_low, seed=1)
    high, e_high = [], {}
    for k in shared:
        a = low[k].copy()
        a.positions += jitter
        a.calc = LennardJones(sigma=0.95, epsilon=0.12, rc=3.0, smooth=True)
        e_high[k] = a.get_potential_energy() + 0.5 * len(a)
        a.calc = None
        a.info["energy"] = e_high[k]
        high.append(a)
    for a in toy_molecules(n_other, seed=5):
        a.info["energy"] = a.get_potential_energy()
        a.calc = None
        high.append(a)
    ase.io.write(tmp_path / "low.extxyz", low)
    ase.io.write(tmp_path / "high.extxyz", high)
    return tmp_path / "low.extxyz", tmp_path / "high.extxyz", e_high


def two_files(tmp_path, **kw) -> tuple[Dataset, Dataset, dict]:
    lo_path, hi_path, e_high = write_two_levels(tmp_path, **kw)
    return read(lo_path, fidelity="pbe"), read(hi_path, fidelity="mp2"), e_high


def test_the_same_geometry_in_two_files_is_one_frame_with_both_label_sets(tmp_path) -> None:
    lo, hi, e_high = two_files(tmp_path)
    m = Dataset.merge([lo, hi])
    assert len(m) == 24 + 2
    r = m.merge_report
    assert (r.frames_in, r.frames_out, r.merged_frames, r.multi_fidelity_geometries) == (34, 26, 8, 8)
    for k, f in enumerate(m.frames[:24]):  # the low file's order is kept
        np.testing.assert_array_equal(f.positions, lo[k].positions)
        assert f.labels["pbe"].energy == lo[k].labels["pbe"].energy
        if k in e_high:
            assert set(f.labels) == {"pbe", "mp2"}
            assert f.labels["mp2"].energy == pytest.approx(e_high[k], abs=1e-9)
            assert f.labels["mp2"].forces is None
            assert f.source.startswith(f"{lo.frames[k].source} + ") and "high.extxyz:" in f.source
        else:
            assert set(f.labels) == {"pbe"}
    assert all(set(f.labels) == {"mp2"} for f in m.frames[24:])
    # the inputs are untouched
    assert all(set(f.labels) == {"pbe"} for f in lo) and all(set(f.labels) == {"mp2"} for f in hi)


def test_one_level_in_two_files_merges_label_by_label_and_counts_identical_ones(tmp_path) -> None:
    lo, _, _ = two_files(tmp_path)
    energies = Dataset([Frame(f.numbers, f.positions, {"pbe": Labels(energy=f.labels["pbe"].energy)},
                              source=f"e.xyz:{k}") for k, f in enumerate(lo)])
    forces = Dataset([Frame(f.numbers, f.positions, {"pbe": Labels(forces=f.labels["pbe"].forces)},
                            source=f"f.xyz:{k}") for k, f in enumerate(lo)])
    m = Dataset.merge([energies, forces])
    assert len(m) == 24 and m.merge_report.duplicate_label_sets == 0
    assert all(f.labels["pbe"].has("energy") and f.labels["pbe"].has("forces") for f in m)
    # the same labels again (a file given twice): merged silently and counted
    again = Dataset.merge([lo, lo[np.arange(5)]])
    assert len(again) == 24 and again.merge_report.duplicate_label_sets == 5
    # within the tolerances: 1e-6 eV, 1e-5 eV/Å
    near = lo[np.arange(2)]
    near = Dataset([Frame(f.numbers, f.positions, {"pbe": Labels(f.labels["pbe"].energy + 5e-7,
                                                                 f.labels["pbe"].forces + 5e-6)}, source=f"n:{k}")
                    for k, f in enumerate(near)])
    assert len(Dataset.merge([lo, near])) == 24


def test_different_labels_at_one_fidelity_are_an_error_naming_both_files_and_frames(tmp_path) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path)
    # both files read as one level: frame 3 of low.extxyz is frame 0 of high.extxyz
    with pytest.raises(DataError, match=re.escape(f"{hi_path}:0 and {lo_path}:3 hold the same geometry at "
                                                  "fidelity 'pbe' with different energy")):
        read([lo_path, hi_path], fidelity="pbe")
    # unnamed, each single-level file's labels take the file's stem: two levels, merged
    both = read([lo_path, hi_path])
    assert both.fidelities == ["low", "high"] and both.merge_report.multi_fidelity_geometries == 8
    assert read([lo_path, hi_path], fidelity=["pbe", "mp2"]).fidelities == ["pbe", "mp2"]
    with pytest.raises(DataError, match="3 fidelity names for 2 files"):
        read([lo_path, hi_path], fidelity=["a", "b", "c"])
    lo = read(lo_path, fidelity="pbe")
    bad = Dataset([Frame(lo[4].numbers, lo[4].positions, {"pbe": Labels(forces=lo[4].labels["pbe"].forces + 1e-3)},
                         source="other.xyz:9")])
    with pytest.raises(DataError, match=r"other\.xyz:9 and .*low\.extxyz:4 .* different forces"):
        Dataset.merge([lo, bad])


def test_positions_within_the_tolerance_merge_and_farther_ones_do_not(tmp_path) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path, jitter=3e-7)
    lo, hi = read(lo_path, fidelity="pbe"), read(hi_path, fidelity="mp2")
    assert Dataset.merge([lo, hi]).merge_report.merged_frames == 8
    assert Dataset.merge([lo, hi], tolerance=1e-7).merge_report.merged_frames == 0
    far = tmp_path / "far"
    far.mkdir()
    lo_path, hi_path, _ = write_two_levels(far, jitter=2e-4)
    lo, hi = read(lo_path, fidelity="pbe"), read(hi_path, fidelity="mp2")
    assert Dataset.merge([lo, hi]).merge_report.merged_frames == 0
    assert Dataset.merge([lo, hi], tolerance=1e-3).merge_report.merged_frames == 8
    assert len(Dataset.merge([lo, hi], tolerance=None)) == 24 + 10  # no merging
    with pytest.raises(DataError, match="merge tolerance must be a number >= 0"):
        Dataset.merge([lo, hi], tolerance=-1.0)


def frame(numbers, positions, fid="a", energy=1.0, **kw) -> Frame:
    return Frame(numbers, positions, {fid: Labels(energy=energy)}, **kw)


def test_what_must_match_exactly_atom_order_cell_pbc_charge_multiplicity() -> None:
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.1], [1.0, 0.0, 0.0]])
    base = frame([8, 1, 1], pos)
    cell = np.eye(3) * 10.0
    others = [
        frame([1, 8, 1], pos, "b"),  # the same positions, atoms in another order
        frame([8, 1, 1], pos, "b", charge=1),
        frame([8, 1, 1], pos, "b", multiplicity=3),
        frame([8, 1, 1], pos, "b", cell=cell, pbc=[True] * 3),
    ]
    for other in others:
        assert len(Dataset.merge([Dataset([base]), Dataset([other])])) == 2
    periodic = frame([8, 1, 1], pos, cell=cell, pbc=[True] * 3)
    assert len(Dataset.merge([Dataset([periodic]), Dataset([frame([8, 1, 1], pos, "b", cell=cell + 1e-3,
                                                                 pbc=[True] * 3)])])) == 2
    assert len(Dataset.merge([Dataset([periodic]), Dataset([frame([8, 1, 1], pos, "b", cell=cell + 1e-8,
                                                                 pbc=[True] * 3)])])) == 1
    assert len(Dataset.merge([Dataset([base]), Dataset([frame([8, 1, 1], pos + 1e-7, "b")])])) == 1


def test_the_hash_index_finds_what_a_brute_force_comparison_finds() -> None:
    """Near-duplicates placed on both sides of the tolerance, many sharing the first atom's
    position: the index must neither miss a pair nor merge a far one."""
    rng = np.random.default_rng(3)
    tol = 1e-4
    frames = []
    for k in range(150):
        pos = rng.normal(size=(4, 3))
        pos[0] = 0.0
        frames.append(frame([6, 1, 1, 1], pos, "a", energy=float(k)))
        for scale in (0.3, 0.99, 1.5, 20.0):  # of the tolerance, along a random direction
            if rng.random() < 0.4:
                step = rng.uniform(-1, 1, size=pos.shape)
                step *= scale * tol / np.abs(step).max()
                frames.append(frame([6, 1, 1, 1], pos + step, f"b{scale}", energy=float(k)))
    merged, report = merge_frames(frames, tol)
    # brute force: greedy first-match over all frames in order
    reps: list[Frame] = []
    for f in frames:
        if not any(np.max(np.abs(r.positions - f.positions)) <= tol for r in reps):
            reps.append(f)
    assert len(merged) == len(reps) and report.frames_out == len(reps)
    for m, r in zip(merged, reps):
        np.testing.assert_array_equal(m.positions, r.positions)
    assert report.merged_frames == len(frames) - len(reps) > 0


def test_data_summary_counts_per_fidelity_and_shared_geometries(tmp_path, capsys) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path)
    assert main(["data", "summary", str(lo_path), str(hi_path), "--fidelity", "pbe", "--fidelity", "mp2",
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["frames"] == 26 and s["multi_fidelity_geometries"] == 8
    assert {k: {c: v[c] for c in ("frames", "energies", "forces")} for k, v in s["fidelities"].items()} == {
        "pbe": {"frames": 24, "energies": 24, "forces": 24}, "mp2": {"frames": 10, "energies": 10, "forces": 0}}
    assert s["merge"]["merged_frames"] == 8
    # without names the two single-level files take their stems; the text table says the same
    assert main(["data", "summary", str(lo_path), str(hi_path)]) == 0
    out = capsys.readouterr().out
    assert "geometries with labels at two or more fidelities: 8" in out
    assert re.search(r"^low\s+24\s+24\s+24", out, re.M) and re.search(r"^high\s+10\s+10\s+0", out, re.M)
    assert main(["data", "summary", str(lo_path), str(hi_path), "--fidelity", "a", "--fidelity", "b",
                 "--fidelity", "c"]) == 2
    assert "3 fidelity names for 2 files" in capsys.readouterr().err


def test_evaluate_merges_one_file_per_level(tmp_path, capsys) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path)
    res = run_training(two_file_config(tmp_path, {"name": "multi-head"}, lo_path, hi_path))
    assert main(["evaluate", str(res.out / "model.pt"), str(lo_path), str(hi_path), "--fidelity", "pbe",
                 "--fidelity", "mp2", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["pbe"]["n_energy"] == 24 and m["pbe"]["n_forces"] == 24 and m["mp2"]["n_energy"] == 10


def two_file_config(tmp_path, strategy: dict, lo_path, hi_path, **data) -> dict:
    return {
        "data": {"train": [{"path": str(lo_path), "fidelity": "pbe"},
                           {"path": str(hi_path), "fidelity": "mp2", "use": ["energy"]}], "val_size": 4, **data},
        "model": MODEL,
        "training": {"epochs": 2, "batch_size": 4, "num_threads": 1, "seed": 0},
        "strategy": {"target": "mp2", "base": "pbe", **strategy},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False, "plots": False},
    }


def test_the_validation_split_comes_after_the_merge(tmp_path) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path)
    cfg = load_config(two_file_config(tmp_path, {"name": "delta"}, lo_path, hi_path, val_size=10))
    train, val, _ = build_datasets(cfg.data)
    assert len(train) + len(val) == 26
    keys = {f.positions.tobytes() for f in train}
    assert not any(f.positions.tobytes() in keys for f in val)
    assert sum(len(f.labels) == 2 for f in train) + sum(len(f.labels) == 2 for f in val) == 8
    with pytest.raises(ConfigError, match=r"data\.merge_tolerance: must be >= 0"):
        load_config(two_file_config(tmp_path, {"name": "delta"}, lo_path, hi_path, merge_tolerance=-1.0))


@pytest.mark.parametrize("name", ["delta", "transfer", "multi-head"])
def test_two_file_runs_from_a_configuration(tmp_path, name) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path)
    cfg = two_file_config(tmp_path, {"name": name}, lo_path, hi_path,
                          test=[{"path": str(hi_path), "fidelity": "mp2"}])
    res = run_training(cfg)
    assert res.strategy == name and res.target == "mp2"
    assert "mp2" in res.model.fidelities
    assert res.test_metrics["mp2"]["n_energy"] == 10 and np.isfinite(res.test_metrics["mp2"]["energy_mae_meV"])


def test_delta_without_shared_geometries_names_the_files_and_what_it_needs(tmp_path) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path, jitter=1e-3)
    with pytest.raises(DataError) as err:
        run_training(two_file_config(tmp_path, {"name": "delta"}, lo_path, hi_path))
    msg = str(err.value)
    assert f"'mp2' from {hi_path}" in msg and f"'pbe' from {lo_path}" in msg
    assert "no training frame has labels at both" in msg and "data.merge_tolerance = 1e-06" in msg
    assert "transfer or multi-head" in msg


def test_frames_close_to_each_other_are_compared_with_few_others(monkeypatch) -> None:
    """An MD trajectory: 600 frames within 0.01 Å of one geometry, all distinct at the 1e-6 Å
    tolerance. Each frame is compared with only the few in its bins, not with its neighbours in
    the trajectory (that made the merge quadratic)."""
    from polyfid.data import merge

    calls = []
    same = merge._same_geometry
    monkeypatch.setattr(merge, "_same_geometry", lambda a, b, tol: calls.append(1) or same(a, b, tol))
    rng = np.random.default_rng(1)
    pos = rng.normal(size=(9, 3))
    frames = [frame([6, 6, 8, 1, 1, 1, 1, 1, 1], pos + rng.normal(scale=0.01, size=pos.shape), "a", float(k))
              for k in range(600)]
    out, report = merge_frames(frames)
    assert len(out) == 600 and report.merged_frames == 0
    assert len(calls) < 60


def test_one_data_set_is_taken_as_it_is_two_are_merged(tmp_path) -> None:
    lo_path, hi_path, _ = write_two_levels(tmp_path)
    dup = tmp_path / "dup.extxyz"
    images = ase.io.read(lo_path, ":")
    ase.io.write(dup, images + images[:3])  # the same geometries twice in one file
    cfg = load_config(two_file_config(tmp_path, {"name": "single"}, lo_path, hi_path))
    from polyfid.train.run import load_specs

    one = load_specs(cfg.data.train[:1])
    assert one.merge_report is None and len(one) == 24
    spec = cfg.data.train[0]
    spec.path = str(dup)
    assert len(load_specs([spec])) == 27 and len(read(dup)) == 27 and len(read([dup])) == 27
    both = load_specs([spec, cfg.data.train[1]])
    assert len(both) == 24 + 2 and both.merge_report.duplicate_label_sets == 3
