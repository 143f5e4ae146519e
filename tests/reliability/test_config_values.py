"""Reliability of the configuration's values (issue 22): every option's type and range is
checked when the configuration is read, with a message naming the key path and the range;
devices a machine lacks are refused where they are used; random values never escape as
anything but a ConfigError; the defaults and the configurations the repository ships load."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfid.cli.main import main
from polyfid.errors import ConfigError
from polyfid.numerics import resolve_device
from polyfid.train.config import (
    Config,
    DataConfig,
    FinetuneConfig,
    FinetuneData,
    FinetuneOptions,
    FinetuneOutput,
    MetaConfig,
    ModelConfig,
    StrategyConfig,
    TrainingConfig,
    documented_defaults,
    from_dict,
    load_config,
    load_finetune_config,
)

REPO = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")

# (section options, regular expression the message must match: the key path and the range)
MODEL_CASES = [
    ({"n_features": 0}, r"config\.model\.n_features: must be >= 1, got 0"),
    ({"n_features": -3}, r"config\.model\.n_features: must be >= 1"),
    ({"cutoff": -1}, r"config\.model\.cutoff: must be > 0 \(Å\), got -1"),
    ({"cutoff": 0}, r"config\.model\.cutoff: must be > 0 \(Å\)"),
    ({"n_interactions": 0}, r"config\.model\.n_interactions: must be >= 1, got 0"),
    ({"n_sensitivities": 0}, r"config\.model\.n_sensitivities: must be >= 1, got 0"),
    ({"architecture": "hiphop", "l_max": 9}, r"config\.model\.l_max: must be in \[1, 3\] or null, got 9"),
    ({"architecture": "hipnn_ts", "l_max": 3}, r"config\.model\.l_max: architecture 'hipnn_ts' takes 1 to 2"),
    ({"l_max": 2}, r"config\.model\.l_max: architecture 'hipnn' has no l_max"),
    ({"architecture": "hipnn_ts", "max_tensors": 2}, r"config\.model\.max_tensors: architecture 'hipnn_ts' has no"),
    ({"tensor_features": 8}, r"config\.model\.tensor_features: architecture 'hipnn' has no"),
    ({"architecture": "hiphop", "max_tensors": 5}, r"config\.model\.max_tensors: must be in \[1, 4\] or null"),
    ({"architecture": "hiphop", "n_features": 16, "tensor_features": 32},
     r"config\.model\.tensor_features: must be at most n_features \(16\)"),
    ({"soft_min": 0}, r"config\.model\.soft_min: must be > 0 \(Å\)"),
    ({"soft_min": 5.0, "soft_max": 4.0}, r"config\.model\.soft_min: must be below soft_max"),
    ({"soft_max": NAN}, r"config\.model\.soft_max: expected a finite number"),
    ({"n_atom_layers": -1}, r"config\.model\.n_atom_layers: must be >= 0"),
    ({"n_features": 12.5}, r"config\.model\.n_features: expected an integer"),
    ({"activation": "relu"}, r"config\.model\.activation: 'relu' is not one of"),
]

TRAINING_CASES = [
    ({"grad_clip": -1}, r"config\.training\.grad_clip: must be > 0 or null, got -1"),
    ({"grad_clip": 0}, r"config\.training\.grad_clip: must be > 0 or null"),
    ({"energy_weight": -1}, r"config\.training\.energy_weight: must be >= 0, got -1"),
    ({"force_weight": -0.5}, r"config\.training\.force_weight: must be >= 0, got -0\.5"),
    ({"stress_weight": -1}, r"config\.training\.stress_weight: must be >= 0"),
    ({"energy_weight": 0, "force_weight": 0}, r"config\.training: energy_weight, force_weight and stress_weight"),
    ({"max_time_s": -10}, r"config\.training\.max_time_s: must be > 0 \(s\) or null, got -10"),
    ({"max_time_s": INF}, r"config\.training\.max_time_s: expected a finite number"),
    ({"num_threads": 0}, r"config\.training\.num_threads: must be in \[1, 1024\] or null, got 0"),
    ({"num_threads": 100000}, r"config\.training\.num_threads: must be in \[1, 1024\] or null, got 100000"),
    ({"batch_size": 0}, r"config\.training\.batch_size: must be >= 1, got 0"),
    ({"lr": 0}, r"config\.training\.lr: must be > 0, got 0"),
    ({"lr": NAN}, r"config\.training\.lr: expected a finite number, got nan"),
    ({"lr": "inf"}, r"config\.training\.lr: expected a finite number"),
    ({"checkpoint_interval_s": -1}, r"config\.training\.checkpoint_interval_s: must be >= 0 \(s\)"),
    ({"plateau_factor": 1.0}, r"config\.training\.plateau_factor: must be in \(0, 1\), got 1"),
    ({"plateau_factor": 0}, r"config\.training\.plateau_factor: must be in \(0, 1\)"),
    ({"plateau_patience": 0}, r"config\.training\.plateau_patience: must be >= 1"),
    ({"min_lr": -1e-6}, r"config\.training\.min_lr: must be >= 0"),
    ({"weight_decay": -0.1}, r"config\.training\.weight_decay: must be >= 0"),
    ({"final_energy_weight": -1}, r"config\.training\.final_energy_weight: must be >= 0 or null"),
    ({"huber_delta": 0}, r"config\.training\.huber_delta: must be > 0"),
    ({"early_stopping_patience": 0}, r"config\.training\.early_stopping_patience: must be >= 1 or null"),
    ({"ema_decay": 1.0}, r"config\.training\.ema_decay: must be in \(0, 1\) or null"),
    ({"final_fraction": 1.5}, r"config\.training\.final_fraction: must be in \[0, 1\]"),
    ({"epochs": 0}, r"config\.training\.epochs: must be >= 1"),
    ({"eval_every": 0}, r"config\.training\.eval_every: must be >= 1"),
    ({"epoch_frames": 0}, r"config\.training\.epoch_frames: must be >= 1 or null"),
    ({"seed": -1}, r"config\.training\.seed: must be in \[0, 2\^64\)"),
    ({"device": "gpu"}, r"config\.training\.device: expected cpu, cuda, cuda:N or mps, got 'gpu'"),
    ({"device": "cuda:x"}, r"config\.training\.device: expected cpu, cuda, cuda:N or mps"),
    ({"fidelity_weights": {"hi": {"energy": -1}}}, r"config\.training\.fidelity_weights\.hi\.energy: must be >= 0"),
    ({"fidelity_weights": {"hi": {"forces": NAN}}}, r"config\.training\.fidelity_weights\.hi\.forces: expected a "
                                                    r"finite number"),
    ({"sampling": {"hi": 0}}, r"config\.training\.sampling\.hi: must be a share in \(0, 1\]"),
    ({"num_threads": 10**400}, r"config\.training\.num_threads: expected a finite number"),
]

STRATEGY_CASES = [
    ({"head_tie": -1}, r"config\.strategy\.head_tie: must be >= 0, got -1"),
    ({"embedding_dim": 0}, r"config\.strategy\.embedding_dim: must be >= 1"),
    ({"target_share": 1.0}, r"config\.strategy\.target_share: must be in \(0, 1\) or null"),
    ({"target_share": 0}, r"config\.strategy\.target_share: must be in \(0, 1\) or null"),
    ({"fidelity_blocks": -1}, r"config\.strategy\.fidelity_blocks: must be >= 0 or null"),
    ({"second_stage": {"lr": -1e-4}}, r"config\.strategy\.second_stage\.lr: must be > 0, got -0\.0001"),
    ({"second_stage": {"grad_clip": -1}}, r"config\.strategy\.second_stage\.grad_clip: must be > 0 or null"),
    ({"second_stage": {"lrr": 1e-4}}, r"config\.strategy\.second_stage: unknown key 'lrr' \(did you mean 'lr'\?\)"),
    ({"second_stage": {"max_steps": 0}}, r"config\.strategy\.second_stage\.max_steps: must be >= 1 or null"),
    ({"second_stage": {"device": "tpu"}}, r"config\.strategy\.second_stage\.device: expected cpu, cuda"),
    ({"second_stage": [1]}, r"config\.strategy\.second_stage: expected a mapping"),
    ({"delta_model": {"n_features": 0}}, r"config\.strategy\.delta_model\.n_features: must be >= 1"),
    ({"delta_model": {"cutoff": -2}}, r"config\.strategy\.delta_model\.cutoff: must be > 0 \(Å\)"),
    ({"delta_model": {"n_feature": 8}}, r"config\.strategy\.delta_model: unknown key 'n_feature' \(did you mean"),
    ({"delta_model": {"l_max": 2}}, r"config\.strategy\.delta_model\.l_max: architecture 'hipnn' has no l_max"),
    ({"name": "ensemble"}, r"config\.strategy\.name: 'ensemble' is not one of"),
    ({"head_tie": INF}, r"config\.strategy\.head_tie: expected a finite number"),
]

META_CASES = [
    ({"outer_steps": 0}, r"config\.meta\.outer_steps: must be >= 1, got 0"),
    ({"inner_steps": 0}, r"config\.meta\.inner_steps: must be >= 1"),
    ({"inner_lr": 0}, r"config\.meta\.inner_lr: must be > 0"),
    ({"inner_lr": NAN}, r"config\.meta\.inner_lr: expected a finite number"),
    ({"inner_lr_final": -1e-3}, r"config\.meta\.inner_lr_final: must be > 0 or null"),
    ({"outer_lr": 0}, r"config\.meta\.outer_lr: must be in \(0, 1\]"),
    ({"outer_lr": 1.5}, r"config\.meta\.outer_lr: must be in \(0, 1\], got 1\.5"),
    ({"outer_lr_final": -0.1}, r"config\.meta\.outer_lr_final: must be in \[0, 1\]"),
    ({"tasks_per_step": 0}, r"config\.meta\.tasks_per_step: must be >= 1"),
    ({"eval_every": 0}, r"config\.meta\.eval_every: must be >= 1"),
    ({"inner_betas": [1.0, 0.999]}, r"config\.meta\.inner_betas\[0\]: must be in \[0, 1\)"),
    ({"inner_betas": [0.9]}, r"config\.meta\.inner_betas: expected two numbers in \[0, 1\)"),
    ({"inner_betas": [0.9, "x"]}, r"config\.meta\.inner_betas\[1\]: expected a number"),
    ({"task_weights": {"a": -1}}, r"config\.meta\.task_weights\.a: must be >= 0"),
    ({"inner_optimizer": "rmsprop"}, r"config\.meta\.inner_optimizer: 'rmsprop' is not one of"),
]

DATA_CASES = [
    ({"min_distance": 0}, r"config\.data\.min_distance: must be > 0 \(Å\), got 0"),
    ({"min_distance": -0.1}, r"config\.data\.min_distance: must be > 0 \(Å\)"),
    ({"max_extent": -5}, r"config\.data\.max_extent: must be in \(0, 20000\] \(Å\)"),
    ({"max_extent": 1e5}, r"config\.data\.max_extent: must be in \(0, 20000\] \(Å\), got 100000"),
    ({"min_distance": 2.0, "max_extent": 1.0}, r"config\.data: min_distance \(2 Å\) must be below max_extent"),
    ({"val_size": 0}, r"config\.data\.val_size: must be >= 1 or null, got 0"),
    ({"train_size": 0}, r"config\.data\.train_size: must be >= 1 or null"),
    ({"val_fraction": 1.0}, r"config\.data\.val_fraction: must be in \[0, 1\)"),
    ({"val_fraction": -0.1}, r"config\.data\.val_fraction: must be in \[0, 1\)"),
    ({"merge_tolerance": -1e-6}, r"config\.data\.merge_tolerance: must be >= 0 \(Å\) or null"),
    ({"merge_tolerance": NAN}, r"config\.data\.merge_tolerance: expected a finite number"),
    ({"seed": -2}, r"config\.data\.seed: must be in \[0, 2\^64\)"),
    ({"train": [{"path": "a.xyz", "select": "0:10:0"}]},
     r"config\.data\.train\[0\]\.select: '0:10:0' is not a slice 'start:stop:step'"),
    ({"train": [{"path": "a.xyz", "select": "first ten"}]},
     r"config\.data\.train\[0\]\.select: 'first ten' is not a slice"),
    ({"train": [{"path": "a.xyz", "select": "1:2:3:4"}]}, r"config\.data\.train\[0\]\.select: '1:2:3:4'"),
    ({"train": [{"path": "a.xyz", "use": ["energies"]}]},
     r"config\.data\.train\[0\]\.use\[0\]: 'energies' is not one of \['energy', 'forces', 'stress'\]"),
    ({"train": [{"path": "a.xyz", "use": []}]}, r"config\.data\.train\[0\]\.use: names no label kind"),
    ({"test": [{"path": "a.xyz", "use": "energy"}]}, r"config\.data\.test\[0\]\.use: expected a list"),
]


def _cases(section: str, cases: list) -> list:
    return [pytest.param({section: options}, message, id=f"{section}-{k}") for k, (options, message) in
            enumerate(cases)]


@pytest.mark.parametrize("config, message", _cases("model", MODEL_CASES) + _cases("training", TRAINING_CASES)
                         + _cases("strategy", STRATEGY_CASES) + _cases("meta", META_CASES)
                         + _cases("data", DATA_CASES))
def test_out_of_range_values_name_the_key_and_the_range(config, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_each_section_has_ten_cases() -> None:
    for cases in (MODEL_CASES, TRAINING_CASES, STRATEGY_CASES, META_CASES, DATA_CASES):
        assert len(cases) >= 10


def test_yaml_values_are_checked_as_read(tmp_path) -> None:
    """YAML's own spellings of non-finite numbers, and exponent floats read as strings."""
    path = tmp_path / "cfg.yaml"
    for text, message in (("training: {lr: .nan}", r"training\.lr: expected a finite number"),
                          ("model: {cutoff: -.inf}", r"model\.cutoff: expected a finite number"),
                          ("training: {grad_clip: -1e2}", r"training\.grad_clip: must be > 0 or null, got -100")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text("training: {lr: 2e-3, max_time_s: 1e3}")
    assert load_config(path).training.lr == 2e-3


def test_values_in_range_load() -> None:
    cfg = load_config({
        "model": {"architecture": "hiphop", "l_max": 3, "max_tensors": 4, "n_features": 32, "tensor_features": 32},
        "training": {"grad_clip": None, "max_time_s": 60, "num_threads": 1, "energy_weight": 0, "device": "cuda:1",
                     "checkpoint_interval_s": 0, "seed": 2**64 - 1},
        "strategy": {"name": "delta", "second_stage": {"lr": 1e-4}, "delta_model": {"n_features": 16,
                                                                                    "tensor_features": 8}},
        "data": {"train": [{"path": "a.xyz", "select": "::10", "use": ["energy"]}], "merge_tolerance": None},
    })
    assert cfg.model.l_max == 3 and cfg.training.max_time_s == 60.0 and cfg.training.device == "cuda:1"
    assert load_config({"model": {"architecture": "hipnn_ts", "l_max": 2}}).model.l_max == 2


def _write(tmp_path: Path, training: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": [{"path": str(tmp_path / "missing.xyz")}]},
                                    "training": training, "output": {"dir": str(tmp_path / "run")}}))
    return path


