"""`polyfid finetune CONFIG.yaml`: a configuration file like `polyfid train`'s, flags that override
its keys, the deprecated spellings (MODEL DATA..., --level, --out) that still work and warn, and
range errors that name the key or the flag."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from conftest import toy_molecules

from polyfid.cli import finetune_cmd
from polyfid.cli.main import build_parser, main
from polyfid.errors import ConfigError
from polyfid.models import atomic_write, build_potential, load_model, model_dict
from polyfid.train.config import FinetuneConfig, load_finetune_config
from polyfid.train.finetune import read_finetune_data

TINY = {"architecture": "hipnn", "n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1,
        "cutoff": 3.0}
QUICK = {"steps": 3, "warmup_steps": 2, "training": {"num_threads": 1, "batch_size": 4}}
WARNING = "polyfid finetune: warning:"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A saved model of one level ("lj"), fine-tuning, test and replay data files."""
    d = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    model = build_potential(TINY, [1, 6, 8], ["lj"])
    atomic_write(model_dict(model, TINY), d / "model.pt")
    ase.io.write(d / "new.extxyz", toy_molecules(10, seed=9), format="extxyz")
    ase.io.write(d / "test.extxyz", toy_molecules(4, seed=10), format="extxyz")
    ase.io.write(d / "lj.extxyz", toy_molecules(8, seed=11), format="extxyz")
    return d


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def parsed(argv: list[str]):
    return build_parser().parse_args(["finetune", *argv])


