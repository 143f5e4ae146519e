"""Smoothness along scans: extrema with a tolerance, the report against known errors, the plot, the command."""

from __future__ import annotations

import argparse
import json

import ase.io
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, toy_molecules

from polyfid.analysis.smoothness import (
    ScanReport,
    compare_scan,
    count_extrema,
    path_coordinate,
    plot_scan,
    predict_path,
    scan_report,
)
from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.readers import read
from polyfid.errors import DataError
from polyfid.models import build_potential, save_model

TINY = {"architecture": "hipnn", "n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1,
        "cutoff": 3.0}


def mev(x) -> np.ndarray:
    return np.asarray(x, float) * 1e-3  # meV -> eV


# --- count_extrema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        ([0, 1, 2, 3, 4], []),  # monotone rising
        ([4, 3, 2, 1, 0], []),  # monotone falling
        ([4, 3, 2, 3, 4], [2]),  # one minimum
        ([0, 5, 0], [1]),  # one maximum
        ([2, 0, 2], [1]),
        ([0, 0.4, 0.1, 0.5, 0.2, 0.6], []),  # noise below the 1 meV tolerance
        ([4, 1.3, 1.0, 1.6, 1.1, 1.5, 4], [2]),  # a minimum with sub-tolerance noise at the bottom: one extremum
        ([0, 1, 0, 1, 0], []),  # wiggles of exactly the tolerance are ignored
        ([3, 1, 1, 1, 3], [1]),  # a flat minimum: its first frame
        ([0, 3, 3, 3, 0], [1]),  # a flat maximum: its first frame
        ([0, 0, 0, 2, 2, 4], []),  # steps and plateaus going one way
        ([2, 2, 0, 0, 3, 3], [2]),  # plateaus at both ends around a flat minimum
        ([5, 0, 5, 0, 5], [1, 2, 3]),  # double well: min, barrier, min
        ([8, 2, 0, 2, 4, 2, 0, 2, 8], [2, 4, 6]),  # a smoother double well
        ([8, 2, 0, 1.5, 1.9, 1.5, 0, 2, 8], [2, 4, 6]),  # barrier 1.9 meV above both minima: kept
        ([8, 2, 0, 0.5, 0.9, 0.5, 0, 2, 8], [2]),  # barrier 0.9 meV: one wide well, its first minimum
        ([0, 0, 0, 0], []),  # flat
        ([0, 0.5, 0, 3, 6, 3, 0], [4]),  # a small start wiggle, then one maximum
        ([0, -1, 0.5, -2], [2]),  # the first turn (−1) is within tolerance of the start, the second is not
        ([0, 2], []),  # too short for an interior point
        ([1], []),
        ([], []),
    ],
)
def test_count_extrema(seq, expected):
    assert count_extrema(mev(seq), tolerance_meV=1.0) == expected


def test_count_extrema_tolerance_matters():
    seq = mev([0, 0.8, 0.0, 0.8, 0.0])
    assert count_extrema(seq, 0.5) == [1, 2, 3]
    assert count_extrema(seq, 1.0) == []
    assert count_extrema(mev([0, 1e-6, 0]), 0.0) == [1]  # tolerance 0: every strict turn


