"""The command line end to end on tiny data written here: train (in-process and through the
installed console script), evaluate (table, JSON), predict, data summary, config, and the
errors a user meets (bad configuration keys and types, unknown fidelities) with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml
from conftest import toy_molecules

import polyfid
from polyfid.cli.main import main
from polyfid.train.config import load_config


def write_config(path: Path, train: Path, test: Path, out: Path, **changes) -> Path:
    cfg = {
        "data": {"train": [{"path": str(train), "fidelity": "lj"}], "test": [{"path": str(test), "fidelity": "lj"}],
                 "val_size": 6},
        "model": {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0},
        "training": {"epochs": 3, "batch_size": 4, "num_threads": 1},
        "output": {"dir": str(out), "progress": False, "tensorboard": False, "plots": False},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Data files and one model trained in-process with `polyfid train`."""
    d = tmp_path_factory.mktemp("cli")
    ase.io.write(d / "train.extxyz", toy_molecules(30, seed=0), format="extxyz")
    ase.io.write(d / "test.extxyz", toy_molecules(10, seed=1), format="extxyz")
    cfg = write_config(d / "cfg.yaml", d / "train.extxyz", d / "test.extxyz", d / "ignored")
    assert main(["train", str(cfg), "--output-dir", str(d / "run")]) == 0
    return d


def test_train_writes_model_and_results(work, capsys):
    run = work / "run"
    assert (run / "model.pt").is_file() and (run / "checkpoint.pt").is_file()
    assert not (work / "ignored").exists()  # --output-dir overrides output.dir
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 3 and results["test"]["lj"]["n_energy"] == 10
    model = polyfid.load_model(run / "model.pt")
    assert model.fidelities == ["lj"] and model.species == [1, 6, 8]


