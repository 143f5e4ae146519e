"""Smoothness along scans: extrema with a tolerance, the report against known errors, the command."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import ase.io
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, toy_molecules

from polyfid.analysis.smoothness import compare_scan, count_extrema, predict_path, scan_report
from polyfid.data.errors import DataError
from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.models import build_potential, save_model

TINY = {"architecture": "hipnn", "n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1,
        "cutoff": 3.0}


def mev(x):
    return np.asarray(x, float) * 1e-3  # meV -> eV


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        ([0, 1, 2, 3, 4], []),  # monotone
        ([4, 3, 2, 3, 4], [2]),  # one minimum
        ([0, 5, 0], [1]),  # one maximum
        ([0, 0.4, 0.1, 0.5, 0.2, 0.6], []),  # noise below the 1 meV tolerance
        ([3, 1, 1, 1, 3], [1]),  # a flat minimum: its first frame
        ([5, 0, 5, 0, 5], [1, 2, 3]),  # double well: min, barrier, min
        ([0, 0, 0, 0], []),  # flat
        ([0, 0.5, 0, 3, 6, 3, 0], [4]),  # a small start wiggle, then one maximum
        ([2, 0, 2], [1]),
        ([0, 2], []),
    ],
)
def test_count_extrema(seq, expected):
    assert count_extrema(mev(seq), tolerance_meV=1.0) == expected


def test_count_extrema_tolerance_matters():
    seq = mev([0, 0.8, 0.0, 0.8, 0.0])
    assert count_extrema(seq, 0.5) == [1, 2, 3]
    assert count_extrema(seq, 1.0) == []


def test_compare_scan_exact_figures():
    x = np.linspace(-1, 1, 21)
    ref = 0.01 * x**2  # eV, one minimum at index 10
    bump = 0.004 * np.sin(np.pi * x * 3)  # a 4 meV wiggle: two spurious extrema or more
    r = compare_scan(ref + 0.5, ref, x)
    assert r.energy_mae_meV == pytest.approx(0, abs=1e-9) and r.energy_mae_raw_meV == pytest.approx(500)
    assert r.second_difference_rmse_meV == pytest.approx(0, abs=1e-9)
    assert r.model_extrema == r.reference_extrema == [10] and r.spurious_extrema == 0
    w = compare_scan(ref + bump, ref, x)
    assert w.energy_mae_meV == pytest.approx(np.mean(np.abs(bump - bump.mean())) * 1e3)
    d2 = np.diff(bump, 2) * 1e3
    assert w.second_difference_rmse_meV == pytest.approx(np.sqrt(np.mean(d2**2)))
    assert w.spurious_extrema >= 2 and len(w.model_extrema) > len(w.reference_extrema)
    assert json.dumps(w.to_dict())  # serialisable
    with pytest.raises(ValueError):
        compare_scan(ref[:-1], ref)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_potential(TINY, [1, 6, 8], ["lj"])


def path_frames(model, offsets_eV: np.ndarray) -> Dataset:
    """A straight path of one toy molecule; labels = the model's own energy + offsets."""
    mol = toy_molecules(1)[0]
    step = np.random.default_rng(1).normal(size=mol.positions.shape) * 0.02
    frames = Dataset([Frame(mol.numbers, mol.positions + k * step, {"lj": Labels(0.0)}, source=f"path:{k}")
                      for k in range(len(offsets_eV))])
    own = predict_path(model, frames, "lj")
    return Dataset([replace(f, labels={"lj": Labels(float(e + o))}) for f, e, o in zip(frames, own, offsets_eV)])


def test_scan_report_against_known_offsets(model):
    off = mev([0, 0, 10, 0, 0, 0])
    frames = path_frames(model, off)
    r = scan_report(model, frames, "lj")
    # the error is −off; its mean removed
    assert r.energy_mae_raw_meV == pytest.approx(10 / 6, rel=1e-4)
    assert r.energy_mae_meV == pytest.approx(np.mean(np.abs(off - off.mean())) * 1e3, rel=1e-4)
    d2 = -np.diff(off, 2) * 1e3
    assert r.second_difference_rmse_meV == pytest.approx(np.sqrt(np.mean(d2**2)), rel=1e-4)
    assert r.coordinate[0] == 0 and np.all(np.diff(r.coordinate) > 0)
    frames[3].labels.clear()
    with pytest.raises(DataError, match=r"path:3 \(frame 3\).*'lj'"):
        scan_report(model, frames, "lj")


def test_scan_command(model, tmp_path):
    from polyfid.cli import scan_cmd

    frames = path_frames(model, mev([0, 3, 8, 3, 0]))
    images = []
    for f in frames:
        a = ase.Atoms(numbers=f.numbers, positions=f.positions)
        a.info["energy"] = f.labels["lj"].energy
        images.append(a)
    ase.io.write(tmp_path / "path.extxyz", images, format="extxyz")
    save_model(tmp_path / "m.pt", model, TINY)
    parser = argparse.ArgumentParser()
    scan_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["scan", str(tmp_path / "m.pt"), str(tmp_path / "path.extxyz"), "--json",
                              str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert args.func(args) == 0
    rep = json.loads((tmp_path / "s.json").read_text())["path"]
    # the reference bulges by 8 meV mid-path; the untrained model is nearly flat there
    assert rep["n_frames"] == 5 and rep["reference_extrema"] == [2] and rep["missing_extrema"] == 1
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_botnet_ethanol_normal_mode(model):
    path = SHARED_DATA / "botnet" / "dataset_ethanol_test_norm_mode_3005.xyz"
    if not path.exists():
        pytest.skip(f"{path} absent: the shared data sets are not beside the project")
    from polyfid.data.readers import read

    ds = read(path)
    ds.rename_fidelity(ds.fidelities[0], "lj")
    r = scan_report(model, ds, "lj")
    assert r.n_frames == 18
    assert len(r.reference_extrema) >= 1  # a normal-mode scan through the minimum
