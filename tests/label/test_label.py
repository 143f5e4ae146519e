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


def water_frames(n: int) -> list[Frame]:
    rng = np.random.default_rng(0)
    base = molecule("H2O").positions
    return [Frame([8, 1, 1], base + rng.normal(scale=0.04, size=base.shape), source=f"w{i}") for i in range(n)]


def test_open_shell_structures_use_their_multiplicity(tmp_path) -> None:
    from pyscf import gto, scf

    oh = Frame([8, 1], np.array([[0.0, 0, 0], [0.0, 0, 0.97]]), source="OH", multiplicity=2)
    label_frames([oh], "hf/sto-3g", tmp_path / "s.sqlite", progress=False)
    mol = gto.M(atom="O 0 0 0; H 0 0 0.97", basis="sto-3g", spin=1, verbose=0)
    with LabelStore(tmp_path / "s.sqlite") as st:
        e, _ = st.get(oh, "hf/sto-3g")
    assert abs(e / Hartree - scf.UHF(mol).run().e_tot) < 1e-6


def test_cost_estimate_times_a_sample_and_keeps_its_results(tmp_path) -> None:
    from polyfid.label import estimate_cost

    frames = water_frames(5)
    store = tmp_path / "s.sqlite"
    est = estimate_cost(frames, "hf/sto-3g", store, sample=2, workers=2)
    assert (est.todo, est.cached, est.measured) == (3, 2, 2)
    assert est.seconds_per_structure > 0 and est.seconds == pytest.approx(3 * est.seconds_per_structure / 2)
    assert "3 structures to compute" in str(est)
    rep = label_frames(frames, "hf/sto-3g", store, progress=False)
    assert (rep.computed, rep.cached) == (3, 2)


def test_store_reads_back_through_the_data_layer(tmp_path) -> None:
    from polyfid.data.readers import read
    from polyfid.errors import DataError

    frames = water_frames(3)
    store = tmp_path / "labels.sqlite"
    label_frames(frames, "gfn2-xtb", store, forces=True, progress=False)
    label_frames(frames[:1], "hf/sto-3g", store, progress=False)
    ds = read(store)
    assert len(ds) == 3 and set(ds.fidelities) == {"gfn2-xtb", "hf_sto-3g"}
    assert ds.count("hf_sto-3g", "energy") == 1 and ds.count("gfn2-xtb", "forces") == 3
    only = read(store, fidelity="hf/sto-3g")
    assert len(only) == 1 and only.fidelities == ["hf_sto-3g"]
    with pytest.raises(DataError, match="not in the label store"):
        read(store, fidelity="mp2/sto-3g")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database\n" * 100)
    with pytest.raises(DataError, match="junk.sqlite: not a polyfid label store"):
        read(junk)


def test_a_killed_labelling_run_resumes_without_recomputing(tmp_path) -> None:
    """SIGKILL to a real `polyfid label` process (and its workers) mid-run; the rerun computes
    only the rest, every finished row is untouched, the SQLite file is intact."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    import ase.io
    from ase import Atoms

    frames = water_frames(24)
    xyz = tmp_path / "w.extxyz"
    ase.io.write(xyz, [Atoms(numbers=f.numbers, positions=f.positions) for f in frames], format="extxyz")
    store = tmp_path / "s.sqlite"
    cmd = [sys.executable, "-m", "polyfid.cli.main", "label", str(xyz), "--level", "mp2/cc-pvdz",
           "--store", str(store), "--workers", "1", "--sample", "0", "--no-progress"]

    def rows() -> dict[str, float]:
        if not store.exists():
            return {}
        con = sqlite3.connect(store, timeout=30)
        try:
            return dict(con.execute("SELECT key, created FROM labels WHERE status = 'ok'"))
        except sqlite3.OperationalError:  # table not created yet
            return {}
        finally:
            con.close()

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while len(rows()) < 3:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() - t0 < 120, "no results after 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows()
    assert 3 <= len(before) < 24, f"{len(before)} finished: the kill was not mid-run"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{24 - len(before)} computed, {len(before)} already in the store, 0 failed" in done.stdout
    after = rows()
    assert len(after) == 24
    assert all(after[k] == t for k, t in before.items())  # finished rows were not recomputed
    con = sqlite3.connect(store)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with LabelStore(store) as st:
        e, _ = st.get(frames[5], "mp2/cc-pvdz")
    assert abs(e - compute("mp2/cc-pvdz", frames[5].numbers, frames[5].positions)[0]) < 1e-6 * Hartree


def test_local_dask_cluster_labels_across_two_workers(tmp_path) -> None:
    pytest.importorskip("dask.distributed", reason="dask[distributed] is not installed (pip install polyfid[cluster])")
    from polyfid.label.cluster import dask_executor

    frames = water_frames(8)
    with dask_executor("local", workers=2) as ex:
        rep = label_frames(frames, "mp2/cc-pvdz", tmp_path / "s.sqlite", executor=ex, progress=False)
    assert rep.computed == 8 and not rep.failed
    assert len(rep.workers) == 2 and sum(rep.workers.values()) == 8
    with LabelStore(tmp_path / "s.sqlite") as st:
        e, _ = st.get(frames[3], "mp2/cc-pvdz")
    assert abs(e - compute("mp2/cc-pvdz", frames[3].numbers, frames[3].positions)[0]) < 1e-6 * Hartree
