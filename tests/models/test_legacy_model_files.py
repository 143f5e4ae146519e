"""Model files written by an earlier polyfid (commit 9625e33, before the refactor of polyfid/train
and polyfid/models) load with the current code and predict what they predicted then.

tests/fixtures/legacy_models holds one tiny model of every kind (single hipnn, hipnn_ts, hiphop;
multi-head, embedding, delta, transfer; Reptile and a fine-tune of it), the structures they were
evaluated on and expected.json: what that code predicted (float64, every fidelity), made by
make_fixtures.py there (see its README.md). Never regenerate the fixtures with newer code: the
point is that the old files keep working.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from polyfid import PolyfidCalculator, load_model, predict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_models"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
MODELS = sorted(EXPECTED["models"])
RTOL, ATOL = 1e-10, 1e-9  # float64: eV and eV/Å (eV/Å³ for stress)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def structures() -> list:
    return ase.io.read(FIXTURES / EXPECTED["structures"], index=":")


def close(actual, expected, what: str) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=RTOL, atol=ATOL, err_msg=what)


def test_the_fixtures_are_the_files_the_old_code_wrote() -> None:
    assert EXPECTED["polyfid_commit"].startswith("9625e33")
    assert sha256(FIXTURES / EXPECTED["structures"]) == EXPECTED["structures_sha256"]
    assert sorted(p.stem for p in FIXTURES.glob("*.pt")) == MODELS
    for e in EXPECTED["models"].values():
        assert sha256(FIXTURES / e["file"]) == e["sha256"], f"{e['file']} changed: restore it from git"


@pytest.mark.parametrize("name", MODELS)
def test_metadata_reads_back(name: str) -> None:
    e = EXPECTED["models"][name]
    path = FIXTURES / e["file"]
    model = load_model(path, dtype=torch.float64)
    assert list(model.fidelities) == e["fidelities"]
    assert list(model.species) == e["species"]
    assert model.cutoff == e["cutoff"]
    assert model.fidelities[model.head_index(None)] == e["default_fidelity"]
    assert dict(model.geometry_limits) == e["geometry_limits"]
    # the file is a plain dict of tensors and primitives (the documented format)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "polyfid-model" and raw["version"] == 1 and raw.get("kind") == e["kind"]
    assert raw["metadata"].get("strategy") == e["strategy"]
    assert (raw["target"] if e["kind"] == "delta" else raw["metadata"].get("target")) == e["target"]
    assert raw["metadata"].get("base") == e["base"]
    assert raw["fidelities"] == e["fidelities"]


@pytest.mark.parametrize("name", MODELS)
def test_predict_gives_the_recorded_energies_and_forces(name: str, structures: list) -> None:
    e = EXPECTED["models"][name]
    model = load_model(FIXTURES / e["file"], dtype=torch.float64)
    for fid in e["fidelities"]:
        got = predict(model, structures, fidelity=fid)
        want = e["predict"][fid]
        assert len(got) == len(want)
        for k, (g, w) in enumerate(zip(got, want)):
            close(g["energy"], w["energy"], f"{name} {fid} structure {k}: energy")
            close(g["forces"], w["forces"], f"{name} {fid} structure {k}: forces")


@pytest.mark.parametrize("name", MODELS)
def test_calculator_gives_the_recorded_energies_forces_and_stress(name: str, structures: list) -> None:
    e = EXPECTED["models"][name]
    for fid in e["fidelities"]:
        calc = PolyfidCalculator(FIXTURES / e["file"], fidelity=fid, dtype="float64")
        for k, (atoms, w) in enumerate(zip(structures, e["calculator"][fid], strict=True)):
            atoms = atoms.copy()
            atoms.calc = calc
            close(atoms.get_potential_energy(), w["energy"], f"{name} {fid} structure {k}: energy")
            close(atoms.get_forces(), w["forces"], f"{name} {fid} structure {k}: forces")
            if "stress" in w:
                close(atoms.get_stress(), w["stress"], f"{name} {fid} structure {k}: stress")


@pytest.mark.parametrize("name", MODELS)
def test_default_float32_load_predicts_the_default_fidelity(name: str, structures: list) -> None:
    """A path, float32 and no fidelity named: the target level the model was trained for."""
    e = EXPECTED["models"][name]
    got = predict(FIXTURES / e["file"], structures)
    for k, (g, w) in enumerate(zip(got, e["predict"][e["default_fidelity"]], strict=True)):
        np.testing.assert_allclose(g["energy"], w["energy"], rtol=1e-5, atol=1e-4, err_msg=f"{name} {k}")
        np.testing.assert_allclose(g["forces"], w["forces"], rtol=1e-4, atol=1e-4, err_msg=f"{name} {k}")