def test_count_extrema_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        count_extrema(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        count_extrema(np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match=">= 0"):
        count_extrema(np.zeros(3), -1.0)


def _against(seg: np.ndarray, up: bool) -> float:
    """The largest move of `seg` against the direction `up` (rising if True)."""
    return max(((seg[i] - seg[j]) if up else (seg[j] - seg[i]) for i in range(len(seg)) for j in range(i, len(seg))),
               default=0.0)


def _check_zigzag(e: np.ndarray, tol: float, ext: list[int]) -> None:
    """The documented criterion, checked by brute force (e and tol in meV)."""
    n = len(e)
    assert ext == sorted(set(ext)) and all(0 < i < n - 1 for i in ext)
    if not ext:  # no extremum: the sequence goes one way, up to moves of at most the tolerance back
        assert min(_against(e, True), _against(e, False)) <= tol
        return
    kind = [np.sign(e[i] - e[i - 1]) for i in ext]  # +1 maximum, −1 minimum (first frame of a plateau)
    assert all(k != 0 for k in kind) and all(a == -b for a, b in zip(kind, kind[1:]))  # they alternate
    cuts = [0, *ext, n - 1]
    for k, (s, t) in enumerate(zip(cuts, cuts[1:])):  # between extrema, nothing turns back by more than tol
        up = kind[k] > 0 if k < len(ext) else kind[-1] < 0
        assert _against(e[s : t + 1], up) <= tol, (e, ext, s, t)
    for k, i in enumerate(ext):
        lo, hi = cuts[k], cuts[k + 2]
        side = kind[k] * (e[i] - e[lo : hi + 1])  # ≥ 0: it beats every frame up to its neighbouring extrema
        assert np.all(side >= 0) and np.all(side[: i - lo] > 0)  # strictly those before it (plateau: first)
        assert side[: i - lo].max() > tol and side[i - lo :].max() > tol  # a prominence above the tolerance


@pytest.mark.parametrize("tol", [0.0, 0.5, 1.0, 2.5])
def test_count_extrema_criterion_on_random_sequences(tol):
    rng = np.random.default_rng(7)
    for _ in range(400):
        e = rng.integers(0, 6, size=rng.integers(0, 14)) * rng.choice([0.5, 1.0, 2.0])  # many ties and plateaus
        _check_zigzag(e, tol, count_extrema(mev(e), tol))


# --- compare_scan (pure arrays) --------------------------------------------------------------


def test_compare_scan_exact_figures():
    x = np.linspace(-1, 1, 21)
    ref = 0.01 * x**2  # eV, one minimum at index 10
    bump = 0.004 * np.sin(np.pi * x * 3)  # a 4 meV wiggle
    r = compare_scan(ref + 0.5, ref, x)
    assert r.energy_mae_meV == pytest.approx(0, abs=1e-9) and r.energy_mae_raw_meV == pytest.approx(500)
    assert r.second_difference_rmse_meV == pytest.approx(0, abs=1e-9)
    assert r.model_extrema == r.reference_extrema == [10] and r.spurious_extrema == r.missing_extrema == 0
    w = compare_scan(ref + bump, ref, x)
    assert w.energy_mae_meV == pytest.approx(np.mean(np.abs(bump - bump.mean())) * 1e3)
    assert w.energy_max_error_meV == pytest.approx(np.max(np.abs(bump - bump.mean())) * 1e3)
    d2 = np.diff(bump, 2) * 1e3
    assert w.second_difference_rmse_meV == pytest.approx(np.sqrt(np.mean(d2**2)))
    assert w.spurious_extrema >= 2 and len(w.model_extrema) > len(w.reference_extrema)
    with pytest.raises(ValueError):
        compare_scan(ref[:-1], ref)
    with pytest.raises(ValueError, match="coordinate"):
        compare_scan(ref, ref, x[:-1])


def test_compare_scan_spurious_and_missing():
    ref = mev([4, 3, 2, 1, 0, 1, 2, 3, 4])  # one minimum at 4
    model = mev([4, 3, 0, 3, 4, 3, 0, 3, 4])  # minima at 2 and 6, a barrier at 4
    r = compare_scan(model, ref)
    assert r.model_extrema == [2, 4, 6] and r.reference_extrema == [4]
    assert r.spurious_indices == [2, 6] and r.spurious_extrema == 2  # 4 sits on the reference minimum
    assert r.missing_indices == [] and r.missing_extrema == 0
    shifted = compare_scan(mev([4, 3, 2, 1, 1.5, 0, 1, 2, 4]), ref)  # the minimum one frame off: not spurious
    assert shifted.model_extrema == [5] and shifted.spurious_extrema == shifted.missing_extrema == 0
    flat = compare_scan(np.zeros(9), ref)
    assert flat.missing_indices == [4] and flat.spurious_indices == []
    assert list(r.coordinate) == list(range(9))  # default coordinate: the frame index


def test_report_to_dict_round_trip():
    r = compare_scan(mev([3, 1, 0, 2]), mev([3, 1, 0, 1]), tolerance_meV=0.5)
    d = r.to_dict()
    assert not {"coordinate", "e_model", "e_ref"} & set(d)
    back = ScanReport.from_dict(json.loads(json.dumps(d)) | {k: getattr(r, k).tolist()
                                                             for k in ("coordinate", "e_model", "e_ref")})
    assert back.to_dict() == d and np.array_equal(back.e_ref, r.e_ref)


# --- scan_report on a tiny model -------------------------------------------------------------


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_potential(TINY, [1, 6, 8], ["lj"])
    with torch.no_grad():  # the readout starts at zero (a flat model): give the model some shape
        m.readout.weight.normal_(std=0.01)
    return m


STEP = 0.02  # Å per atomic coordinate and frame, before the random direction


def path_frames(model, offsets_eV, turn: bool = False, name: str = "lj") -> Dataset:
    """A straight path of one toy molecule (there and back if `turn`); labels at `name`:
    the model's own energy + offsets (eV)."""
    mol = toy_molecules(1)[0]
    step = np.random.default_rng(1).normal(size=mol.positions.shape) * STEP
    n = len(offsets_eV)
    ks = [min(k, n - 1 - k) if turn else k for k in range(n)]
    frames = Dataset([Frame(mol.numbers, mol.positions + k * step, source=f"path:{i}") for i, k in enumerate(ks)])
    own = predict_path(model, frames, "lj")
    for f, e, o in zip(frames, own, offsets_eV):
        f.labels[name] = Labels(float(e + o))
    return frames


def test_scan_report_against_a_known_parabola(model):
    x = np.linspace(-1, 1, 11)
    off = 0.1 * x**2  # eV: 100 meV deep, Δ² = 2 · 0.1 · 0.2² = 8 meV everywhere
    frames = path_frames(model, off)
    own = predict_path(model, frames, "lj")
    assert 0 < np.ptp(own) * 1e3 < 4  # the model varies, much less than the offsets
    r = scan_report(model, frames, "lj")
    assert r.n_frames == 11 and r.tolerance_meV == 1.0
    # the error is −off exactly (the same model predicts both)
    assert r.energy_mae_raw_meV == pytest.approx(np.mean(off) * 1e3, rel=1e-9)
    assert r.energy_mae_meV == pytest.approx(np.mean(np.abs(off - off.mean())) * 1e3, rel=1e-9)
    assert r.energy_max_error_meV == pytest.approx(np.max(np.abs(off - off.mean())) * 1e3, rel=1e-9)
    assert r.second_difference_rmse_meV == pytest.approx(8.0, rel=1e-6)
    assert np.array_equal(r.e_model, own) and np.allclose(r.e_ref, own + off, rtol=0, atol=1e-12)
    assert r.model_extrema == [] and r.reference_extrema == [5] and r.missing_indices == [5]
    assert r.spurious_indices == []
    # default coordinate: cumulative RMS displacement, a straight path: k · RMS(step)
    d = frames[1].positions - frames[0].positions
    assert np.allclose(r.coordinate, np.arange(11) * np.sqrt(np.mean(np.sum(d**2, axis=1))))


def test_scan_report_spurious_extremum_and_tilt(model):
    off = mev(3.0 * np.arange(11))  # a 3 meV/frame tilt: no curvature
    frames = path_frames(model, off, turn=True)  # the path goes out and back: the model turns at frame 5
    r = scan_report(model, frames, "lj", tolerance_meV=0.25)
    assert r.model_extrema == [5] and r.reference_extrema == [] and r.spurious_indices == [5]
    assert r.spurious_extrema == 1 and r.missing_extrema == 0
    assert r.second_difference_rmse_meV == pytest.approx(0, abs=1e-6)  # a linear tilt has no Δ²
    assert r.energy_mae_meV == pytest.approx(np.mean(np.abs(off - off.mean())) * 1e3, rel=1e-9)
    assert np.all(np.diff(r.coordinate) > 0)  # the path length grows on the way back too
    coord = np.linspace(0, 1, 11)
    assert np.array_equal(scan_report(model, frames, "lj", coordinate=coord).coordinate, coord)


def test_scan_report_reference_name_and_missing_labels(model, tmp_path):
    frames = path_frames(model, np.zeros(4), name="dft")
    assert scan_report(model, frames, "lj", reference="dft").energy_mae_raw_meV == pytest.approx(0, abs=1e-9)
    with pytest.raises(DataError, match=r"path:0 \(frame 0\).*no reference energy at 'lj'.*\['dft'\]"):
        scan_report(model, frames, "lj")  # the default reference is the head's name
    with pytest.raises(KeyError, match="no fidelity 'dft'"):
        scan_report(model, frames, "dft")
    images = []
    for k, f in enumerate(frames):
        a = ase.Atoms(numbers=f.numbers, positions=f.positions)
        if k != 2:
            a.info["energy"] = f.labels["dft"].energy
        images.append(a)
    ase.io.write(tmp_path / "hole.extxyz", images, format="extxyz")
    data = read(tmp_path / "hole.extxyz", fidelity="lj")
    with pytest.raises(DataError, match=r"hole\.extxyz:2 \(frame 2\): no reference energy at 'lj'"):
        scan_report(model, data, "lj")


def test_path_coordinate_needs_one_molecule():
    a, b = toy_molecules(1)[0], toy_molecules(1, n_atoms=4)[0]
    frames = Dataset([Frame(a.numbers, a.positions), Frame(b.numbers, b.positions)], name="mixed")
    with pytest.raises(DataError, match="mixed.*not one path"):
        path_coordinate(frames)


def test_plot_scan_several_models(model, tmp_path):
    frames = path_frames(model, mev([0, 3, 8, 3, 0]))
    ref = np.array([f.labels["lj"].energy for f in frames])
    reports = {"model": scan_report(model, frames, "lj"), "other": compare_scan(ref + mev([1, 0, 0, 0, 1]), ref)}
    out = plot_scan(reports, tmp_path / "two.png", "two models")
    assert out == tmp_path / "two.png" and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="another scan"):
        plot_scan({"a": reports["model"], "b": compare_scan(ref, ref + 0.1)}, tmp_path / "bad.png")


