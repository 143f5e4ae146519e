"""Reptile meta-training and fine-tuning: the outer step's formula, separate task heads,
exact resume, fine-tuning that adds a head without touching the others, the commands."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from conftest import needs_ftz, toy_dataset, toy_molecules

from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset, Labels
from polyfid.models import build_potential, load_model
from polyfid.train.config import ConfigError, FinetuneOptions, MetaConfig, TrainingConfig, load_config
from polyfid.train.finetune import add_head, finetune
from polyfid.train.meta import ReptileTrainer, meta_train, reptile_update

TINY = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0}


def scaled(ds: Dataset, name: str, factor: float, shift: float = 0.0) -> Dataset:
    """The frames relabelled as `factor` × the first level + `shift` per atom, under `name`."""
    out = []
    for f in ds:
        lab = next(iter(f.labels.values()))
        out.append(replace(f, labels={name: Labels(factor * lab.energy + shift * len(f.numbers),
                                                   factor * lab.forces)}))
    return Dataset(out)


def two_tasks(n: int = 16) -> Dataset:
    return scaled(toy_dataset(n, seed=0), "a", 1.0) + scaled(toy_dataset(n, seed=1), "b", 1.5, -2.0)


def trainer(tmp_path: Path, mc: MetaConfig | None = None, **tc) -> ReptileTrainer:
    torch.manual_seed(0)
    ds = two_tasks()
    model = build_potential({"architecture": "hipnn", **TINY}, sorted(set(ds.elements)), ["a", "b"])
    fids = ["a", "b"]
    tasks = {t: PackedData(ds.restrict([t]), model.cutoff, fids, dtype=torch.float32) for t in fids}
    model.fit_reference_energies(PackedData(ds, model.cutoff, fids))
    tcfg = TrainingConfig(batch_size=4, **tc)
    return ReptileTrainer(model, tasks, None, tcfg, mc or MetaConfig(inner_steps=3, inner_optimizer="sgd",
                                                                    inner_lr=1e-2), tmp_path, progress=False)


def test_reptile_update_formula():
    theta = {"w": torch.tensor([1.0, 2.0]), "readout.weight": torch.zeros(3, 2), "readout.bias": torch.zeros(3)}
    phi1 = {"w": torch.tensor([3.0, 2.0]), "readout.weight": torch.ones(3, 2), "readout.bias": torch.ones(3)}
    phi2 = {"w": torch.tensor([1.0, 6.0]), "readout.weight": 3 * torch.ones(3, 2), "readout.bias": -torch.ones(3)}
    new = reptile_update(theta, [phi1, phi2], [2, 0], epsilon=0.5)
    # shared: θ + ε·mean(φ − θ) = [1, 2] + 0.5·[1, 2]
    assert torch.allclose(new["w"], torch.tensor([1.5, 3.0]))
    # head rows: the adapted task's own φ, whole; row 1 was not adapted and keeps θ
    assert torch.equal(new["readout.weight"][2], torch.ones(2))
    assert torch.equal(new["readout.weight"][0], 3 * torch.ones(2))
    assert torch.equal(new["readout.weight"][1], torch.zeros(2))
    assert new["readout.bias"].tolist() == [-1.0, 0.0, 1.0]
    same = reptile_update(theta, [phi1, phi1], [1, 1], epsilon=1.0)
    assert torch.equal(same["w"], phi1["w"])
    with pytest.raises(ValueError):
        reptile_update(theta, [phi1], [0, 1], 0.5)


def test_outer_step_moves_weights_as_the_formula_says(tmp_path):
    tr = trainer(tmp_path)
    eps = tr.epsilon()
    assert eps == pytest.approx(1.0)
    tr.mc.outer_lr = 0.3
    eps = tr.epsilon()
    theta = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
    # the inner loop the outer step will run: same task draw and batches (a function of seed and step)
    rng = np.random.default_rng([tr.tc.seed, 0])
    task = tr.names[int(rng.choice(len(tr.names), size=1, p=tr.p)[0])]
    phi = tr.adapt(task, rng)
    tr._load(theta)
    assert tr.outer_step() == [task]
    h = tr.model.fidelities.index(task)
    other = 1 - h
    moved = 0
    for k, p in tr.model.named_parameters():
        if k == "readout.weight" or k == "readout.bias":
            assert torch.allclose(p[h], phi[k][h], atol=1e-7)
            assert torch.equal(p[other], theta[k][other])  # the other task's head is untouched
        else:
            assert torch.allclose(p, theta[k] + eps * (phi[k] - theta[k]), atol=1e-7)
            moved += int(not torch.equal(p, theta[k]))
    assert moved > 0  # the backbone did move


def test_task_heads_stay_separate(tmp_path):
    tr = trainer(tmp_path, MetaConfig(inner_steps=2, task_weights={"b": 0.0}))
    b = tr.model.fidelities.index("b")
    before = tr.model.readout.weight[b].detach().clone(), tr.model.atom_ref[:, b].clone()
    for _ in range(4):
        assert tr.outer_step() == ["a"]
        tr.state.step += 1
    assert torch.equal(tr.model.readout.weight[b], before[0])
    assert torch.equal(tr.model.atom_ref[:, b], before[1])
    assert not torch.equal(tr.model.readout.weight[1 - b], torch.zeros_like(before[0]))


def test_inner_adam_keeps_its_state_across_outer_steps_unless_reset(tmp_path):
    for mode, steps_seen in (("keep", 6), ("reset", 3)):
        tr = trainer(tmp_path / mode, MetaConfig(inner_steps=3, inner_state=mode))
        tr.outer_step()
        first = tr._opt
        tr.state.step += 1
        tr.outer_step()
        assert (tr._opt is first) == (mode == "keep")
        counts = {int(s["step"]) for s in tr._opt.state.values()}
        assert counts == {steps_seen}  # every parameter: the inner steps this optimiser has taken


def test_inner_learning_rate_schedule(tmp_path):
    tr = trainer(tmp_path, MetaConfig(inner_lr=1e-3, inner_lr_final=1e-5, outer_steps=10))
    assert tr.inner_lr() == pytest.approx(1e-3)
    tr.state.step = 5
    assert tr.inner_lr() == pytest.approx(0.5 * (1e-3 + 1e-5))
    tr.outer_step()
    assert tr._opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1e-3 + 1e-5))
    tr.state.step = 10
    assert tr.inner_lr() == pytest.approx(1e-5)
    assert trainer(tmp_path / "c", MetaConfig(inner_lr=2e-3)).inner_lr() == 2e-3  # constant by default
    for bad in ({"inner_lr_final": 0.0}, {"inner_lr_final": "x"}, {"inner_lr": None}, {"inner_state": "kept"}):
        with pytest.raises(ConfigError):
            load_config({"meta": bad})


@needs_ftz
def test_meta_training_flushes_subnormals_only_while_it_runs(tmp_path):
    from polyfid.numerics import flushing_denormals

    for flush in (True, False):
        tr = trainer(tmp_path / str(flush), MetaConfig(inner_steps=2, outer_steps=3), flush_denormal=flush)
        seen, outer = [], tr.outer_step

        def step(outer=outer, seen=seen):
            seen.append(flushing_denormals())
            return outer()

        tr.outer_step = step
        assert tr.fit().step == 3
        assert seen == [flush] * 3 and not flushing_denormals()


def meta_cfg(out: Path, **meta) -> dict:
    return {"model": TINY, "training": {"batch_size": 4, "num_threads": 1, "checkpoint_interval_s": 0.0},
            "meta": {"outer_steps": 6, "inner_steps": 2, "eval_every": 1, **meta},
            "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False}}


def test_meta_train_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    ds = two_tasks()
    val = two_tasks(6)
    straight = meta_train(load_config(meta_cfg(tmp_path / "a")), ds, val, tmp_path / "a")
    assert straight.state.step == 6 and straight.state.stopped == "step limit"
    assert set(straight.tasks) == {"a", "b"} and straight.model.fidelities == ["a", "b"]

    calls = {"n": 0}
    original = ReptileTrainer.outer_step

    def dies_at_four(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(ReptileTrainer, "outer_step", dies_at_four)
    with pytest.raises(KeyboardInterrupt):
        meta_train(load_config(meta_cfg(tmp_path / "b")), ds, val, tmp_path / "b")
    monkeypatch.setattr(ReptileTrainer, "outer_step", original)
    resumed = meta_train(load_config(meta_cfg(tmp_path / "b")), ds, val, tmp_path / "b", resume=True)
    assert resumed.state.step == 6
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_meta_train_refuses_a_single_task(tmp_path):
    from polyfid.errors import DataError

    with pytest.raises(DataError, match="two tasks"):
        meta_train(load_config(meta_cfg(tmp_path)), toy_dataset(8), None, tmp_path)


def one_thread(**options) -> FinetuneOptions:
    """Fine-tuning options, training on one thread."""
    return FinetuneOptions(training={"num_threads": 1}, **options)


@pytest.fixture
def saved_model(tmp_path) -> Path:
    ds = two_tasks()
    res = meta_train(load_config(meta_cfg(tmp_path / "meta")), ds, two_tasks(4), tmp_path / "meta")
    return res.path


def test_finetune_adds_a_head_without_touching_the_others(tmp_path, saved_model):
    source = load_model(saved_model)
    new_data = scaled(toy_dataset(12, seed=5), "c", 1.5, 0.7)  # level b's PES, other per-atom offsets
    res = finetune(saved_model, new_data, tmp_path / "ft", one_thread(steps=20, warmup_steps=5))
    m = res.model
    assert m.fidelities == ["a", "b", "c"] and m.default_fidelity == "c"
    assert res.source_head == "b"  # the head whose forces match best
    for h in range(2):
        assert torch.equal(m.readout.weight[h], source.readout.weight[h])
        assert torch.equal(m.readout.bias[h], source.readout.bias[h])
        assert torch.equal(m.atom_ref[:, h], source.atom_ref[:, h])
        assert torch.equal(m.energy_scale[h], source.energy_scale[h])
    assert set(res.stages) == {"warmup", "finetune"}
    # the backbone was trained
    assert any(not torch.equal(p, q) for p, q in zip(m.representation.parameters(),
                                                     source.representation.parameters()))

    frozen = finetune(saved_model, new_data, tmp_path / "ft_head", one_thread(steps=10, trainable="head"))
    data = PackedData(new_data, source.cutoff, ["a", "b"], dtype=torch.float32)
    b = data.batch(np.arange(4))
    e_src = source(b, forces=False)["energy"]
    e_new = frozen.model(b, forces=False)["energy"][:, :2]
    assert torch.allclose(e_src, e_new)  # the old heads predict exactly as before


def test_finetune_leaves_a_potential_passed_in_unchanged(tmp_path, saved_model):
    model = load_model(saved_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = scaled(toy_dataset(12, seed=5), "b", 1.5, -2.0)  # a level it has: that head goes on training
    res = finetune(model, data, tmp_path / "ft", one_thread(steps=10, warmup_steps=0))
    assert res.model is not model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert any(not torch.equal(p, q) for p, q in zip(res.model.parameters(), model.parameters()))


def test_add_head_best_starts_from_the_matching_head(saved_model):
    source = load_model(saved_model)
    data = scaled(toy_dataset(10, seed=7), "c", 1.5, 0.3)
    new, head = add_head(source, data, "c")
    assert head == "b"
    b = PackedData(data, source.cutoff, ["c"], dtype=torch.float32).batch(np.arange(10))
    pred = new(b, forces=True)
    assert torch.allclose(pred["forces"][:, 2], pred["forces"][:, 1])
    # per-element offsets fitted on top: the energy error is no worse than head b's shifted mean
    e_ref = b.energy[:, 0]
    assert (pred["energy"][:, 2] - e_ref).abs().mean() <= (pred["energy"][:, 1] - e_ref).abs().mean() + 1e-9
    zero, src = add_head(source, data, "c", init="zero")
    assert src is None and torch.equal(zero.readout.weight[2], torch.zeros_like(zero.readout.weight[2]))
    with pytest.raises(ValueError, match="already has a head"):
        add_head(source, data, "a")


def test_meta_train_and_finetune_commands(tmp_path):
    from polyfid.cli.main import main

    for name, seed in (("a", 0), ("b", 1)):
        ase.io.write(tmp_path / f"{name}.extxyz", toy_molecules(16, seed), format="extxyz")
    cfg = meta_cfg(tmp_path / "meta", outer_steps=4)
    cfg["data"] = {"train": [{"path": str(tmp_path / "a.extxyz"), "fidelity": "a"},
                             {"path": str(tmp_path / "b.extxyz"), "fidelity": "b"}], "val_size": 4}
    (tmp_path / "meta.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["meta-train", str(tmp_path / "meta.yaml")]) == 0
    assert (tmp_path / "meta" / "model.pt").exists() and (tmp_path / "meta" / "results.json").exists()
    ase.io.write(tmp_path / "new.extxyz", toy_molecules(12, 9), format="extxyz")
    out = tmp_path / "ft"
    assert main(["finetune", str(tmp_path / "meta" / "model.pt"), str(tmp_path / "new.extxyz"), "--out", str(out),
                 "--steps", "10", "--warmup-steps", "3", "--test", str(tmp_path / "new.extxyz"),
                 "--threads", "1"]) == 0
    m = load_model(out / "model.pt")
    assert m.fidelities == ["a", "b", "new"]
    import json

    summary = json.loads((out / "results.json").read_text())
    assert summary["fidelity"] == "new" and "force_mae_meV_A" in summary["test"]["new"]
    out2 = tmp_path / "ft_replay"
    assert main(["finetune", str(tmp_path / "meta" / "model.pt"), str(tmp_path / "new.extxyz"), "--out", str(out2),
                 "--steps", "4", "--warmup-steps", "0", "--replay", f"{tmp_path / 'a.extxyz'}=a",
                 "--replay", f"{tmp_path / 'b.extxyz'}=b", "--anchor", "0.1", "--threads", "1"]) == 0
    assert "train_forces_b" in (out2 / "finetune" / "metrics.csv").read_text().splitlines()[0]
    assert main(["finetune", str(out / "model.pt"), str(tmp_path / "new.extxyz"), "--level", "zzz",
                 "--head-init", "nope", "--out", str(tmp_path / "bad")]) == 2


def test_finetune_with_replay_trains_the_old_heads_alongside(tmp_path, saved_model):
    import csv

    from polyfid.errors import DataError
    from polyfid.train.config import ConfigError

    source = load_model(saved_model)
    new_data = scaled(toy_dataset(12, seed=5), "c", 1.5, 0.7)
    res = finetune(saved_model, new_data, tmp_path / "ft", one_thread(steps=12, warmup_steps=0),
                   replay=two_tasks(8))
    m = res.model
    assert m.fidelities == ["a", "b", "c"]
    rows = list(csv.DictReader((tmp_path / "ft" / "finetune" / "metrics.csv").open()))
    for level in "abc":  # every level had frames drawn and its own loss term
        assert any(float(r.get(f"train_forces_{level}") or 0) > 0 for r in rows), level
    assert not any(k.startswith("val_a") or k.startswith("val_b") for k in rows[0])  # validation: the new level
    # the old heads were trained, not restored
    assert not torch.equal(m.readout.weight[0], source.readout.weight[0])
    assert not torch.equal(m.readout.weight[1], source.readout.weight[1])
    with pytest.raises(DataError, match=r"levels \['zz'\] that are not heads of the model"):
        finetune(saved_model, new_data, tmp_path / "x", FinetuneOptions(steps=2),
                 replay=scaled(toy_dataset(4), "zz", 1.0))
    with pytest.raises(ConfigError, match="replay_share"):
        finetune(saved_model, new_data, tmp_path / "y", FinetuneOptions(steps=2, replay_share=1.0), replay=two_tasks(4))


def test_replay_share_and_epoch_length(tmp_path, saved_model):
    from polyfid.train.finetune import _with_replay
    from polyfid.train.loop import batch_order
    from polyfid.train.stage import frame_weights

    source = load_model(saved_model)
    new_data = scaled(toy_dataset(10, seed=5), "c", 1.5, 0.7)
    source_c, _ = add_head(source, new_data, "c")
    ds, opts = _with_replay(source_c, new_data, two_tasks(30), "c", 0.8, {})
    assert opts["epoch_frames"] == 50  # 10 new frames make 1 − 0.8 of an epoch's draws
    w = frame_weights(ds, opts["sampling"])
    assert np.isclose(w[:10].sum() / w.sum(), 0.2) and np.isclose(w[10:].sum() / w.sum(), 0.8)
    order = batch_order(len(ds), 0, 0, w, opts["epoch_frames"])
    assert len(order) == 50 and 0.05 < np.mean(order < 10) < 0.4

    # only the replay's levels train: a head without replay frames is put back as it was
    res = finetune(saved_model, new_data, tmp_path / "ft", one_thread(steps=6, warmup_steps=0),
                   replay=two_tasks(8).restrict(["a"]))
    assert torch.equal(res.model.readout.weight[1], source.readout.weight[1])  # b: no replay frames
    assert not torch.equal(res.model.readout.weight[0], source.readout.weight[0])  # a: trained


def test_anchor_pulls_the_backbone_towards_the_loaded_weights(tmp_path, saved_model):
    from polyfid.train.finetune import anchor_penalty

    model = load_model(saved_model)
    assert anchor_penalty(model, 0.0) is None
    pen = anchor_penalty(model, 0.5)
    assert float(pen().detach()) == 0.0
    p = next(model.representation.parameters())
    with torch.no_grad():
        p.add_(0.1)
    pen().backward()
    assert torch.allclose(p.grad, torch.full_like(p, 2 * 0.5 * 0.1), atol=1e-6)  # d/dθ λ(θ − θ₀)² = 2λ(θ − θ₀)

    source = load_model(saved_model)
    new_data = scaled(toy_dataset(12, seed=5), "c", 1.5, 0.7)

    def moved(anchor: float) -> float:
        options = one_thread(steps=30, warmup_steps=0, anchor=anchor, val_fraction=0.0)
        res = finetune(saved_model, new_data, tmp_path / f"a{anchor}", options)
        return sum(float((q - q0).detach().square().sum()) for q, q0 in zip(res.model.representation.parameters(),
                                                                   source.representation.parameters()))

    assert moved(1e4) < 0.1 * moved(0.0)


def test_finetune_rejects_unknown_elements(tmp_path, saved_model):
    from polyfid.errors import DataError

    ds = scaled(toy_dataset(4), "c", 1.0)
    ds[0].numbers[0] = 7
    with pytest.raises(DataError, match=r"elements \[7\]"):
        finetune(saved_model, ds, tmp_path / "x", FinetuneOptions(steps=2))


def test_meta_training_refuses_a_step_budget(tmp_path):
    ds = Dataset([f for f in toy_dataset(6, fidelity="a")] + [f for f in toy_dataset(6, seed=1, fidelity="b")])
    cfg = load_config({"model": {"n_features": 4, "n_sensitivities": 3, "n_interactions": 1, "n_atom_layers": 1,
                                 "cutoff": 3.0}, "training": {"max_steps": 10}})
    with pytest.raises(ConfigError, match="meta-training counts outer steps"):
        meta_train(cfg, ds, None, tmp_path / "m")
