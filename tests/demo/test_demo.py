"""The demo's xTB data generator (tiny MD runs) and the whole demo at toy scale."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tblite.ase", reason="tblite (GFN2-xTB) is not installed: the demo needs it")

import polyfid  # noqa: E402
from polyfid.demo.xtb_ethanol import (  # noqa: E402
    FIDELITY,
    DemoSettings,
    MDSettings,
    load_or_generate,
    run_demo,
    run_md,
)


def test_md_frames_carry_xtb_labels_and_are_reproducible():
    from tblite.ase import TBLite

    frames = run_md(600.0, n_frames=2, stride=5, equilibration=0, seed=3)
    assert len(frames) == 2 and [a.info["md_step"] for a in frames] == [5, 10]
    assert all(a.get_chemical_formula() == "C2H6O" for a in frames)
    for a in frames:
        assert np.isfinite(a.get_potential_energy()) and np.all(np.isfinite(a.get_forces()))
        assert abs(a.get_forces().sum(axis=0)).max() < 1e-6  # an isolated molecule: no net force
    assert not np.allclose(frames[0].positions, frames[1].positions)
    # a direct tblite call on the last frame gives the stored labels
    b = frames[-1].copy()
    b.calc = TBLite(method="GFN2-xTB", verbosity=0)
    assert b.get_potential_energy() == pytest.approx(frames[-1].get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(b.get_forces(), frames[-1].get_forces(), atol=2e-3)  # SCF tolerance
    # seeded: the same trajectory again; another seed: another one
    again = run_md(600.0, n_frames=2, stride=5, equilibration=0, seed=3)
    np.testing.assert_allclose(again[-1].positions, frames[-1].positions, atol=1e-10)
    other = run_md(600.0, n_frames=2, stride=5, equilibration=0, seed=4)
    assert np.abs(other[-1].positions - frames[-1].positions).max() > 1e-3


def test_generated_file_reads_back_and_is_cached(tmp_path):
    path = tmp_path / "eth.extxyz"
    settings = MDSettings(temperatures_K=[300.0, 900.0], frames_per_temperature=2, stride=3, equilibration=0)
    frames, generated = load_or_generate(path, settings)
    assert generated and path.is_file() and len(frames) == 4
    assert sorted({a.info["temperature_K"] for a in frames}) == [300.0, 900.0]
    data = polyfid.read(path, fidelity=FIDELITY)
    assert data.fidelities == [FIDELITY] and len(data) == 4
    for a, f in zip(frames, data.frames):
        assert f.labels[FIDELITY].energy == pytest.approx(a.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(f.labels[FIDELITY].forces, a.get_forces(), atol=1e-8)
    mtime = path.stat().st_mtime_ns
    again, generated = load_or_generate(path, settings)
    assert not generated and len(again) == 4 and path.stat().st_mtime_ns == mtime


def test_whole_demo_at_toy_scale(tmp_path, capsys):
    s = DemoSettings(
        train=MDSettings([300.0, 800.0], frames_per_temperature=8, stride=4, equilibration=4, seed=0),
        test=MDSettings([500.0], frames_per_temperature=4, stride=4, equilibration=4, seed=99),
        max_time_s=3.0, md_steps=10, check_every=5,
        model={"n_features": 8, "n_sensitivities": 6, "soft_min": 0.75, "soft_max": 3.5, "cutoff": 4.0,
               "n_interactions": 1, "n_atom_layers": 1},
    )
    summary = run_demo(tmp_path, settings=s)
    out = capsys.readouterr().out
    assert "errors on the held-out test trajectories" in out and "summary" in out
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["data"]["n_train_frames_total"] == 16 and on_disk["data"]["n_test_frames"] == 4
    assert on_disk["test"]["n_energy"] == 4 and np.isfinite(on_disk["test"]["force_mae_meV_A"])
    md = summary["md"]
    assert md["steps"] == 10 and md["finite"] and md["xtb_check_frames"] == 3
    assert np.isfinite(md["xtb_force_mae_meV_A"]) and md["xtb_force_mae_meV_A"] > 0
    assert (tmp_path / "ml_md.extxyz").is_file()
    assert any(p.endswith("loss_curves.png") for p in summary["plots"])
