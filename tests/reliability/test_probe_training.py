"""Cases a hostile-input probe found after the reliability work: each a silent wrong result or a
traceback before, a clear error or a right answer now."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, toy_dataset, toy_molecules

from polyfid.api import predict
from polyfid.calculators.ase import PolyfidCalculator
from polyfid.cli.main import main
from polyfid.models import build_potential, save_model
from polyfid.train.config import ConfigError, load_config
from polyfid.train.strategies import fit_strategy


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0}
    path = tmp_path_factory.mktemp("probe") / "model.pt"
    save_model(path, build_potential(cfg, [1, 6, 8], ["lj"]), cfg)
    return path


def test_resume_with_data_of_other_elements_is_refused(tmp_path, toy_xyz, capsys) -> None:
    """The checkpoint's weights stood for H, C, O; resumed on H, C, S data they would have been
    reused for sulfur without a word (the shapes match)."""
    run = tmp_path / "run"
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump(tiny_config(toy_xyz, run, max_steps=4)))
    assert main(["train", str(first)]) == 0
    sulfur = tmp_path / "s.extxyz"
    images = ase.io.read(toy_xyz, ":")
    for a in images:
        a.numbers[a.numbers == 8] = 16
    ase.io.write(sulfur, images, format="extxyz")
    second = tmp_path / "b.yaml"
    second.write_text(yaml.safe_dump(tiny_config(sulfur, run, max_steps=8)))
    capsys.readouterr()
    assert main(["train", str(second), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt was written for species [1, 6, 8]" in err and "[1, 6, 16]" in err


def test_fidelity_weights_of_a_level_not_in_the_data_are_refused(tmp_path) -> None:
    cfg = load_config({"training": {"epochs": 1, "fidelity_weights": {"mp2": {"energy": 10.0}}},
                       "model": {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "cutoff": 3.0},
                       "output": {"dir": str(tmp_path), "progress": False, "tensorboard": False, "plots": False}})
    with pytest.raises(ConfigError, match=r"training.fidelity_weights names fidelities \['mp2'\] absent"):
        fit_strategy(cfg, toy_dataset(8), None, tmp_path)


def test_a_binary_file_given_as_the_configuration(tmp_path, capsys) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(bytes(range(256)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a text file" in err and "Traceback" not in err


def test_predict_takes_one_structure(model_file) -> None:
    mol = toy_molecules(1)[0]
    one, listed = predict(model_file, mol), predict(model_file, [mol])
    assert len(one) == 1 and one[0]["energy"] == listed[0]["energy"]


def test_predict_refuses_to_overwrite_its_input(model_file, toy_xyz, capsys) -> None:
    before = toy_xyz.read_bytes()
    assert main(["predict", str(model_file), str(toy_xyz), "-o", str(toy_xyz)]) == 2
    assert "that is the input file" in capsys.readouterr().err
    assert toy_xyz.read_bytes() == before


@pytest.mark.parametrize("shift", [1e4, 1e7])
def test_a_molecule_far_from_the_origin_gets_the_same_forces(model_file, shift) -> None:
    """float32 positions at 1e7 Å are 1 Å apart: the molecule is moved near the origin first
    (a translation changes neither energy nor forces)."""
    mol = toy_molecules(1)[0]
    far = mol.copy()
    far.translate([shift, -shift, 0.5 * shift])
    a, b = predict(model_file, [mol, far])
    assert np.isclose(a["energy"], b["energy"], rtol=1e-5)
    np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-5)
    for atoms in (mol, far):
        atoms.calc = PolyfidCalculator(model_file)
    np.testing.assert_allclose(mol.get_forces(), far.get_forces(), atol=1e-5)


def test_a_crystal_far_from_the_origin_gets_the_same_forces(model_file) -> None:
    from ase.build import bulk

    crystal = bulk("C", "diamond", a=3.57, cubic=True)
    crystal.rattle(0.05, seed=1)
    far = crystal.copy()
    far.translate(1e7 * np.array([1.0, 1.0, 1.0]))
    a, b = predict(model_file, [crystal, far])
    np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-4)
