"""The multi-fidelity demo end to end at toy scale (real xTB MD, real PySCF labels, real training)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tblite.ase", reason="tblite (GFN2-xTB) is not installed: the demo needs it")

from polyfid.demo.multifidelity import (  # noqa: E402
    MultiFidelityDemoSettings,
    in_order,
    label_sets,
    run_demo,
    sample_sets,
)


def test_multifidelity_demo_runs_end_to_end_and_resumes(tmp_path, capsys) -> None:
    s = MultiFidelityDemoSettings(
        temperatures_K=[300.0, 800.0], pool_per_temperature=6, heldout_per_temperature=2, stride=3,
        equilibration=5, n_high=5, high_level="hf/sto-3g", low_steps=12, own_steps=6, batch_size=4,
        model={"n_features": 8, "n_sensitivities": 4, "cutoff": 4.0, "n_interactions": 1, "n_atom_layers": 1},
    )
    summary = run_demo(tmp_path, settings=s)
    work = tmp_path / "default"
    assert json.loads((work / "summary.json").read_text()) == json.loads(json.dumps(summary))  # the file holds it all
    assert set(summary["test"]) == {"multi_fidelity", "energies_only", "low_level_network", "low_level"}
    # forces only where the energies have another zero: no figure that means nothing
    for name in ("low_level_network", "low_level"):
        assert all(v is None for k, v in summary["test"][name].items() if k.startswith("energy"))
        assert summary["test"][name]["force_mae_meV_A"] > 0
    # step budgets: each stage ran exactly its steps (the same table on any machine)
    stages = summary["training"]["multi_fidelity"]["stages"]
    assert {k: v["steps"] for k, v in stages.items()} == {"base": 12, "train": 6}
    assert summary["training"]["energies_only"]["stages"]["train"]["steps"] == 18
    assert summary["labels"]["high_energies"]["n"] == 5 and summary["labels"]["heldout_high"]["n"] == 4
    for name in ("multi_fidelity", "energies_only"):
        t = summary["test"][name]
        assert t["n_forces"] == 4 and t["force_mae_meV_A"] > 0 and t["energy_mae_meV"] > 0
    for p in summary["plots"]:
        assert (work / p.split("/")[-1]).stat().st_size > 1000
    text = capsys.readouterr().out
    assert "multi-fidelity (GFN1-xTB forces + HF energies)" in text and "GFN1-xTB itself" in text
    assert "Krylov" not in text and (work / "demo.log").exists()  # engine messages in the log
    # a rerun reuses the sampled structures and every label
    pool, held, generated = sample_sets(s, work)
    assert not generated and len(pool) == 12 and len(held) == 4
    again = label_sets(s, pool, held, work / "labels.sqlite")
    assert all(v["computed"] == 0 for k, v in again.items() if k != "high_indices")


def test_the_training_set_follows_the_sampled_order_not_the_store_rows(tmp_path) -> None:
    """Workers finish in any order, so the store's rows come in any order; the demo's training
    and test sets follow the sampled files, so that the same seed gives the same models."""
    from conftest import toy_dataset

    from polyfid.data.frame import Dataset
    from polyfid.label import frame_key

    sampled = toy_dataset(8).frames
    rows = Dataset([sampled[i] for i in (5, 2, 7, 0, 1, 6, 3)])  # frame 4 has no labels in the store
    got = in_order(rows, sampled)
    assert [frame_key(f) for f in got] == [frame_key(sampled[i]) for i in (0, 1, 2, 3, 5, 6, 7)]
