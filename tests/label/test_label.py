"""Labelling with real engines (PySCF, tblite) into the resumable store, on water."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from ase.units import Bohr, Hartree

from polyfid.data.frame import Frame
from polyfid.label import LabelStore, LevelError, compute, label_frames, parse_level, structure_key


def water(shift: float = 0.0) -> Frame:
    a = molecule("H2O")
    pos = a.positions.copy()
    pos[1, 0] += shift
    return Frame(a.numbers, pos, source=f"water{shift}")


def test_levels_parse_and_reject() -> None:
    assert parse_level("GFN2-xTB").engine == "tblite"
    lv = parse_level("MP2/cc-pVDZ")
    assert (lv.engine, lv.method, lv.basis, lv.kind) == ("pyscf", "mp2", "cc-pvdz", "mp2")
    assert parse_level("pbe/def2-svp").kind == "dft"
    assert not parse_level("ccsd(t)/cc-pvdz").has_forces
    with pytest.raises(LevelError, match="METHOD/BASIS"):
        parse_level("mp2")
    with pytest.raises(LevelError, match="nor a functional"):
        parse_level("notafunctional/sto-3g")
    with pytest.raises(LevelError, match="no analytic gradients"):
        compute("ccsd(t)/sto-3g", [8, 1, 1], water().positions, forces=True)


def test_store_agrees_with_direct_pyscf_and_tblite(tmp_path) -> None:
    from pyscf import gto, scf

    fr = water()
    store = tmp_path / "labels.sqlite"
    r1 = label_frames([fr], "mp2/sto-3g", store, forces=True, progress=False)
    r2 = label_frames([fr], "gfn2-xtb", store, forces=True, progress=False)
    assert (r1.computed, r2.computed) == (1, 1)
    mol = gto.M(atom=[(int(z), tuple(p)) for z, p in zip(fr.numbers, fr.positions)], basis="sto-3g",
                unit="Angstrom", verbose=0)
    mf = scf.RHF(mol).run()
    mp = mf.MP2().run()
    grad = mp.nuc_grad_method().kernel()
    with LabelStore(store) as st:
        e, f = st.get(fr, "mp2/sto-3g")
        assert abs(e / Hartree - mp.e_tot) < 1e-6
        np.testing.assert_allclose(-f / (Hartree / Bohr), grad, atol=1e-6)
        from tblite.interface import Calculator

        res = Calculator("GFN2-xTB", fr.numbers, fr.positions / Bohr).singlepoint()
        e_x, f_x = st.get(fr, "gfn2-xtb")
        assert abs(e_x / Hartree - res.get("energy")) < 1e-6
        np.testing.assert_allclose(-f_x / (Hartree / Bohr), res.get("gradient"), atol=1e-6)
        ds = st.dataset()
    # the store reads back as one frame with two label sets
    assert len(ds) == 1 and set(ds.fidelities) == {"mp2/sto-3g", "gfn2-xtb"}
    np.testing.assert_allclose(ds[0].positions, fr.positions)


def test_nothing_is_recomputed_and_failures_are_recorded(tmp_path) -> None:
    store = tmp_path / "s.sqlite"
    frames = [water(0.0), water(0.1)]
    bad = Frame([8, 1, 1], np.array([[0.0, 0, 0], [0.0, 0, 0.1], [0.9, 0, 0]]), source="overlap")
    r = label_frames(frames + [bad], "hf/sto-3g", store, progress=False)
    assert r.computed == 3 and len(r.failed) == 1 and "overlap" in r.failed[0][1]
    again = label_frames(frames + [bad], "hf/sto-3g", store, progress=False)
    assert again.computed == 0 and again.cached == 3 and len(again.failed) == 1
    # asking for forces later computes them once
    with_f = label_frames(frames, "hf/sto-3g", store, forces=True, progress=False)
    assert with_f.computed == 2
    with LabelStore(store) as st:
        assert st.counts()["hf/sto-3g"] == {"ok": 2, "failed": 1}
        assert len(st.dataset()) == 2  # failures never enter a data set


def test_a_failed_retry_keeps_the_finished_energy(tmp_path) -> None:
    fr = water()
    with LabelStore(tmp_path / "s.sqlite") as st:
        st.put(fr, "hf/sto-3g", -2000.0)
        st.put(fr, "hf/sto-3g", None, reason="forces: SCF did not converge")
        assert st.get(fr, "hf/sto-3g") == (-2000.0, None)
        # forces were tried once and failed: not retried on the next call
        assert structure_key(fr.numbers, fr.positions) in st.done("hf/sto-3g", forces=True)


def test_periodic_frames_are_refused(tmp_path) -> None:
    fr = Frame([8, 1, 1], water().positions, cell=np.eye(3) * 5, pbc=[True] * 3, source="box")
    with pytest.raises(LevelError, match="periodic frames \\(box\\)"):
        label_frames([fr], "gfn2-xtb", tmp_path / "s.sqlite", progress=False)


def test_structure_key_rounds_and_separates() -> None:
    fr = water()
    k = structure_key(fr.numbers, fr.positions)
    assert structure_key(fr.numbers, fr.positions + 1e-10) == k
    assert structure_key(fr.numbers, fr.positions + 1e-6) != k
    assert structure_key(fr.numbers, fr.positions, charge=1, multiplicity=2) != k