def same_weights(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_config_file_fine_tunes_end_to_end(work, tmp_path, capsys) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    for name in ("model.pt", "new.extxyz", "test.extxyz"):  # relative paths: found beside the file
        (folder / name).write_bytes((work / name).read_bytes())
    cfg = write(folder / "ft.yaml", {"model": "model.pt", "data": {"train": "new.extxyz", "test": ["test.extxyz"]},
                                     "finetune": QUICK, "output": {"dir": str(tmp_path / "run")}})
    assert main(["finetune", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert WARNING not in err
    run = tmp_path / "run"
    lines = out.splitlines()
    assert lines[0].startswith("level 'new': head started from 'lj'; ") and lines[0].endswith(" s of training")
    assert lines[1] == f"model: {run / 'model.pt'}"
    assert load_model(run / "model.pt").fidelities == ["lj", "new"]
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"fidelity", "source_head", "train_s", "stages", "test"}
    assert results["fidelity"] == "new" and results["source_head"] == "lj" and set(results["stages"]) == {
        "warmup", "finetune"}
    assert results["test"]["new"]["n_energy"] == 4 and json.loads("\n".join(lines[2:])) == results["test"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["finetune"]["steps"] == 3 and saved["model"] == str(folder / "model.pt")
    assert load_finetune_config(saved).data.train[0].path == str(folder / "new.extxyz")


def test_flags_override_the_file(work, tmp_path, capsys) -> None:
    cfg = write(tmp_path / "ft.yaml", {
        "model": str(work / "model.pt"), "data": {"train": [str(work / "new.extxyz")]},
        "finetune": {"steps": 50, "seed": 4, "training": {"num_threads": 1, "batch_size": 4, "lr": 1e-3}},
        "output": {"dir": str(tmp_path / "from_file")}})
    args = parsed([str(cfg), "--steps", "7", "--lr", "2e-4", "--threads", "2", "--fidelity", "pbe", "--trainable",
                   "head", "--test", str(work / "test.extxyz"), "--replay", f"{work / 'lj.extxyz'}=lj",
                   "--output-dir", str(tmp_path / "from_flag"), "--val-fraction", "0.5"])
    c = finetune_cmd.config_from_args(args)
    assert isinstance(c, FinetuneConfig) and capsys.readouterr().err == ""
    f = c.finetune
    assert (f.steps, f.seed, f.fidelity, f.trainable, f.val_fraction) == (7, 4, "pbe", "head", 0.5)
    assert f.training == {"num_threads": 2, "batch_size": 4, "lr": 2e-4}  # merged key by key
    assert c.output.dir == str(tmp_path / "from_flag")
    assert [s.path for s in c.data.test] == [str(work / "test.extxyz")]
    assert [(s.path, s.fidelity) for s in c.data.replay] == [(str(work / "lj.extxyz"), "lj")]
    # the model file named by a flag: a file need not name one
    partial = write(tmp_path / "partial.yaml", {"data": {"train": [str(work / "new.extxyz")]}})
    assert finetune_cmd.config_from_args(parsed([str(partial), "--model", "m.pt"])).model == "m.pt"
    assert main(["finetune", str(partial)]) == 2
    assert "model: required" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["level", "out", "positional"])
def test_each_deprecated_spelling_works_and_warns(work, tmp_path, capsys, spelling) -> None:
    cfg = write(tmp_path / "ft.yaml", {"model": str(work / "model.pt"), "data": {"train": [str(work / "new.extxyz")]}})
    argv = {"level": [str(cfg), "--level", "pbe"],
            "out": [str(cfg), "--out", str(tmp_path / "dir")],
            "positional": [str(work / "model.pt"), str(work / "new.extxyz"), str(work / "test.extxyz")]}[spelling]
    c = finetune_cmd.config_from_args(parsed(argv))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(WARNING) and "deprecated" in err[0]
    if spelling == "level":
        assert "--level is deprecated; use --fidelity" in err[0] and c.finetune.fidelity == "pbe"
    elif spelling == "out":
        assert "--out is deprecated; use --output-dir" in err[0] and c.output.dir == str(tmp_path / "dir")
    else:
        assert "polyfid finetune CONFIG.yaml" in err[0] and c.model == str(work / "model.pt")
        assert [s.path for s in c.data.train] == [str(work / "new.extxyz"), str(work / "test.extxyz")]
    with pytest.raises(ConfigError, match="give --fidelity only"):
        finetune_cmd.config_from_args(parsed([str(cfg), "--level", "a", "--fidelity", "b"]))


def test_the_old_form_gives_the_same_model_as_the_config_file(work, tmp_path, capsys) -> None:
    flags = ["--steps", "3", "--warmup-steps", "2", "--threads", "1", "--seed", "3", "--replay",
             str(work / "lj.extxyz"), "--replay-share", "0.4"]
    assert main(["finetune", str(work / "model.pt"), str(work / "new.extxyz"), *flags, "--out",
                 str(tmp_path / "old")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 2  # the positional form and --out
    cfg = write(tmp_path / "ft.yaml", {
        "model": str(work / "model.pt"), "data": {"train": [str(work / "new.extxyz")],
                                                  "replay": [str(work / "lj.extxyz")]},
        "finetune": {"steps": 3, "warmup_steps": 2, "seed": 3, "replay_share": 0.4, "training": {"num_threads": 1}},
        "output": {"dir": str(tmp_path / "new")}})
    assert main(["finetune", str(cfg)]) == 0
    assert WARNING not in capsys.readouterr().err
    assert same_weights(tmp_path / "old" / "model.pt", tmp_path / "new" / "model.pt")
    # the old --fidelity F --level L: label set F of the files, fine-tuned as level L
    assert main(["finetune", str(work / "model.pt"), str(work / "new.extxyz"), "--fidelity", "read_as",
                 "--level", "named", "--steps", "2", "--warmup-steps", "0", "--threads", "1", "--out",
                 str(tmp_path / "both")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("level 'named'") and "--fidelity F --level L" in err
    assert load_model(tmp_path / "both" / "model.pt").fidelities == ["lj", "named"]


@pytest.mark.parametrize(("finetune", "words"), [
    ({"steps": 0}, "finetune.steps: must be >= 1, got 0"),
    ({"warmup_steps": -1}, "finetune.warmup_steps: must be >= 0"),
    ({"replay_share": 1.0}, "finetune.replay_share: must be in (0, 1)"),
    ({"val_fraction": 1.0}, "finetune.val_fraction: must be in [0, 1)"),
    ({"trainable": "some"}, "finetune.trainable: 'some' is not one of"),
    ({"training": {"lr": -1e-3}}, "finetune.training.lr: must be > 0"),
    ({"training": {"seed": 1}}, "finetune.training.seed: set config.finetune.seed"),
    ({"stpes": 10}, "did you mean 'steps'"),
])
def test_a_value_out_of_range_in_the_file_names_the_key(work, tmp_path, capsys, finetune, words) -> None:
    cfg = write(tmp_path / "ft.yaml", {"model": str(work / "model.pt"), "data": {"train": [str(work / "new.extxyz")]},
                                       "finetune": finetune, "output": {"dir": str(tmp_path / "run")}})
    assert main(["finetune", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polyfid finetune: error:") and words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "words"), [
    (["--steps", "0"], "argument --steps: must be a whole number >= 1, got 0"),
    (["--warmup-steps", "-5"], "argument --warmup-steps: must be a whole number >= 0"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0"),
    (["--max-time-s", "0"], "argument --max-time-s: must be a finite number > 0"),
    (["--threads", "0"], "argument --threads: must be in [1, 1024], got 0"),
    (["--replay-share", "1"], "argument --replay-share: must be a number in (0, 1)"),
    (["--val-fraction", "1"], "argument --val-fraction: must be a number in [0, 1)"),
    (["--anchor", "nan"], "argument --anchor: must be a finite number >= 0"),
])
def test_a_flag_out_of_range_stops_at_parsing(tmp_path, capsys, argv, words) -> None:
    for form in ([str(tmp_path / "missing.yaml")], [str(tmp_path / "m.pt"), str(tmp_path / "d.xyz")]):
        with pytest.raises(SystemExit) as stop:
            main(["finetune", *form, *argv])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def write_rmd17(path: Path, n_frames: int = 6) -> None:
    """A revised-MD17 archive: two label sets, pbe_def2svp and md17_pbe_ts, on the same frames."""
    rng = np.random.default_rng(0)
    grid = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float) * 1.3
    coords = grid + rng.normal(scale=0.1, size=(n_frames, 4, 3))
    np.savez(path, nuclear_charges=np.array([6, 1, 1, 8]), coords=coords, energies=rng.normal(size=n_frames),
             forces=rng.normal(size=(n_frames, 4, 3)), old_energies=rng.normal(size=n_frames),
             old_forces=rng.normal(size=(n_frames, 4, 3)))


def test_a_multi_level_file_is_read_at_the_level_named(work, tmp_path, capsys) -> None:
    write_rmd17(tmp_path / "two.npz")
    base = {"model": str(work / "model.pt"), "data": {"train": [str(tmp_path / "two.npz")],
                                                      "test": [str(tmp_path / "two.npz")]}}
    with pytest.raises(ConfigError, match=r"two.npz: label sets \['pbe_def2svp', 'md17_pbe_ts'\]; set "
                                          r"finetune.fidelity or the data set's fidelity"):
        read_finetune_data(load_finetune_config(base))
    data = read_finetune_data(load_finetune_config(base | {"finetune": {"fidelity": "md17_pbe_ts"}}))
    assert data.fidelity == "md17_pbe_ts" and data.train.fidelities == ["md17_pbe_ts"] == data.test.fidelities
    assert data.validation is None and data.replay is None
    # the data set's fidelity picks the label set; finetune.fidelity names the level
    picked = base | {"data": {"train": [{"path": str(tmp_path / "two.npz"), "fidelity": "pbe_def2svp"}]},
                     "finetune": {"fidelity": "mine"}}
    data = read_finetune_data(load_finetune_config(picked))
    assert data.fidelity == "mine" and data.train.fidelities == ["mine"] and len(data.train) == 6
    # read once each: one file of "default" labels takes its stem as the level; a replay file too
    one = {"model": "m.pt", "data": {"train": [str(work / "new.extxyz")], "replay": [str(work / "lj.extxyz")]}}
    data = read_finetune_data(load_finetune_config(one))
    assert data.fidelity == "new" and data.replay.fidelities == ["lj"]
    cfg = write(tmp_path / "ft.yaml", base | {"output": {"dir": str(tmp_path / "run")}})
    assert main(["finetune", str(cfg)]) == 2
    assert "set finetune.fidelity or the data set's fidelity" in capsys.readouterr().err


def test_config_finetune_prints_a_loadable_file(capsys) -> None:
    assert main(["config", "--finetune"]) == 0
    text = capsys.readouterr().out
    for key in ("replay_share", "warmup_steps", "head_init", "replay:", "merge_tolerance"):
        assert key in text
    d = yaml.safe_load(text)
    cfg = load_finetune_config(d | {"model": "m.pt"})
    assert cfg.finetune.steps == d["finetune"]["steps"] == 1500 and cfg.output.dir == "runs/finetune"
    assert main(["config"]) == 0
    assert "replay_share" not in capsys.readouterr().out
