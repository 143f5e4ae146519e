"""Geometry checks at the door of every neighbour list (issue 22).

Repro 1: one frame with two coincident atoms made the whole model NaN and `train` exit 0.
Repro 2: coordinates ~5e5 Å apart killed the process with SIGFPE inside vesin (exit 136) in
train, evaluate, predict and the ASE calculator. Both must end in a GeometryError (exit 2)
naming the file, frame and atoms; the crash cases run in a subprocess, where a SIGFPE shows as
a return code instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import fcc111, graphene, nanotube
from ase.neighborlist import neighbor_list
from conftest import SHARED_DATA, tiny_config, toy_dataset, toy_molecules

from polyfid.calculators.ase import PolyfidCalculator
from polyfid.cli.main import main
from polyfid.data.batch import PackedData, single_frame_batch
from polyfid.data.frame import Dataset, Frame
from polyfid.errors import DataError, GeometryError
from polyfid.models import build_potential, save_model
from polyfid.neighbors import neighbor_pairs
from polyfid.neighbors.checks import check_geometry, model_geometry

ETHANOL = SHARED_DATA / "rmd17" / "rmd17_ethanol_train_01.npz"
WORKTREE = Path(__file__).resolve().parents[2]

# ---- non-physical geometries: (numbers, positions, cell, pbc, words the message must hold) ----
_WATER = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
_Z = np.array([8, 1, 1])
_CUBE = np.eye(3) * 10.0
_PBC = np.ones(3, bool)


def _moved(k: int, xyz) -> np.ndarray:
    p = _WATER.copy()
    p[k] = xyz
    return p


BAD = {
    "coincident": (_Z, _moved(1, _WATER[0]), None, None, ["atom 0 (O) and atom 1 (H)", "0 Å apart", "min_distance"]),
    "0.05 A apart": (_Z, _moved(2, [0.96, 0.05, 0.0]), None, None, ["atom 1 (H) and atom 2 (H)", "0.05 Å"]),
    "NaN position": (_Z, _moved(2, [np.nan, 0, 0]), None, None, ["atom 2 (H)", "non-finite", "nan"]),
    "inf position": (_Z, _moved(1, [0, np.inf, 0]), None, None, ["atom 1 (H)", "non-finite", "inf"]),
    "5e5 extent": (_Z, _moved(2, [5e5, 0, 0]), None, None, ["span 5e+05 Å along x", "max_extent", "atom 2 (H)"]),
    "1e4 extent": (_Z, _moved(1, [0, 0, -1e4]), None, None, ["along z", "max_extent = 1000"]),
    "singular cell": (_Z, _WATER, np.diag([10.0, 10.0, 0.0]), _PBC, ["singular", "volume 0"]),
    "zero periodic vector": (_Z, _WATER, np.diag([10.0, 0.0, 0.0]), np.array([False, True, False]),
                             ["singular", "length 0"]),
    "NaN cell": (_Z, _WATER, np.full((3, 3), np.nan), _PBC, ["cell contains NaN"]),
    "flat cell, two periodic axes": (_Z, _WATER, np.array([[5.0, 0, 0], [10.0, 0, 0], [0, 0, 3.0]]),
                                     np.array([True, True, False]), ["singular", "area 0"]),
    "slab, atom far off the open axis": (_Z, _moved(2, [0, 0, 5e5]), _CUBE, np.array([True, True, False]),
                                         ["along z", "periodic directions wrapped"]),
    "image closer than min_distance": (np.array([1]), np.zeros((1, 3)), np.eye(3) * 0.08, _PBC,
                                       ["atom 0 (H) is 0.08 Å from its own periodic image"]),
}

GOOD = {
    "just above min_distance": (_Z, _moved(1, [0.1001, 0, 0]), None, None),
    "just under max_extent": (_Z, _moved(2, [999.9, 0, 0]), None, None),
    "periodic, atom 5e5 Å out along a periodic axis": (_Z, _moved(2, [5e5 + 0.3, 5.0, 5.0]), _CUBE, _PBC),
    "slab, far along a periodic axis": (_Z, _moved(2, [-3e5, 1.0, 1.0]), _CUBE, np.array([True, True, False])),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_refuses(case):
    z, pos, cell, pbc, words = BAD[case]
    with pytest.raises(GeometryError) as err:
        check_geometry(z, pos, cell, pbc, where="bad.xyz:7")
    msg = str(err.value)
    assert msg.startswith("bad.xyz:7: ")
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("case", list(GOOD))
def test_check_passes(case):
    z, pos, cell, pbc = GOOD[case]
    check_geometry(z, pos, cell, pbc, where="good")


def test_limits_are_options():
    z, pos, *_ = BAD["1e4 extent"]
    check_geometry(z, pos, max_extent=2e4)
    with pytest.raises(GeometryError, match="the widest box the neighbour list handles"):
        check_geometry(z, _moved(1, [0, 0, -1e5]), max_extent=1e6)  # vesin's limit, whatever the option
    check_geometry(*BAD["0.05 A apart"][:2], min_distance=0.01)
    assert issubclass(GeometryError, DataError) and issubclass(GeometryError, ValueError)


def test_far_periodic_atoms_give_the_same_pairs():
    """Atoms far outside their cell: the list is built on wrapped positions, the shifts
    refer to the positions as given."""
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 10, (20, 3))
    far = pos + rng.integers(-50000, 50000, (20, 3)) @ _CUBE
    ref = [neighbor_pairs(p, 4.0, _CUBE, _PBC) for p in (pos, far)]
    d = [np.sort(np.linalg.norm(p[j] - p[i] + s @ _CUBE, axis=1)) for p, (i, j, s) in zip((pos, far), ref)]
    np.testing.assert_allclose(d[0], d[1], atol=1e-6)


PARTLY_PERIODIC = {  # ASE leaves the open directions' cell rows zero
    "graphene": lambda: graphene(vacuum=None),
    "nanotube": lambda: nanotube(3, 3, length=2),
    "slab without vacuum": lambda: fcc111("Al", (2, 2, 3)),
    "slab, far out along a periodic axis": lambda: _shifted(fcc111("Al", (2, 2, 3)), [3e5, 0.0, 0.0]),
}


def _shifted(atoms: Atoms, by: list[float]) -> Atoms:
    atoms.positions[0] += by
    return atoms


@pytest.mark.parametrize("case", list(PARTLY_PERIODIC))
def test_partly_periodic_structures_pass_with_ase_pairs(case):
    """One or two periodic directions, the other cell rows zero: accepted, and the pairs are
    those of ASE's neighbour list."""
    atoms = PARTLY_PERIODIC[case]()
    assert not atoms.pbc.all() and np.linalg.det(atoms.cell.array) == 0
    i, j, s = neighbor_pairs(atoms.positions, 3.0, atoms.cell.array, atoms.pbc, numbers=atoms.numbers)
    d = np.linalg.norm(atoms.positions[j] - atoms.positions[i] + s @ atoms.cell.array, axis=1)
    ai, aj, ad = neighbor_list("ijd", atoms, 3.0)
    assert len(i) == len(ai)
    np.testing.assert_allclose(np.sort(d), np.sort(ad), atol=1e-6)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained tiny model of H, C, O (its weights do not matter here)."""
    torch.manual_seed(0)
    cfg = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0}
    model = build_potential(cfg, [1, 6, 8], ["lj"])
    path = tmp_path_factory.mktemp("geom") / "model.pt"
    save_model(path, model, cfg, {"min_distance": 0.1, "max_extent": 1000.0})
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_calculator_refuses(case, model_file):
    z, pos, cell, pbc, words = BAD[case]
    atoms = Atoms(numbers=z, positions=np.nan_to_num(pos), cell=None if cell is None else np.nan_to_num(cell),
                  pbc=False if pbc is None else pbc)
    atoms.positions[:] = pos  # ASE cleans nothing: NaN and inf reach the calculator as they are
    if cell is not None:
        atoms.cell.array[:] = cell
    atoms.calc = PolyfidCalculator(model_file)
    with pytest.raises(GeometryError) as err:
        atoms.get_potential_energy()
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize("case", list(GOOD))
def test_calculator_passes(case, model_file):
    z, pos, cell, pbc = GOOD[case]
    atoms = Atoms(numbers=z, positions=pos, cell=cell, pbc=False if pbc is None else pbc)
    atoms.calc = PolyfidCalculator(model_file, dtype="float64")
    assert np.isfinite(atoms.get_potential_energy())
    assert np.all(np.isfinite(atoms.get_forces()))


def test_model_file_carries_its_limits(tmp_path):
    cfg = {"n_features": 8, "n_sensitivities": 4, "n_interactions": 1, "n_atom_layers": 1, "cutoff": 3.0}
    save_model(tmp_path / "m.pt", build_potential(cfg, [1, 8], ["lj"]), cfg, {"min_distance": 0.01})
    calc = PolyfidCalculator(tmp_path / "m.pt")
    assert model_geometry(calc.model) == {"min_distance": 0.01, "max_extent": 1000.0}
    atoms = Atoms(numbers=_Z, positions=_moved(2, [0.96, 0.05, 0.0]))  # 0.05 Å: allowed by this model
    atoms.calc = calc
    atoms.get_potential_energy()


def test_packed_data_and_single_frame_batch_name_the_frame():
    ds = toy_dataset(6)
    ds.frames[4].positions[3] = ds.frames[4].positions[1]
    with pytest.raises(GeometryError, match=r"^toy:4: atom 1 \(\w+\) and atom 3 \(\w+\) are 0 Å apart"):
        PackedData(ds, 3.0, ["lj"])
    anon = Dataset([Frame(f.numbers, f.positions, f.labels) for f in ds], name="set")
    with pytest.raises(GeometryError, match="^set: frame 4: "):
        PackedData(anon, 3.0, ["lj"])
    f = ds.frames[4]
    with pytest.raises(GeometryError, match="^here: atom 1"):
        single_frame_batch(f.numbers, f.positions, 3.0, where="here")
    ds.frames[2].positions[0, 0] += 3e4
    with pytest.raises(GeometryError, match="^toy:2: the atoms span"):
        PackedData(ds, 3.0, ["lj"])


def _ethanol_npz(path: Path, n: int = 60) -> Path:
    """The first `n` frames of rMD17 ethanol with atom 1 put on atom 0 in frame 0."""
    if not ETHANOL.exists():
        pytest.skip(f"rMD17 ethanol not found at {ETHANOL}")
    d = dict(np.load(ETHANOL))
    keep = {k: v[:n] if v.ndim and v.shape[0] == 1000 else v for k, v in d.items()}
    keep["coords"] = keep["coords"].copy()
    keep["coords"][0, 1] = keep["coords"][0, 0]
    np.savez(path, **keep)
    return path


def test_repro_1_coincident_atoms_refused_by_train_and_summary(tmp_path, capsys):
    data = _ethanol_npz(tmp_path / "ethanol60.npz")
    cfg = tiny_config(data, tmp_path / "run")
    cfg["data"]["train"][0]["fidelity"] = "pbe_def2svp"
    cfg["model"]["cutoff"] = 5.0
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:0: atom 0 (C) and atom 1 (C) are 0 Å apart" in err, err
    assert not (tmp_path / "run" / "model.pt").exists()
    assert main(["data", "summary", str(data)]) == 2
    assert "ethanol60.npz:0: atom 0 (C) and atom 1 (C)" in capsys.readouterr().err


_FAR_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, ase.io
    from ase import Atoms
    from polyfid.cli.main import main
    what, work = sys.argv[1], sys.argv[2]
    if what == "calculator":
        from polyfid.calculators.ase import PolyfidCalculator
        from polyfid.errors import GeometryError
        a = ase.io.read(work + "/far.extxyz", index=3)
        a.calc = PolyfidCalculator(work + "/model.pt")
        try:
            a.get_potential_energy()
        except GeometryError as e:
            print("polyfid calculator: error:", e, file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    args = {"train": ["train", work + "/far.yaml"],
            "evaluate": ["evaluate", work + "/model.pt", work + "/far.extxyz"],
            "predict": ["predict", work + "/model.pt", work + "/far.extxyz", "-o", work + "/pred.extxyz"],
            "summary": ["data", "summary", work + "/far.extxyz"]}[what]
    sys.exit(main(args))
""")