# --- the command -----------------------------------------------------------------------------


def _write_path(frames: Dataset, path, name: str = "lj") -> None:
    images = []
    for f in frames:
        a = ase.Atoms(numbers=f.numbers, positions=f.positions)
        a.info["energy"] = f.labels[name].energy
        images.append(a)
    ase.io.write(path, images, format="extxyz")


def _run(argv: list[str]) -> int:
    from polyfid.cli import scan_cmd

    parser = argparse.ArgumentParser()
    scan_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["scan", *argv])
    return args.func(args)


def test_scan_command(model, tmp_path, capsys):
    _write_path(path_frames(model, mev([0, 3, 8, 3, 0])), tmp_path / "bump.extxyz")
    _write_path(path_frames(model, mev(3.0 * np.arange(11)), turn=True), tmp_path / "tilt.extxyz")
    save_model(tmp_path / "m.pt", model, TINY)
    argv = [str(tmp_path / "m.pt"), str(tmp_path / "bump.extxyz"), str(tmp_path / "tilt.extxyz"),
            "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"), "--tolerance-meV", "0.25"]
    assert _run(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["path", "frames"] and [ln.split()[0] for ln in table[1:]] == ["bump", "tilt"]
    rep = json.loads((tmp_path / "s.json").read_text())
    # the reference bulges by 8 meV mid-path, which the smooth model does not follow
    assert rep["bump"]["n_frames"] == 5 and rep["bump"]["reference_extrema"] == [2]
    assert rep["bump"]["missing_indices"] == [2] and rep["bump"]["tolerance_meV"] == 0.25
    assert rep["tilt"]["model_extrema"] == [5] and rep["tilt"]["spurious_indices"] == [5]
    assert rep["tilt"]["second_difference_rmse_meV"] == pytest.approx(0, abs=1e-4)  # extxyz rounds energies
    for stem in ("bump", "tilt"):  # several paths: one plot each
        assert (tmp_path / f"s_{stem}.png").read_bytes()[:4] == b"\x89PNG"


def test_scan_command_reference_name(model, tmp_path):
    _write_path(path_frames(model, mev([0, 2, 0])), tmp_path / "p.extxyz")
    save_model(tmp_path / "m.pt", model, TINY)
    # the file's labels, named "dft" by --reference, answer for the model's only head
    assert _run([str(tmp_path / "m.pt"), str(tmp_path / "p.extxyz"), "--reference", "dft", "--plot",
                 str(tmp_path / "one.png"), "--json", str(tmp_path / "one.json")]) == 0
    rep = json.loads((tmp_path / "one.json").read_text())["p"]
    assert rep["energy_mae_raw_meV"] == pytest.approx(2 / 3, abs=1e-5) and (tmp_path / "one.png").exists()
    with pytest.raises(KeyError, match="no fidelity 'pbe'"):
        _run([str(tmp_path / "m.pt"), str(tmp_path / "p.extxyz"), "--fidelity", "pbe"])


# --- real data -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_frames"), [("norm_mode_3005", 18), ("norm_mode_874", 37), ("H_removal", 60)])
def test_botnet_ethanol_paths(model, name, n_frames):
    path = SHARED_DATA / "botnet" / f"dataset_ethanol_test_{name}.xyz"
    if not path.exists():
        pytest.skip(f"{path} absent: the shared data sets are not beside the project")
    ds = read(path, fidelity="lj")
    r = scan_report(model, ds, "lj")
    assert r.n_frames == n_frames and np.all(np.diff(r.coordinate) > 0)
    # each path runs through one minimum of the PBE energy (the mode's or the O–H bond's equilibrium)
    assert r.reference_extrema == [int(np.argmin(r.e_ref))]