def test_cli_refuses_gradient_ascent(tmp_path, capsys) -> None:
    assert main(["train", str(_write(tmp_path, {"grad_clip": -1}))]) == 2
    err = capsys.readouterr().err
    assert "training.grad_clip: must be > 0 or null, got -1" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: 'cuda' is a valid device here")
def test_cli_refuses_cuda_without_cuda(tmp_path, capsys) -> None:
    # checked before the data are read: the data file does not even exist
    assert main(["train", str(_write(tmp_path, {"device": "cuda"}))]) == 2
    err = capsys.readouterr().err
    assert "training.device: 'cuda' asked but this machine has no CUDA device" in err and "use cpu" in err
    assert "Traceback" not in err


def test_one_device_resolution(tmp_path) -> None:
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.device: expected cpu, cuda, cuda:N or mps, got 'gpu'"):
        resolve_device("gpu", "model.device")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"training.device: 'cuda:{n}' asked but this machine has"):
        resolve_device(f"cuda:{n}", "training.device")
    from polyfid.calculators.ase import PolyfidCalculator
    from polyfid.models import load_model
    with pytest.raises(ConfigError, match=f"device: 'cuda:{n}' asked"):
        load_model(tmp_path / "never-read.pt", device=f"cuda:{n}")
    with pytest.raises(ConfigError, match=f"device: 'cuda:{n}' asked"):
        PolyfidCalculator(tmp_path / "never-read.pt", device=f"cuda:{n}")


