"""Losses with masks, reference energies, schedules, early stopping and configuration errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import needs_ftz, tiny_config, toy_dataset

from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.errors import DataError
from polyfid.models import build_potential
from polyfid.train.config import ConfigError, TrainingConfig, load_config
from polyfid.train.losses import loss_terms, pointwise, total_loss
from polyfid.train.run import run_training
from polyfid.train.trainer import StepOptions, Trainer

SMALL = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0}


def _frames_with_gaps() -> Dataset:
    ds = toy_dataset(4)
    f = ds.frames
    f[0].labels["hi"] = Labels(energy=f[0].labels["lj"].energy + 3.0)  # energy only
    f[1].labels["hi"] = Labels(forces=f[1].labels["lj"].forces * 2)  # forces only
    f[2].labels["lj"].forces = None  # lj energy only; no hi labels at all
    return ds


def test_masked_loss_uses_only_present_labels() -> None:
    ds = _frames_with_gaps()
    packed = PackedData(ds, 3.0, ["lj", "hi"])
    batch = packed.batch([0, 1, 2, 3])
    pred_e = torch.zeros_like(batch.energy, requires_grad=True)
    pred_f = torch.zeros_like(batch.forces, requires_grad=True)
    terms = loss_terms({"energy": pred_e, "forces": pred_f}, batch)

    # by hand, one mean per fidelity: energies per atom present at (0..3, lj) and (0, hi)
    e_lj = np.mean([(ds[b].labels["lj"].energy / ds[b].n_atoms) ** 2 for b in range(4)])
    e_hi = (ds[0].labels["hi"].energy / ds[0].n_atoms) ** 2
    np.testing.assert_allclose(terms["energy"].detach().numpy(), [e_lj, e_hi], rtol=1e-10)
    f_lj = np.concatenate([ds[b].labels["lj"].forces.ravel() ** 2 for b in (0, 1, 3)]).mean()
    f_hi = (ds[1].labels["hi"].forces.ravel() ** 2).mean()
    np.testing.assert_allclose(terms["forces"].detach().numpy(), [f_lj, f_hi], rtol=1e-10)

    # per-fidelity weights multiply their own fidelity's terms only
    w = {"energy": torch.tensor([1.0, 10.0], dtype=torch.float64), "forces": torch.tensor([2.0, 0.0])}
    total = total_loss(terms, w)
    assert math.isclose(total.item(), e_lj + 10 * e_hi + 2 * f_lj, rel_tol=1e-6)

    (terms["energy"].sum() + terms["forces"].sum()).backward()
    assert pred_e.grad[1:, 1].abs().sum() == 0  # no hi energy on frames 1..3
    s2 = packed.atom_ptr[2]
    assert pred_f.grad[s2 : s2 + ds[2].n_atoms].abs().sum() == 0  # frame 2 has no forces at any level
    assert pred_f.grad[: ds[0].n_atoms, 1].abs().sum() == 0  # frame 0 has no hi forces
    assert pred_f.grad[: ds[0].n_atoms, 0].abs().sum() > 0


def test_batch_without_any_label_of_a_kind_gives_zero_term() -> None:
    ds = _frames_with_gaps()
    batch = PackedData(ds, 3.0, ["lj", "hi"]).batch([2])
    pred = {"energy": torch.zeros_like(batch.energy), "forces": torch.ones_like(batch.forces)}
    assert loss_terms(pred, batch)["forces"].abs().sum().item() == 0.0


def test_huber_is_squared_below_delta_and_linear_beyond() -> None:
    err = torch.tensor([-0.3, -0.01, 0.0, 0.005, 0.02, 1.0], dtype=torch.float64, requires_grad=True)
    h = pointwise(err, "huber", 0.01)
    a = err.detach().abs()
    expected = torch.where(a < 0.01, a**2, 0.02 * a - 1e-4)
    torch.testing.assert_close(h.detach(), expected)
    torch.testing.assert_close(pointwise(err, "mse").detach(), err.detach() ** 2)
    # continuous at delta, and the gradient is capped at 2·delta beyond it
    torch.testing.assert_close(pointwise(torch.tensor([0.01 - 1e-12, 0.01]), "huber", 0.01),
                               torch.full((2,), 1e-4), rtol=1e-6, atol=0)
    h.sum().backward()
    assert err.grad.abs().max().item() == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        pointwise(err, "l1")


def test_huber_terms_replace_squares_in_every_fidelity() -> None:
    ds = _frames_with_gaps()
    batch = PackedData(ds, 3.0, ["lj", "hi"]).batch([0, 1, 2, 3])
    pred = {"energy": torch.zeros_like(batch.energy), "forces": torch.zeros_like(batch.forces)}
    mse, hub = loss_terms(pred, batch), loss_terms(pred, batch, kind="huber", delta=0.05)
    f = np.concatenate([ds[b].labels["lj"].forces.ravel() for b in (0, 1, 3)])
    by_hand = np.where(np.abs(f) < 0.05, f**2, 0.1 * np.abs(f) - 0.0025).mean()
    np.testing.assert_allclose(hub["forces"][0].item(), by_hand, rtol=1e-6)
    f_hi = ds[1].labels["hi"].forces.ravel()
    by_hand_hi = np.where(np.abs(f_hi) < 0.05, f_hi**2, 0.1 * np.abs(f_hi) - 0.0025).mean()
    np.testing.assert_allclose(hub["forces"][1].item(), by_hand_hi, rtol=1e-6)
    assert (hub["forces"] <= mse["forces"] + 1e-12).all()  # huber never exceeds the square


def test_rms_balance_sums_the_roots_of_the_weighted_terms() -> None:
    """loss_balance "rms": Σ √(w·t) over kinds and fidelities; a term that is 0 (no labels of
    that kind in the batch) adds nothing and leaves a finite gradient; each present term's
    gradient is ∇t / 2√t, independent of the size of t."""
    terms = {"energy": torch.tensor([0.04, 0.0], dtype=torch.float64, requires_grad=True),
             "forces": torch.tensor([0.25, 1e-6], dtype=torch.float64, requires_grad=True)}
    weights = {"energy": torch.tensor([1.0, 9.0], dtype=torch.float64), "forces": 4.0}
    total = total_loss(terms, weights, balance="rms")
    assert total.item() == pytest.approx(0.2 + 0.0 + 2.0 * 0.5 + 2.0 * 1e-3)
    total.backward()
    assert torch.isfinite(terms["energy"].grad).all() and terms["energy"].grad[1].item() == 0.0
    assert terms["energy"].grad[0].item() == pytest.approx(1.0 / (2 * 0.2))
    assert terms["forces"].grad.tolist() == pytest.approx([2.0 / (2 * 0.5), 2.0 / (2 * 1e-3)])
    plain = total_loss({k: v.detach() for k, v in terms.items()}, weights)
    assert plain.item() == pytest.approx(0.04 + 4 * (0.25 + 1e-6))
    with pytest.raises(ValueError, match="unknown loss balance 'max'"):
        total_loss(terms, weights, balance="max")
    with pytest.raises(ConfigError, match=r"loss_balance: 'max' is not one of \['none', 'rms'\]"):
        load_config({"training": {"loss_balance": "max"}})


def test_reference_energies_per_fidelity_from_own_data() -> None:
    rng = np.random.default_rng(0)
    true = {"a": {1: -13.6, 6: -1030.0, 8: -2040.0}, "b": {1: -10.0, 6: -900.0, 8: -2500.0}}
    frames = []
    for k in range(30):
        z = rng.choice([1, 6, 8], size=rng.integers(2, 7))
        pos = rng.normal(size=(len(z), 3)) * 2
        fid = "a" if k % 2 else "b"
        e = sum(true[fid][int(x)] for x in z) + rng.normal(scale=1e-3)
        frames.append(Frame(z, pos, {fid: Labels(energy=e)}))
    packed = PackedData(Dataset(frames), 3.0, ["a", "b"])
    model = build_potential(SMALL, [1, 6, 8], ["a", "b"])
    refs = model.fit_reference_energies(packed)
    for fid in "ab":
        np.testing.assert_allclose(refs[fid], [true[fid][z] for z in (1, 6, 8)], atol=0.01)


def test_single_composition_gives_minimum_norm_references() -> None:
    ds = toy_dataset(10)
    for f in ds.frames:
        f.numbers = np.array([1, 1, 6, 8, 8])
    packed = PackedData(ds, 3.0, ["lj"])
    model = build_potential(SMALL, [1, 6, 8], ["lj"])
    ref = np.array(model.fit_reference_energies(packed)["lj"])
    counts = np.array([2.0, 1.0, 2.0])
    mean_e = np.mean([f.labels["lj"].energy for f in ds.frames])
    assert math.isclose(counts @ ref, mean_e, rel_tol=1e-9, abs_tol=1e-9)
    np.testing.assert_allclose(ref, counts * mean_e / (counts @ counts), rtol=1e-9)  # minimum norm


def test_fidelity_without_energies_is_a_clear_error() -> None:
    ds = toy_dataset(4)
    for f in ds.frames:
        f.labels["hi"] = Labels(forces=f.labels["lj"].forces)
    model = build_potential(SMALL, [1, 6, 8], ["lj", "hi"])
    with pytest.raises(DataError, match="'hi' has no energies"):
        model.fit_reference_energies(PackedData(ds, 3.0, ["lj", "hi"]))


def _trainer(tmp_path, **cfg) -> Trainer:
    torch.manual_seed(0)
    ds = toy_dataset(24)
    model = build_potential(SMALL, [1, 6, 8], ["lj"])
    train = PackedData(ds[np.arange(16)], 3.0, ["lj"], dtype=torch.float32)
    val = PackedData(ds[np.arange(16, 24)], 3.0, ["lj"], dtype=torch.float32)
    model.fit_reference_energies(train)
    tc = TrainingConfig(batch_size=4, **cfg)
    return Trainer(model, train, val, tc, tmp_path, SMALL, options=StepOptions(progress=False))


def test_training_reduces_validation_error(tmp_path) -> None:
    tr = _trainer(tmp_path, epochs=15, lr=3e-3, ema_decay=None)
    first = tr.validate()["val_loss"]
    state = tr.fit()
    assert state.best_val < 0.5 * first
    assert (tmp_path / "model.pt").exists() and (tmp_path / "metrics.csv").exists()


def test_huber_training_reduces_validation_error(tmp_path) -> None:
    tr = _trainer(tmp_path, epochs=15, lr=3e-3, ema_decay=None, loss="huber", huber_delta=0.05)
    first = tr.validate()["val_loss"]
    assert tr.fit().best_val < 0.5 * first


def test_cosine_schedule_and_final_energy_weight(tmp_path) -> None:
    tr = _trainer(tmp_path, epochs=10, scheduler="cosine", lr=1e-3, min_lr=1e-5, final_energy_weight=1000.0)
    assert math.isclose(tr._lr(0.0), 1e-3) and math.isclose(tr._lr(1.0), 1e-5)
    assert math.isclose(tr._lr(0.5), 0.5 * (1e-3 + 1e-5))
    assert tr._weights(0.7)["energy"] == 1.0 and tr._weights(0.8)["energy"] == 1000.0
    tr.fit()
    lrs = [h["lr"] for h in tr.state.history]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_adam_second_moments_follow_the_switch_to_the_final_energy_weight(tmp_path, monkeypatch) -> None:
    """Over the first FLOOR_STEPS steps at the final energy weight, Adam's second moments are
    at least the squared gradients, so the 1000x energy term does not make steps of several
    learning rates; without the floor the first final steps move the weights further."""
    from polyfid.train import trainer as trainer_module

    def run(floor_steps: int) -> list[tuple[int | None, float, bool]]:
        monkeypatch.setattr(trainer_module, "FLOOR_STEPS", floor_steps)
        tr = _trainer(tmp_path / str(floor_steps), epochs=16, lr=3e-3, ema_decay=None, final_energy_weight=1000.0)
        params = [p for g in tr.optimizer.param_groups for p in g["params"]]
        adam_step, seen = tr.optimizer.step, []

        def step(*args, **kwargs):
            before = [p.detach().clone() for p in params]
            floored = all(bool((tr.optimizer.state[p]["exp_avg_sq"] >= p.grad.square()).all())
                          for p in params if "exp_avg_sq" in tr.optimizer.state.get(p, {}))
            out = adam_step(*args, **kwargs)
            moved = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))
            seen.append((tr.state.final_steps, moved / tr.optimizer.param_groups[0]["lr"], floored))
            return out

        tr.optimizer.step = step
        tr.fit()
        return seen

    with_floor, without = run(10), run(0)
    assert len(with_floor) == len(without) == 64
    counts = [c for c, _, _ in with_floor]
    start = counts.index(1)  # the first step at the final weight (epoch 13 of 16, 4 steps each)
    assert start == 48 and counts[start:start + 10] == list(range(1, 11)) and set(counts[start + 10:]) == {10}
    assert all(f for _, _, f in with_floor[start:start + 10])
    assert max(m for _, m, _ in with_floor[start:start + 5]) < max(m for _, m, _ in without[start:start + 5])


def test_step_budget_stops_mid_epoch_and_schedules_by_steps(tmp_path) -> None:
    """max_steps: 4 steps per epoch (16 frames, batch 4), 10 steps end in the third epoch; the
    cosine schedule reaches min_lr and the final energy weight starts at 3/4 of the steps."""
    tr = _trainer(tmp_path, epochs=2, max_steps=10, scheduler="cosine", lr=1e-3, min_lr=1e-5,
                  final_energy_weight=1000.0, final_fraction=0.2)  # max_steps, not epochs, ends it
    finals = []
    loss_w = tr._weights
    tr._weights = lambda frac: finals.append(tr._final(frac)) or loss_w(frac)
    state = tr.fit()
    assert state.stopped == "step limit" and state.step == 10 and state.epoch == 3
    assert [h["train_steps"] for h in state.history] == [4, 4, 2]
    assert finals == [False] * 8 + [True] * 2  # fraction 8/10 is the switch
    assert math.isclose(tr._lr(tr.fraction(0, 4)), 1e-5)
    # a finished run resumed with a larger budget continues where it stopped
    tr2 = _trainer(tmp_path, epochs=100, max_steps=12, scheduler="cosine")
    assert tr2.fit(resume=True).step == 12
    with pytest.raises(ConfigError, match=r"max_steps: must be >= 1"):
        load_config({"training": {"max_steps": 0}})


@pytest.mark.parametrize("split_epoch", [3, 4, 5])
def test_resume_is_exact_across_the_switch_to_the_final_energy_weight(tmp_path, split_epoch) -> None:
    """A step budget of 20 (4 steps per epoch) switches to the final energy weight at step 12,
    the start of epoch 4: a run interrupted right after its checkpoint of epoch 3 (just before
    the switch), 4 or 5 and resumed ends with the weights, optimiser and EMA of one that was not
    interrupted."""
    cfg = dict(epochs=100, max_steps=20, scheduler="cosine", lr=3e-3, final_energy_weight=1000.0,
               final_fraction=0.4, checkpoint_interval_s=0.0)
    straight = _trainer(tmp_path / "straight", **cfg)
    straight.fit()

    class Interrupted(Exception):
        pass

    first = _trainer(tmp_path / "split", **cfg)
    save = first.save_checkpoint

    def save_then_stop() -> None:
        save()
        if first.state.epoch == split_epoch:
            raise Interrupted

    first.save_checkpoint = save_then_stop
    with pytest.raises(Interrupted):
        first.fit()
    resumed = _trainer(tmp_path / "split", **cfg)
    state = resumed.fit(resume=True)
    assert state.step == 20 and state.final_steps == 8
    a, b = straight.checkpoint_dict(), resumed.checkpoint_dict()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"], strict=True):
        assert torch.equal(x, y)


def test_time_budget_stops_training(tmp_path) -> None:
    tr = _trainer(tmp_path, epochs=10_000, max_time_s=1.5, scheduler="cosine")
    state = tr.fit()
    assert state.stopped == "time budget"
    assert 1.5 <= state.elapsed_s < 6.0


def test_plateau_and_early_stopping(tmp_path) -> None:
    # lr so small that nothing improves: the plateau cuts it, then early stopping ends the run
    tr = _trainer(tmp_path, epochs=100, lr=1e-12, min_lr=1e-14, plateau_patience=2, early_stopping_patience=5)
    state = tr.fit()
    assert state.stopped == "early stopping"
    assert state.epoch <= 7
    assert state.lr < 1e-12


def test_float64_training(tmp_path, toy_xyz) -> None:
    result = run_training(tiny_config(toy_xyz, tmp_path / "run", epochs=2, dtype="float64"))
    assert next(result.model.parameters()).dtype == torch.float64
    assert result.val_metrics["lj"]["force_mae_meV_A"] > 0


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"training": {"lr": "fast"}}, "training.lr: expected a number"),
        ({"training": {"epoch": 3}}, "did you mean 'epochs'"),
        ({"model": {"architecture": 3}}, "model.architecture: 3 is not one of"),
        ({"training": {"scheduler": "step"}}, "not one of"),
        ({"training": {"loss": "l1"}}, "training.loss: 'l1' is not one of"),
        ({"training": {"huber_delta": 0}}, "training.huber_delta: must be > 0"),
        ({"data": {"train": [{"file": "x"}]}}, r"data.train\[0\]: unknown key 'file'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, toy_xyz, patch, message) -> None:
    cfg = tiny_config(toy_xyz, tmp_path)
    for section, values in patch.items():
        cfg[section] = values if section == "data" else {**cfg[section], **values}
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_config_reads_exponent_floats_from_yaml(tmp_path, toy_xyz) -> None:
    """PyYAML (YAML 1.1) reads `lr: 2e-3` as the string '2e-3'; a number field takes it."""
    import yaml

    cfg = tiny_config(toy_xyz, tmp_path)
    cfg["training"]["lr"] = yaml.safe_load("2e-3")
    assert cfg["training"]["lr"] == "2e-3"
    assert load_config(cfg).training.lr == 0.002


@needs_ftz
@pytest.mark.parametrize("flush", [True, False])
def test_training_flushes_subnormals_only_while_it_runs(tmp_path, flush) -> None:
    """Every step runs with subnormal floats flushed (training.flush_denormal, the default) or
    not; the thread's mode is back as it was after fit()."""
    from polyfid.numerics import flushing_denormals

    assert TrainingConfig().flush_denormal
    seen: list[bool] = []

    def regularizer() -> torch.Tensor:  # called in every step's loss
        seen.append(flushing_denormals())
        return torch.zeros(())

    tr = _trainer(tmp_path, epochs=2, flush_denormal=flush)
    tr.regularizer = regularizer
    tr.fit()
    assert len(seen) == 8 and set(seen) == {flush}
    assert not flushing_denormals()


def test_a_checkpoint_written_before_step_budgets_resumes(tmp_path) -> None:
    """Checkpoints of earlier versions lack the step count and the final-phase counter: they
    resume, counting steps from 0 and, inside the final phase, with no Adam floor, as those
    versions did."""
    final = dict(final_energy_weight=1000.0, final_fraction=0.5, checkpoint_interval_s=0.0)
    _trainer(tmp_path, epochs=3, **final).fit()
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("step", "final_steps"):
        del ck["state"][key]
    del ck["checksum"]  # nor had they a checksum
    torch.save(ck, tmp_path / "checkpoint.pt")
    state = _trainer(tmp_path, epochs=4, **final).fit(resume=True)  # epoch 4 of 4: the final phase
    assert state.epoch == 4 and state.step == 4 and state.final_steps == -1
