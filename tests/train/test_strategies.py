"""Multi-fidelity strategies on tiny two-level data: each trains, saves, loads and predicts
at the level asked; sampling shares, head ties, Δ targets and the error messages."""

from __future__ import annotations

from dataclasses import replace

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.lj import LennardJones
from conftest import toy_molecules, two_level_data

from polyfid.api import evaluate, predict
from polyfid.calculators.ase import PolyfidCalculator
from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.errors import DataError
from polyfid.models import BranchedPotential, DeltaPotential, Potential, build_potential, load_model
from polyfid.train.config import ConfigError, TrainingConfig, load_config
from polyfid.train.loop import batch_order
from polyfid.train.run import run_training
from polyfid.train.stage import frame_weights
from polyfid.train.strategies import (
    MultiHead,
    StrategyRun,
    fit_strategy,
    resolve_levels,
    warm_start,
)
from polyfid.train.trainer import StepOptions, Trainer

MODEL = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0}


def config(tmp_path, name: str, **strategy) -> dict:
    return {
        "model": MODEL,
        "training": {"epochs": 3, "batch_size": 4, "num_threads": 1, "seed": 0},
        "strategy": {"name": name, **strategy},
        "output": {"dir": str(tmp_path / name), "progress": False, "tensorboard": False, "plots": False},
    }


@pytest.mark.parametrize("name", ["single", "multi-head", "embedding", "delta", "transfer"])
def test_each_strategy_trains_saves_and_predicts_the_target(tmp_path, name) -> None:
    ds = two_level_data()
    cfg = load_config(config(tmp_path, name, target="hi", base="lo", head_tie=0.1 if name == "multi-head" else 0.0))
    res = fit_strategy(cfg, ds[np.arange(20)], ds[np.arange(20, 24)], tmp_path / name)
    assert res.target == "hi" and res.strategy == name
    expected = {"single": ["hi"], "multi-head": ["lo", "hi"], "embedding": ["lo", "hi"], "delta": ["lo", "hi"],
                "transfer": ["hi"]}[name]
    assert res.model.fidelities == expected
    assert res.epochs >= 3 and res.train_s > 0
    loaded = load_model(res.path)
    assert loaded.fidelities == expected and loaded.head_index(None) == expected.index("hi")
    # the file predicts what the returned model predicts, at the target by default
    mols = toy_molecules(3, seed=9)
    p_file = predict(loaded, mols)
    p_mem = predict(res.model.float(), mols, fidelity="hi")
    for a, b in zip(p_file, p_mem):
        np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-6)
        np.testing.assert_allclose(a["forces"], b["forces"], rtol=1e-4, atol=1e-6)
    # and through ASE
    atoms = mols[0].copy()
    atoms.calc = PolyfidCalculator(res.path, fidelity="hi")
    assert np.isclose(atoms.get_potential_energy(), p_file[0]["energy"], rtol=1e-6)
    with pytest.raises(KeyError, match="no fidelity 'ccsd'"):
        PolyfidCalculator(res.path, fidelity="ccsd")


def test_second_stage_reuses_a_given_base_model(tmp_path) -> None:
    ds = two_level_data()
    cfg = load_config(config(tmp_path, "delta", target="hi", base="lo"))
    first = fit_strategy(cfg, ds, None, tmp_path / "a")
    assert set(first.stages) == {"base", "delta"}
    again = fit_strategy(cfg, ds, None, tmp_path / "b", base_model=first.model.base)
    assert set(again.stages) == {"delta"} and not (tmp_path / "b" / "base").exists()
    assert isinstance(again.model, DeltaPotential)


@pytest.mark.parametrize("name", ["multi-head", "embedding"])
def test_warm_start_begins_every_level_at_the_base_model(tmp_path, name) -> None:
    ds = two_level_data()
    cfg = load_config(config(tmp_path, name, target="hi", base="lo", warm_start=True,
                             second_stage={"epochs": 1, "lr": 1e-9}))
    res = fit_strategy(cfg, ds, None, tmp_path / name)
    assert set(res.stages) == {"base", "train"}
    base = load_model(tmp_path / name / "base" / "model.pt")
    mols = toy_molecules(2, seed=5)
    # after a step at lr≈0, each level predicts the base model's forces
    f_base = predict(base, mols)[0]["forces"]
    for fid in ("lo", "hi"):
        np.testing.assert_allclose(predict(res.model, mols, fidelity=fid)[0]["forces"], f_base, rtol=1e-3, atol=1e-4)