def test_finetune_options_are_checked(tmp_path, capsys) -> None:
    from polyfid.train.config import FinetuneOptions
    from polyfid.train.finetune import finetune

    for kwargs, message in (({"steps": 0}, r"finetune\.steps: must be >= 1, got 0"),
                            ({"warmup_steps": -1}, r"finetune\.warmup_steps: must be >= 0"),
                            ({"anchor": -1.0}, r"finetune\.anchor: must be >= 0"),
                            ({"replay_share": 1.0}, r"finetune\.replay_share: must be in \(0, 1\)"),
                            ({"val_fraction": 1.0}, r"finetune\.val_fraction: must be in \[0, 1\)"),
                            ({"seed": -1}, r"finetune\.seed: must be in \[0, 2\^64\)"),
                            ({"trainable": "some"}, r"finetune\.trainable: 'some' is not one of"),
                            ({"training": {"lr": -1e-3}}, r"finetune\.training\.lr: must be > 0"),
                            ({"training": {"grad_clip": -1}}, r"finetune\.training\.grad_clip: must be > 0 or null"),
                            ({"training": {"seed": 2}}, r"finetune\.training\.seed: set \S*finetune\.seed")):
        with pytest.raises(ConfigError, match=message):  # before the (missing) model file is read
            finetune(tmp_path / "missing.pt", None, tmp_path / "out", FinetuneOptions(**kwargs))
        with pytest.raises(ConfigError, match=message.replace("finetune", "config.finetune", 1)):
            load_finetune_config({"model": "m.pt", "finetune": kwargs})
    for argv, message in ((["--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
                          (["--steps", "0"], "--steps: must be a whole number >= 1, got 0"),
                          (["--warmup-steps", "-5"], "--warmup-steps: must be a whole number >= 0"),
                          (["--threads", "0"], "--threads: must be in [1, 1024], got 0"),
                          (["--max-time-s", "0"], "--max-time-s: must be a finite number > 0"),
                          (["--replay-share", "2"], "--replay-share: must be a number in (0, 1)")):
        with pytest.raises(SystemExit) as stop:  # at parsing, before any file is read
            main(["finetune", str(tmp_path / "missing.pt"), str(tmp_path / "missing.xyz"), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err


# ---- any value for any option: a Config or a ConfigError, nothing else ----------------------
def _options(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for f in fields(cls):
        default = getattr(cls(), f.name)
        out += _options(type(default), (*prefix, f.name)) if is_dataclass(default) else [(*prefix, f.name)]
    return out


OPTIONS = _options(Config) + [("data", "train"), ("strategy", "second_stage"), ("strategy", "delta_model")]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.sampled_from(["cuda", "cuda:3", "mps", "0:5", "::0", "1e-3", ".nan"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(
                                                           ["lr", "path", "energy", "n_features", "hi", "use"]),
                                                           inner, max_size=3)), max_leaves=6)


FINETUNE_OPTIONS = _options(FinetuneConfig) + [("finetune", "training"), ("data", "replay")]


def _config_or_error(cls: type, assignments, d: dict) -> None:
    for path, value in assignments:
        node = d
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    try:
        cfg = from_dict(cls, d)
    except ConfigError:
        return
    assert isinstance(cfg, cls)


@settings(derandomize=True, max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES), min_size=1, max_size=4))
def test_any_value_gives_a_config_or_a_config_error(assignments) -> None:
    _config_or_error(Config, assignments, {})


@settings(derandomize=True, max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FINETUNE_OPTIONS), VALUES), min_size=1, max_size=4))
def test_any_fine_tuning_value_gives_a_config_or_a_config_error(assignments) -> None:
    _config_or_error(FinetuneConfig, assignments, {"model": "m.pt"})


