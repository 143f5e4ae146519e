"""`polyfid sample` -> `polyfid label` -> `polyfid data summary`, as a user runs them."""

from __future__ import annotations

import json

import ase.io
import pytest

from polyfid.cli.main import main

pytest.importorskip("tblite.ase", reason="tblite (GFN-xTB) is not installed")


def test_sample_label_and_read_back(tmp_path, capsys) -> None:
    out = tmp_path / "s.extxyz"
    assert main(["sample", "CCO", "-o", str(out), "--temperatures", "300", "500", "--md-frames", "3",
                 "--stride", "2", "--equilibration", "2", "--select", "2", "--seed", "1"]) == 0
    frames = ase.io.read(out, ":")
    assert len(frames) == 6 and all(a.get_chemical_formula() == "C2H6O" for a in frames)
    sel = ase.io.read(tmp_path / "s_selected.extxyz", ":")
    assert len(sel) == 2
    store = tmp_path / "labels.sqlite"
    capsys.readouterr()
    assert main(["label", str(out), "--level", "gfn2-xtb", "--forces", "--store", str(store), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "estimate: gfn2-xtb: 4 structures to compute (2 in the store)" in text
    assert "gfn2-xtb: 4 computed, 2 already in the store, 0 failed" in text
    assert main(["label", str(tmp_path / "s_selected.extxyz"), "--level", "HF/STO-3G", "--store", str(store),
                 "--estimate-only"]) == 0
    assert "hf/sto-3g: all 2 structures are in the store" in capsys.readouterr().out
    assert main(["data", "summary", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 6
    assert main(["label", str(out), "--level", "mp2"]) == 2
    assert "METHOD/BASIS" in capsys.readouterr().err