def test_sampling_shares_apply_to_the_stages_that_have_both_levels(tmp_path) -> None:
    ds = two_level_data()
    cfg = config(tmp_path, "multi-head", target="hi", base="lo", warm_start=True)
    cfg["training"]["sampling"] = {"hi": 0.5}
    res = fit_strategy(load_config(cfg), ds, None, tmp_path / "s")  # the base stage has lo only
    assert set(res.stages) == {"base", "train"}
    cfg["training"]["sampling"] = {"mp2": 0.5}
    with pytest.raises(ConfigError, match="absent from the training data"):
        fit_strategy(load_config(cfg), ds, None, tmp_path / "s2")


def test_transfer_head_only_keeps_the_representation(tmp_path) -> None:
    ds = two_level_data()
    cfg = load_config(config(tmp_path, "transfer", target="hi", base="lo", trainable="head"))
    res = fit_strategy(cfg, ds, None, tmp_path / "t")
    base = load_model(tmp_path / "t" / "base" / "model.pt")
    for k, v in base.representation.state_dict().items():
        torch.testing.assert_close(res.model.representation.state_dict()[k].float(), v)
    assert not torch.equal(res.model.readout.weight, base.readout.weight)


def test_delta_targets_are_differences_on_shared_frames() -> None:
    ds = two_level_data(n=6, n_hi=3)
    d = ds.delta("hi", "lo")
    assert len(d) == 3 and d.fidelities == ["hi"]
    for k in range(3):
        assert np.isclose(d[k].labels["hi"].energy, ds[k].labels["hi"].energy - ds[k].labels["lo"].energy)
        assert d[k].labels["hi"].forces is None  # hi has no forces


def test_levels_resolve_from_the_data_and_bad_names_fail() -> None:
    ds = two_level_data()
    cfg = load_config({"strategy": {"name": "delta"}})
    assert resolve_levels(cfg.strategy, ds) == ("delta", "hi", "lo")
    assert resolve_levels(load_config({}).strategy, ds)[0] == "multi-head"
    assert resolve_levels(load_config({}).strategy, ds.restrict(["lo"]))[0] == "single"
    with pytest.raises(ConfigError, match="'mp2' is not in the training data"):
        resolve_levels(load_config({"strategy": {"target": "mp2"}}).strategy, ds)
    with pytest.raises(ConfigError, match="needs two fidelities"):
        resolve_levels(load_config({"strategy": {"name": "transfer"}}).strategy, ds.restrict(["lo"]))


def test_sampling_shares_and_weighted_epochs() -> None:
    ds = two_level_data(n=40, n_hi=4)
    w = frame_weights(ds, {"hi": 0.5})
    assert np.isclose(w[:4].sum(), 0.5) and np.isclose(w[4:].sum(), 0.5)
    order = np.concatenate([batch_order(40, 0, e, w) for e in range(50)])
    assert abs(np.isin(order, np.arange(4)).mean() - 0.5) < 0.05  # ~half the draws are the 4 hi frames
    np.testing.assert_array_equal(batch_order(40, 0, 3, w), batch_order(40, 0, 3, w))  # resumable
    with pytest.raises(ConfigError, match="share"):
        load_config({"training": {"sampling": {"hi": 1.5}}})
    with pytest.raises(ConfigError, match="absent from the training data"):
        frame_weights(ds, {"mp2": 0.5})


def test_head_tie_pulls_heads_together(tmp_path) -> None:
    ds = two_level_data()
    dist = {}
    for tie in (0.0, 100.0):
        cfg = load_config(config(tmp_path, "multi-head", target="hi", base="lo", head_tie=tie))
        cfg.output.dir = str(tmp_path / f"tie{tie}")
        m = fit_strategy(cfg, ds, None, tmp_path / f"tie{tie}").model
        dist[tie] = float(m.head_tie_penalty(0).detach())
    assert dist[100.0] < 0.5 * dist[0.0]


def test_fidelity_weights_scale_their_own_terms(tmp_path) -> None:
    ds = two_level_data()
    m = build_potential(MODEL, ds.elements, ["lo", "hi"])
    tc = TrainingConfig(energy_weight=2.0, force_weight=10.0, fidelity_weights={"hi": {"energy": 5.0}})
    tr = Trainer(m, PackedData(ds, 3.0, ["lo", "hi"]), None, tc, tmp_path / "w", {}, None, StepOptions(progress=False))
    w = tr._weights(0.0)
    assert w["energy"].tolist() == [2.0, 10.0] and w["forces"].tolist() == [10.0, 10.0]


