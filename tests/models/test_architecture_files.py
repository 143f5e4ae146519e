"""Every architecture trains through the ordinary path and round-trips through a model file."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from polyfid.api import predict
from polyfid.models import ARCHITECTURES, load_model
from polyfid.train.run import run_training

OPTIONS = {"hipnn": {}, "hipnn_ts": {"l_max": 1}, "hiphop": {"l_max": 2, "max_tensors": 3}}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_train_save_load_predict(arch, tmp_path, toy_xyz) -> None:
    cfg = tiny_config(toy_xyz, tmp_path / arch, epochs=2)
    cfg["model"] |= {"architecture": arch, **OPTIONS[arch]}
    result = run_training(cfg)
    model = load_model(tmp_path / arch / "model.pt", dtype=torch.float64)
    assert type(model.representation) is ARCHITECTURES[arch]
    for k, v in OPTIONS[arch].items():
        assert getattr(model.representation, k) == v
    a = predict(model, toy_xyz)[0]
    b = predict(result.model.double(), toy_xyz)[0]
    assert a["energy"] == pytest.approx(b["energy"], rel=1e-9)
    torch.testing.assert_close(torch.as_tensor(a["forces"]), torch.as_tensor(b["forces"]))


def test_options_of_another_architecture_are_refused() -> None:
    from polyfid.models import build_potential

    with pytest.raises(ValueError, match="architecture 'hipnn'.*l_max"):
        build_potential({"architecture": "hipnn", "l_max": 2}, [1, 6], ["a"])