# ---- what the repository ships loads ----------------------------------------------------------
def test_defaults_and_documented_defaults_load() -> None:
    sections = (DataConfig, ModelConfig, TrainingConfig, StrategyConfig, MetaConfig, FinetuneData, FinetuneOptions,
                FinetuneOutput)
    for cls in sections:
        from_dict(cls, {})
    # every default is inside its own declared range
    for cls in sections:
        inst = cls()
        from_dict(cls, {f.name: getattr(inst, f.name) for f in fields(cls) if not is_dataclass(getattr(inst, f.name))})
    printed = yaml.safe_load(documented_defaults())
    assert load_config(printed).to_dict() == Config().to_dict()
    printed = yaml.safe_load(documented_defaults(FinetuneConfig)) | {"model": "m.pt"}
    assert load_finetune_config(printed).to_dict() == FinetuneConfig(model="m.pt").to_dict()
    assert "range > 0" in documented_defaults()


def test_shipped_configurations_load(tmp_path, monkeypatch) -> None:
    from polyfid.demo import multifidelity, xtb_ethanol
    from polyfid.diagnose.potentials import NETWORK_TRAINING

    load_config(xtb_ethanol.training_config(tmp_path / "a.xyz", tmp_path / "b.xyz", tmp_path, xtb_ethanol
                                            .demo_settings(quick=True)))
    mf = multifidelity.MultiFidelityDemoSettings()
    load_config(multifidelity.training_config(mf, tmp_path, {"name": "single"}, mf.steps))
    load_config(multifidelity.training_config(mf, tmp_path, {"name": "multi-head", "second_stage": {
        "max_steps": mf.own_steps}}, mf.low_steps))
    load_config({"training": NETWORK_TRAINING | {"num_threads": None}})
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import architectures
    import multifidelity as bench

    for model in architectures.POLYFID_ARCH.values():
        load_config({"model": model})
    recipes = list(bench.VARIANTS.values()) + [bench.recipe(k) for k in bench.STRATEGY]
    for rec in recipes:
        training = {"sampling": {"hi": rec["sampling"]}} if rec.get("sampling") else {}
        if rec.get("fidelity_weights"):
            training["fidelity_weights"] = {"hi": rec["fidelity_weights"]}
        strategy = dict(rec["strategy"]) | {"target": "hi", "base": "lo"}
        load_config(bench._config(tmp_path, 100, 0, strategy, training))
    assert len(recipes) > 10