def test_multi_fidelity_run_from_yaml_and_evaluate_per_fidelity(tmp_path) -> None:
    """Two files, each tagged with its level; hi keeps only energies (`use`), evaluation
    reports each level."""
    lo, hi = toy_molecules(30, seed=1), toy_molecules(8, seed=2)
    for a in hi:
        a.calc = LennardJones(sigma=0.95, epsilon=0.12, rc=3.0, smooth=True)
        a.get_potential_energy(), a.get_forces()
    ase.io.write(tmp_path / "lo.extxyz", lo)
    ase.io.write(tmp_path / "hi.extxyz", hi)
    cfg = config(tmp_path, "multi-head", target="hi")
    cfg["data"] = {"train": [{"path": str(tmp_path / "lo.extxyz"), "fidelity": "lo"},
                             {"path": str(tmp_path / "hi.extxyz"), "fidelity": "hi", "use": ["energy"]}],
                   "val_size": 4, "test": [{"path": str(tmp_path / "hi.extxyz"), "fidelity": "hi"}]}
    res = run_training(cfg)
    assert res.strategy == "multi-head" and res.target == "hi"
    assert set(res.test_metrics) == {"hi"} and "force_mae_meV_A" in res.test_metrics["hi"]
    both = Dataset([Frame(a.numbers, a.positions, {"lo": Labels(1.0 * a.get_potential_energy(), a.get_forces()),
                                                   "hi": Labels(a.get_potential_energy())}) for a in hi[:3]])
    m = evaluate(res.out / "model.pt", both)
    assert set(k for k in m if not k.startswith("_")) == {"lo", "hi"}


def test_a_level_without_energies_cannot_get_references(tmp_path) -> None:
    ds = two_level_data()
    for f in ds:
        if "hi" in f.labels:
            f.labels["hi"] = Labels(forces=f.labels["lo"].forces)
    cfg = load_config(config(tmp_path, "multi-head"))
    with pytest.raises(DataError, match="'hi' has no energies"):
        fit_strategy(cfg, ds, None, tmp_path / "x")


MODEL2 = MODEL | {"n_interactions": 2}


def test_multi_head_gives_each_level_its_own_last_block_started_from_the_base_model(tmp_path) -> None:
    """The default multi-head: a base-level model first, then one network in which each level owns
    its last interaction block (a copy of the base model's) and head, all levels trained together
    at a tenth of the learning rate, the target level a quarter of the draws."""
    ds = two_level_data(n=24, n_hi=4)
    cfg = config(tmp_path, "multi-head", target="hi", base="lo")
    cfg["model"] = MODEL2
    res = fit_strategy(load_config(cfg), ds, None, tmp_path / "m")
    assert set(res.stages) == {"base", "train"}
    model = load_model(res.path)
    assert isinstance(model, BranchedPotential) and model.fidelities == ["lo", "hi"] and model.own_blocks == 1
    # the shared first block and both levels' own last blocks moved off the base model, differently
    base = load_model(tmp_path / "m" / "base" / "model.pt")
    own_lo, own_hi = model.own(0).state_dict(), model.own(1).state_dict()
    assert any(not torch.equal(own_lo[k], own_hi[k]) for k in own_lo)
    assert not torch.equal(model.representation.blocks[0][0].base.weight, base.representation.blocks[0][0].base.weight)
    # one level through ASE (its own branch only) is what predict gives for that level
    mols = toy_molecules(2, seed=4)
    for fid in ("lo", "hi"):
        atoms = mols[0].copy()
        atoms.calc = PolyfidCalculator(res.path, fidelity=fid)
        ref = predict(model, mols, fidelity=fid)[0]
        assert atoms.get_potential_energy() == pytest.approx(ref["energy"], rel=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=1e-5, atol=1e-6)
    # the joint stage ran at training.lr / 10, with the target level's share raised to 0.25
    tr = res.stages["train"]
    assert tr.history[0]["lr"] == pytest.approx(1e-4, rel=1e-6)
    with open(tmp_path / "m" / "train" / "metrics.csv") as fh:
        assert "train_energy_hi" in fh.readline()
    loaded = load_config(cfg)
    tc = loaded.training

    def shares(tc: TrainingConfig, data) -> dict:
        run = StrategyRun(loaded, data, None, tmp_path / "unused", False, "hi", "lo", data.elements)
        return MultiHead(run).training(tc, data).sampling

    assert shares(tc, ds) == {"hi": 0.25}  # 4 of 24 frames: raised to 0.25
    assert shares(tc, two_level_data(n=8, n_hi=4)) == {"hi": 0.5}  # already more
    assert shares(replace(tc, sampling={"lo": 0.9}), ds) == {"lo": 0.9}


