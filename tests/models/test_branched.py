"""The branched multi-head (each fidelity its own last blocks) beyond the shared contract test:
torch.compile traces it (and a plain HIP-NN) without graph breaks, and fine-tuning a branched
model keeps the old levels exact with only the heads trainable, while an anchor reaches every
level's own blocks."""

from __future__ import annotations

import numpy as np
import torch
from conftest import toy_dataset, toy_molecules

from polyfid.api import predict
from polyfid.data.batch import single_frame_batch
from polyfid.models import BranchedPotential, Potential, build_potential
from polyfid.train.config import FinetuneOptions
from polyfid.train.finetune import anchor_penalty, finetune

SMALL = {"architecture": "hipnn", "n_features": 8, "n_sensitivities": 4, "cutoff": 3.0, "n_interactions": 2,
         "n_atom_layers": 1}


def branched(seed: int = 0) -> BranchedPotential:
    torch.manual_seed(seed)
    m = build_potential(SMALL | {"fidelity_blocks": 1}, [1, 6, 8], ["lo", "hi"])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_compiling_traces_one_graph_without_breaks() -> None:
    rng = np.random.default_rng(0)
    batch = single_frame_batch(rng.choice([1, 6, 8], 5), rng.uniform(0, 2.5, (5, 3)), 3.0)
    for model in (build_potential(SMALL, [1, 6, 8], ["lo"]), branched()):
        model.eval()
        explained = torch._dynamo.explain(model._forward_explicit)(batch, True, False, False, (0,),
                                                                   model._species(batch.numbers))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), type(model).__name__


def test_finetuning_the_heads_of_a_branched_model_keeps_the_old_levels(tmp_path) -> None:
    model = branched()
    ds = toy_dataset(12, seed=2, fidelity="new")
    mols = toy_molecules(2, seed=7)
    before = {f: predict(model, mols, fidelity=f) for f in ("lo", "hi")}
    res = finetune(model, ds, tmp_path / "ft", FinetuneOptions(trainable="head", warmup_steps=0, steps=8,
                                                             training={"batch_size": 4}))
    assert res.model.fidelities == ["lo", "hi", "new"] and isinstance(res.model, BranchedPotential)
    for f in ("lo", "hi"):
        for a, b in zip(predict(res.model, mols, fidelity=f), before[f]):
            np.testing.assert_allclose(a["forces"], b["forces"], rtol=1e-5, atol=1e-6)
            assert abs(a["energy"] - b["energy"]) < 1e-4


def test_the_anchor_reaches_every_levels_own_blocks() -> None:
    model = branched()
    penalty = anchor_penalty(model, 1.0)
    own = model.tails[0][0][0].base.weight  # the second level's own interaction layer
    with torch.no_grad():
        assert penalty().item() == 0.0
        own.add_(0.1)
        assert penalty().item() > 0.0
        own.sub_(0.1)  # back, to float rounding
        model.readout.weight.add_(1.0)  # the heads are not anchored
        assert penalty().item() < 1e-10


def test_a_single_level_model_with_fidelity_blocks_is_a_plain_potential() -> None:
    assert type(build_potential(SMALL | {"fidelity_blocks": 1}, [1, 6, 8], ["only"])) is Potential
