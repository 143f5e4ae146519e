"""The multi-fidelity demo end to end at toy scale (real xTB MD, real PySCF labels, real training)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tblite.ase", reason="tblite (GFN2-xTB) is not installed: the demo needs it")

from polyfid.demo.multifidelity import MultiFidelityDemoSettings, label_sets, run_demo, sample_sets  # noqa: E402


def test_multifidelity_demo_runs_end_to_end_and_resumes(tmp_path, capsys) -> None:
    s = MultiFidelityDemoSettings(
        temperatures_K=[300.0, 800.0], pool_per_temperature=6, heldout_per_temperature=2, stride=3,
        equilibration=5, n_high=5, high_level="hf/sto-3g", low_budget_s=3.0, finetune_budget_s=2.0,
        model={"n_features": 8, "n_sensitivities": 4, "cutoff": 4.0, "n_interactions": 1, "n_atom_layers": 1},
    )
    summary = run_demo(tmp_path, settings=s)
    work = tmp_path / "default"
    assert json.loads((work / "summary.json").read_text()) == json.loads(json.dumps(summary))  # the file holds it all
    assert set(summary["test"]) == {"multi_fidelity", "energies_only", "xtb_network", "gfn2_xtb"}
    assert summary["labels"]["high_energies"]["n"] == 5 and summary["labels"]["heldout_high"]["n"] == 4
    for name in ("multi_fidelity", "energies_only"):
        t = summary["test"][name]
        assert t["n_forces"] == 4 and t["force_mae_meV_A"] > 0 and t["energy_mae_meV"] > 0
    assert summary["training"]["multi_fidelity"]["stages"].keys() == {"base", "finetune"}
    for p in summary["plots"]:
        assert (work / p.split("/")[-1]).stat().st_size > 1000
    text = capsys.readouterr().out
    assert "multi-fidelity (xTB forces + MP2 energies)" in text and "GFN2-xTB itself" in text
    # a rerun reuses the sampled structures and every label
    pool, held, generated = sample_sets(s, work)
    assert not generated and len(pool) == 12 and len(held) == 4
    again = label_sets(s, pool, held, work / "labels.sqlite")
    assert all(v["computed"] == 0 for k, v in again.items() if k != "high_indices")