def test_a_warm_started_branched_model_starts_at_the_base_model_at_every_level(tmp_path) -> None:
    ds = two_level_data()
    base = build_potential(MODEL2, ds.elements, ["lo"])
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = build_potential(MODEL2 | {"fidelity_blocks": 1}, ds.elements, ["lo", "hi"])
    warm_start(model, base, 0)
    mols = toy_molecules(2, seed=5)
    p0 = predict(base, mols)
    for fid in ("lo", "hi"):
        for a, b in zip(predict(model, mols, fidelity=fid), p0):
            np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-6)
            np.testing.assert_allclose(a["forces"], b["forces"], rtol=1e-5, atol=1e-6)


def test_fidelity_blocks_choose_between_the_branched_and_the_earlier_multi_head(tmp_path) -> None:
    ds = two_level_data()
    for blocks, kind in ((0, Potential), (1, BranchedPotential)):
        cfg = config(tmp_path, "multi-head", target="hi", base="lo", fidelity_blocks=blocks)
        cfg["model"], cfg["training"]["epochs"] = MODEL2, 1
        res = fit_strategy(load_config(cfg), ds, None, tmp_path / f"b{blocks}")
        assert type(res.model) is kind
    cfg = config(tmp_path, "multi-head", target="hi", base="lo", fidelity_blocks=2)
    cfg["model"] = MODEL2
    with pytest.raises(ConfigError, match=r"fidelity_blocks: 2, but the network has 2 interaction block\(s\)"):
        fit_strategy(load_config(cfg), ds, None, tmp_path / "b2")
    # one interaction block: nothing to branch, the one-head-per-level multi-head
    res = fit_strategy(load_config(config(tmp_path, "multi-head", target="hi", base="lo")), ds, None, tmp_path / "b")
    assert type(res.model) is Potential


def test_finetuning_a_branched_model_gives_the_new_level_a_copy_of_the_closest_levels_blocks(tmp_path) -> None:
    from polyfid.train.finetune import add_head

    ds = two_level_data()
    model = build_potential(MODEL2 | {"fidelity_blocks": 1}, ds.elements, ["lo", "hi"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    new_data = Dataset([Frame(f.numbers, f.positions, {"new": Labels(f.labels["lo"].energy + 1.0,
                                                                     f.labels["lo"].forces)}) for f in ds])
    new, source = add_head(model, new_data, "new", init="lo")
    assert source == "lo" and isinstance(new, BranchedPotential) and new.fidelities == ["lo", "hi", "new"]
    mols = toy_molecules(2, seed=3)
    for fid in ("lo", "hi"):  # the old levels predict what they did
        for a, b in zip(predict(new, mols, fidelity=fid), predict(model, mols, fidelity=fid)):
            np.testing.assert_allclose(a["forces"], b["forces"], rtol=1e-5, atol=1e-6)
    for a, b in zip(predict(new, mols, fidelity="new"), predict(model, mols, fidelity="lo")):
        np.testing.assert_allclose(a["forces"], b["forces"], rtol=1e-5, atol=1e-6)


def test_resuming_a_one_stage_multi_head_run_under_the_two_stage_default_is_refused(tmp_path) -> None:
    ds = two_level_data()
    old = config(tmp_path, "multi-head", target="hi", base="lo", warm_start=False, fidelity_blocks=0,
                 target_share=None)
    old["model"] = MODEL2
    fit_strategy(load_config(old), ds, None, tmp_path / "run")
    new = config(tmp_path, "multi-head", target="hi", base="lo")
    new["model"] = MODEL2
    with pytest.raises(ConfigError, match="holds the checkpoint of a one-stage multi-head run"):
        fit_strategy(load_config(new), ds, None, tmp_path / "run", resume=True)
    assert fit_strategy(load_config(old), ds, None, tmp_path / "run", resume=True).strategy == "multi-head"