@pytest.fixture(scope="module")
def far_work(tmp_path_factory, model_file) -> Path:
    """Files for repro 2: toy molecules, the fourth with an atom at x = 5e5 Å, a config, a model."""
    work = tmp_path_factory.mktemp("far")
    images = toy_molecules(12, seed=3)
    images[3].positions[2, 0] = 5e5
    ase.io.write(work / "far.extxyz", images, format="extxyz")
    (work / "far.yaml").write_text(yaml.safe_dump(tiny_config(work / "far.extxyz", work / "run")))
    (work / "model.pt").write_bytes(model_file.read_bytes())
    (work / "script.py").write_text(_FAR_SCRIPT)
    return work


@pytest.mark.parametrize("what", ["train", "evaluate", "predict", "calculator", "summary"])
def test_repro_2_far_atoms_refused_not_sigfpe(what, far_work):
    proc = subprocess.run([sys.executable, str(far_work / "script.py"), what, str(far_work)], capture_output=True,
                          text=True, timeout=300, cwd=WORKTREE, env={"PYTHONPATH": str(WORKTREE), "PATH": "/usr/bin"})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # never 136 / -8 (SIGFPE)
    where = {"calculator": "the structure"}.get(what, "far.extxyz:3")  # predict reads through polyfid.read
    assert where in proc.stderr and "span 5e+05 Å along x" in proc.stderr, proc.stderr[-2000:]
    assert not (far_work / "run" / "model.pt").exists()
