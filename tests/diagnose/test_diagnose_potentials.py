"""The descriptor diagnostic of potentials: exact linear fits, force rows, verdict, CLI end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.descriptors import BesselRadial, MomentInvariants, element_index
from polyfid.diagnose.potentials import (
    InvariantFeatures,
    NetworkFeatures,
    RidgeAccumulator,
    _batches,
    _block_errors,
    _verdict,
    fit_ridge,
    local_tangents,
    sketch_tangents,
)
from polyfid.models import build_potential

ELEMENTS = [1, 6, 8]


def random_frames(n_frames: int, seed: int, n_atoms: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    grid = np.array(list(itertools.product(range(2), range(2), range(2))), float)[:n_atoms]
    out = []
    for _ in range(n_frames):
        z = rng.choice(ELEMENTS, size=n_atoms)
        out.append((z, 1.25 * grid + rng.normal(scale=0.15, size=(n_atoms, 3))))
    return out


def synthetic_dataset(desc: MomentInvariants, w: torch.Tensor, e0: torch.Tensor, n_frames: int, seed: int) -> Dataset:
    """Frames labelled by E = Σ_i (w_{Z_i}·D_i + e0_{Z_i}), F = −∂E/∂r (autograd): a potential that
    is exactly linear in the descriptors."""
    from polyfid.neighbors import neighbor_pairs

    frames = []
    for k, (z, pos) in enumerate(random_frames(n_frames, seed)):
        i, j, _ = neighbor_pairs(pos, desc.cutoff)
        p = torch.tensor(pos, requires_grad=True)
        zt = torch.from_numpy(z)
        el = element_index(zt, ELEMENTS)
        d = desc(p, zt, torch.from_numpy(i), torch.from_numpy(j))
        energy = (d * w[el]).sum() + e0[el].sum()
        (grad,) = torch.autograd.grad(energy, p)
        frames.append(Frame(z, pos, {"syn": Labels(float(energy.detach()), -grad.numpy())}, source=f"syn:{k}"))
    return Dataset(frames, name="synthetic")


def test_linear_fit_recovers_a_potential_linear_in_the_descriptors() -> None:
    desc = MomentInvariants(ELEMENTS, BesselRadial(2, 3.0), element_channels="single")  # 13·3·2 = 78 per atom
    g = torch.Generator().manual_seed(0)
    w = 0.05 * torch.randn(3, desc.n_descriptors, dtype=torch.float64, generator=g)
    e0 = torch.tensor([-13.6, -1030.0, -2040.0], dtype=torch.float64)
    train, val, test = (PackedData(synthetic_dataset(desc, w, e0, n, s), 3.0, ["syn"]) for n, s in
                        ((30, 1), (5, 2), (10, 3)))
    feats = InvariantFeatures(desc, ELEMENTS)
    acc = RidgeAccumulator(3 * desc.n_descriptors, 3)
    for idx in _batches(train, np.arange(len(train)), 100):
        acc.add(feats.rows(train, idx))
    val_blocks = [feats.rows(val, np.arange(len(val)))]
    model = fit_ridge(acc, val_blocks, lambdas=(1e-14, 1e-12), force_weights=(1.0,))
    de, fsum, nc = _block_errors({0: model}, iter([feats.rows(test, np.arange(len(test)))]))[0]
    assert de.max() < 1e-3  # meV, on energies of ~10^4 eV
    assert fsum.sum() / nc.sum() < 1e-3  # meV/Å
    # the per-element energies are identifiable here (several compositions)
    torch.testing.assert_close(model.e0, e0, rtol=1e-6, atol=1e-5)


def test_multilinear_products_have_exact_force_rows() -> None:
    desc = MomentInvariants(ELEMENTS, BesselRadial(2, 3.0), element_channels="blind")
    ds = Dataset([Frame(z, p, {"x": Labels(0.0, np.zeros((len(z), 3)))}) for z, p in random_frames(4, 5)])
    packed = PackedData(ds, 3.0, ["x"])
    feats = InvariantFeatures(desc, ELEMENTS)
    feats.fit_products(packed, np.arange(4), n_components=3)
    assert feats.n_products == 6
    block = feats.rows(packed, np.array([0]))
    assert block.XE.shape == (1, 3 * (desc.n_descriptors + 6))
    pos0 = torch.tensor(ds[0].positions)
    h = 1e-5
    for a, alpha in [(0, 0), (3, 2), (5, 1)]:
        step = torch.zeros_like(pos0)
        step[a, alpha] = h
        rows = []
        for sign in (1, -1):
            moved = Dataset([Frame(ds[0].numbers, (pos0 + sign * step).numpy(), {"x": Labels(0.0)})])
            rows.append(feats.rows(PackedData(moved, 3.0, ["x"]), np.array([0])).XE[0])
        fd = -(rows[0] - rows[1]) / (2 * h)
        torch.testing.assert_close(block.XF[3 * a + alpha], fd, rtol=1e-6, atol=1e-7)


def test_network_feature_rows_equal_autograd_and_sketches_project_them() -> None:
    ds = Dataset([Frame(z, p, {"x": Labels(1.0, np.ones((len(z), 3)))}) for z, p in random_frames(3, 7)])
    pot = build_potential({"architecture": "hipnn", "n_features": 8, "n_sensitivities": 4, "n_interactions": 2,
                           "n_atom_layers": 1, "cutoff": 3.0}, ELEMENTS, ["x"])
    nf = NetworkFeatures(pot, ELEMENTS)
    packed = PackedData(ds, 3.0, ["x"])
    block = nf.rows(packed, np.arange(3))
    w = torch.randn(block.XE.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = packed.batch(np.arange(3))
    pos = b.positions.clone().requires_grad_(True)
    _, x, geom = nf.model._geometry(b, pos, b.cell)
    z = nf.model.representation(x, geom)[-1]
    energy = (z * w.view(3, -1)[element_index(b.numbers, ELEMENTS)]).sum()
    (grad,) = torch.autograd.grad(energy, pos)
    torch.testing.assert_close(block.XF @ w, -grad.reshape(-1), rtol=1e-10, atol=1e-10)
    # a sketch: rows are projections of the full rows on each frame's random directions
    gen = torch.Generator().manual_seed(3)
    sketch = nf.rows(packed, np.arange(3), n_tangents=5, generator=gen)
    _, omega = sketch_tangents(b.frame, b.n_atoms, 5, torch.Generator().manual_seed(3))
    full = block.XF.view(3, 18, -1)
    torch.testing.assert_close(sketch.XF.view(3, 5, -1), omega @ full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sketch.forces.view(3, 5), (omega @ block.forces.view(3, 18, 1)).squeeze(2))
    # predictions for a readout equal the design rows times the weights
    from polyfid.diagnose.potentials import RidgeModel

    rm = RidgeModel(w, torch.zeros(3, dtype=torch.float64), torch.arange(len(w)), 0.0, 1.0)
    _, [(e, f)] = nf.predict(packed, np.arange(3), [rm])
    torch.testing.assert_close(f, block.XF @ w)
    torch.testing.assert_close(e, block.XE @ w)
    assert local_tangents(b.frame, b.n_atoms).shape == (18, 18, 3)


def test_verdict_reads_the_learning_curves() -> None:
    rng = np.random.default_rng(0)
    sizes = [50, 500]

    def per_frame(e, f):
        return (np.abs(rng.normal(e, 0.1 * e, 200)), np.abs(rng.normal(27 * f, 2 * f, 200)), np.full(200, 27.0))

    errs = {"linear_invariants": {50: (10, 50), 500: (8, 40)}, "hipnn": {50: (12, 60), 500: (3, 15)}}
    per = {m: {n: per_frame(*v) for n, v in c.items()} for m, c in errs.items()}
    curves = {m: {n: {"energy_mae_meV": float(p[0].mean()), "force_mae_meV_A": float(p[1].sum() / p[2].sum())}
                  for n, p in c.items()} for m, c in per.items()}
    verdict, evidence, comp = _verdict(curves, per, sizes, 0.10, 0)
    assert verdict == "nonlinear" and comp["forces"]["gap_growing"] and comp["energy"]["network_wins"]
    assert any("gains ground" in e for e in evidence)
    curves2 = {"linear_invariants": curves["hipnn"], "hipnn": curves["linear_invariants"]}
    per2 = {"linear_invariants": per["hipnn"], "hipnn": per["linear_invariants"]}
    assert _verdict(curves2, per2, sizes, 0.10, 0)[0] == "linear"


RMD17 = SHARED_DATA / "rmd17"


@pytest.mark.skipif(not (RMD17 / "rmd17_ethanol_train_01.npz").is_file(),
                    reason=f"needs the rMD17 files of ../shared/data ({RMD17} not found)")
def test_cli_runs_end_to_end_on_a_few_rmd17_frames(tmp_path, capsys) -> None:
    from polyfid.cli.main import main

    out = tmp_path / "diag"
    rc = main([
        "diagnose", "--potential", str(RMD17 / "rmd17_ethanol_train_01.npz"),
        "--test", str(RMD17 / "rmd17_ethanol_test_01.npz"), "--fidelity", "pbe_def2svp",
        "--select", "0:30", "--val-size", "6", "--test-select", "0:8", "--sizes", "8", "16", "--budget-s", "1",
        "--n-radial", "3", "--components", "3", "--threads", "1",
        "--model-set", "n_features=8", "--model-set", "n_sensitivities=4", "--model-set", "n_interactions=1",
        "--model-set", "n_atom_layers=1", "--out", str(out), "--json",
    ])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] in ("linear", "nonlinear", "mixed")
    curves = result["learning_curves"]
    assert set(curves) == {"linear_invariants", "multilinear_invariants", "hipnn", "linear_hipnn_features"}
    for curve in curves.values():
        assert set(curve) == {"8", "16"}
        assert all(np.isfinite(v["energy_mae_meV"]) and np.isfinite(v["force_mae_meV_A"]) for v in curve.values())
    assert result["n_test"] == 8 and result["n_val"] == 6
    for name in ("report.md", "learning_curves.png", "diagnosis.json"):
        assert (out / name).is_file()
    assert "Verdict" in (out / "report.md").read_text()


def test_cli_potential_needs_a_test_file(tmp_path, capsys) -> None:
    from polyfid.cli.main import main

    assert main(["diagnose", "--potential", str(tmp_path / "x.npz")]) == 2
    assert "--test" in capsys.readouterr().err


def test_invariant_predictions_equal_the_design_rows() -> None:
    """The test-set path (effective per-atom weights contracted with the descriptor Jacobian)
    gives the energies and forces of the design rows, with and without products."""
    from polyfid.diagnose.potentials import RidgeModel

    desc = MomentInvariants(ELEMENTS, BesselRadial(2, 3.0), element_channels="pairs")
    ds = Dataset([Frame(z, p, {"x": Labels(0.0, np.zeros((len(z), 3)))}) for z, p in random_frames(5, 9)])
    packed = PackedData(ds, 3.0, ["x"])
    feats = InvariantFeatures(desc, ELEMENTS)
    feats.fit_products(packed, np.arange(5), n_components=4)
    block = feats.rows(packed, np.arange(5))
    g = torch.Generator().manual_seed(4)
    n_lin = 3 * desc.n_descriptors
    models = [RidgeModel(torch.randn(n_lin, dtype=torch.float64, generator=g), torch.randn(3, dtype=torch.float64),
                         torch.arange(n_lin), 0.0, 1.0),
              RidgeModel(torch.randn(block.XE.shape[1], dtype=torch.float64, generator=g),
                         torch.randn(3, dtype=torch.float64), torch.arange(block.XE.shape[1]), 0.0, 1.0)]
    _, preds = feats.predict(packed, np.arange(5), models)
    for m, (e, f) in zip(models, preds):
        e_ref, f_ref = m.predict(block)
        torch.testing.assert_close(e, e_ref, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-9)