def test_console_script_trains_and_resumes(work, tmp_path):
    exe = Path(sys.executable).with_name("polyfid")
    assert exe.is_file(), f"console script {exe} not installed (pip install -e .)"
    cfg = write_config(tmp_path / "cfg.yaml", work / "train.extxyz", work / "test.extxyz", tmp_path / "run",
                       training__epochs=2)
    proc = subprocess.run([str(exe), "train", str(cfg)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "stopped after 2 epochs (epoch limit)" in proc.stdout
    assert (tmp_path / "run" / "model.pt").is_file()
    # --resume continues from the checkpoint up to the raised epoch limit
    write_config(cfg, work / "train.extxyz", work / "test.extxyz", tmp_path / "run", training__epochs=3)
    proc = subprocess.run([str(exe), "train", str(cfg), "--resume"], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout and "stopped after 3 epochs" in proc.stdout


def test_evaluate_table_and_json(work, capsys):
    model, data = str(work / "run" / "model.pt"), str(work / "test.extxyz")
    assert main(["evaluate", model, data]) == 0
    table = capsys.readouterr().out
    header, row = table.strip().splitlines()
    assert "E MAE meV" in header and "F MAE meV/Å" in header
    assert row.split()[0] == "lj" and row.split()[1] == "10"
    assert main(["evaluate", model, data, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    direct = polyfid.evaluate(model, data)["lj"]
    assert metrics["lj"]["energy_mae_meV"] == pytest.approx(direct["energy_mae_meV"], rel=1e-9)
    # the run evaluated the same model on the same test file
    results = json.loads((work / "run" / "results.json").read_text())
    assert metrics["lj"]["force_mae_meV_A"] == pytest.approx(results["test"]["lj"]["force_mae_meV_A"], rel=1e-5)
    assert float(row.split()[2]) == pytest.approx(metrics["lj"]["energy_mae_meV"], abs=1e-3)


def test_evaluate_keeps_the_models_level_beside_another(work):
    """A file with the model's own level and a second one (rMD17: new and old MD17 labels) is
    scored against the model's level; a file with only an unknown level maps to the single head."""
    from polyfid.data.frame import Labels
    from polyfid.data.readers import read

    model = str(work / "run" / "model.pt")
    own = polyfid.evaluate(model, read(work / "test.extxyz", fidelity="lj"))["lj"]
    both = read(work / "test.extxyz", fidelity="lj")
    for f in both.frames:
        lab = f.labels["lj"]
        f.labels["old"] = Labels(energy=lab.energy + 5.0, forces=lab.forces + 0.3)
    assert polyfid.evaluate(model, both)["lj"]["energy_mae_meV"] == pytest.approx(own["energy_mae_meV"], rel=1e-9)
    only_other = read(work / "test.extxyz", fidelity="old")
    assert polyfid.evaluate(model, only_other)["lj"]["energy_mae_meV"] == pytest.approx(own["energy_mae_meV"],
                                                                                       rel=1e-9)


def test_evaluate_parity_plot(work, tmp_path, capsys):
    png = tmp_path / "parity.png"
    assert main(["evaluate", str(work / "run" / "model.pt"), str(work / "test.extxyz"), "--parity", str(png)]) == 0
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_writes_model_energies(work, tmp_path, capsys):
    model, data, out = work / "run" / "model.pt", work / "test.extxyz", tmp_path / "pred.extxyz"
    assert main(["predict", str(model), str(data), "-o", str(out)]) == 0
    assert "wrote 10 structures" in capsys.readouterr().out
    got = ase.io.read(out, index=":")
    inputs = ase.io.read(data, index=":")
    expected = polyfid.predict(model, inputs, fidelity="lj")
    assert len(got) == len(expected) == 10
    for a, b, e in zip(got, inputs, expected):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
        assert a.get_potential_energy() == pytest.approx(e["energy"], rel=1e-7, abs=1e-7)
        np.testing.assert_allclose(a.get_forces(), e["forces"], rtol=1e-6, atol=1e-6)
    labels = np.array([b.get_potential_energy() for b in inputs])
    assert not np.allclose([a.get_potential_energy() for a in got], labels)  # model values, not the labels


def test_data_summary(work, capsys):
    assert main(["data", "summary", str(work / "train.extxyz")]) == 0
    text = capsys.readouterr().out
    assert "30" in text and "default" in text
    assert main(["data", "summary", str(work / "train.extxyz"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["frames"] == 30 and set(s["elements"]) == {"H", "C", "O"}
    assert s["fidelities"]["default"]["energies"] == 30 and s["fidelities"]["default"]["forces"] == 30


def test_config_prints_loadable_defaults(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    for key in ("max_time_s", "final_energy_weight", "n_interactions", "val_fraction", "tensorboard"):
        assert f"{key}:" in text
    defaults = yaml.safe_load(text)
    cfg = load_config(defaults)  # what `polyfid config` prints is a valid configuration
    assert cfg.training.epochs == defaults["training"]["epochs"] and cfg.model.cutoff == defaults["model"]["cutoff"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"training__epoch": 5}, ["unknown key 'epoch'", "did you mean 'epochs'"]),
        ({"training__epochs": "ten"}, ["training.epochs", "expected an integer"]),
        ({"model__resnet": "yes"}, ["model.resnet", "expected true or false"]),
        ({"training__scheduler": "linear"}, ["training.scheduler", "'linear' is not one of"]),
    ],
)
def test_bad_config_exits_2_naming_the_key(work, tmp_path, capsys, change, words):
    cfg = write_config(tmp_path / "bad.yaml", work / "train.extxyz", work / "test.extxyz", tmp_path / "run", **change)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polyfid train: error:")
    for w in words:
        assert w in err
    assert not (tmp_path / "run").exists()


def test_missing_data_file_exits_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "nope.extxyz", tmp_path / "nope2.extxyz", tmp_path / "run")
    assert main(["train", str(cfg)]) == 2
    assert "nope.extxyz" in capsys.readouterr().err


def test_unknown_fidelity_exits_2(work, capsys):
    model, data = str(work / "run" / "model.pt"), str(work / "test.extxyz")
    assert main(["evaluate", model, data, "--as", "ccsdt"]) == 2
    err = capsys.readouterr().err
    assert "no fidelity 'ccsdt'" in err and "lj" in err
    assert main(["predict", model, data, "-o", str(work / "x.extxyz"), "--fidelity", "ccsdt"]) == 2
    assert "no fidelity 'ccsdt'" in capsys.readouterr().err
    assert not (work / "x.extxyz").exists()


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate"])
    assert exc.value.code == 2
    assert "usage: polyfid evaluate" in capsys.readouterr().err
