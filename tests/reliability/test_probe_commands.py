"""Probe findings: user errors of `polyfid evaluate/scan/sample/label/diagnose/invariants` that
ended in a traceback (exit 1), a wrong result or silence now end with exit 2 and one line naming
the option, file, structure or value."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from polyfid.cli.main import main
from polyfid.errors import ConfigError, LevelError, SourceError

H2_XYZ = "2\nH2\nH 0 0 0\nH 0 0 0.74\n"


def _user_error(capsys, argv: list[str], *words: str) -> str:
    """Run `polyfid argv`: exit 2 (from the command or from argparse), one line naming `words`."""
    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse refuses a value at parsing
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"polyfid {argv[0]}: error: "), err
    for w in words:
        assert w in last, (w, last)
    return last


# 1. a figure file whose suffix matplotlib cannot write

@pytest.mark.parametrize("argv, flag", [
    (["evaluate", "model.pt", "data.xyz", "--parity", "out.txt"], "--parity"),
    (["scan", "model.pt", "path.xyz", "--plot", "x.txt"], "--plot"),
])
def test_figure_suffix_refused_before_any_work(capsys, tmp_path, monkeypatch, argv, flag) -> None:
    monkeypatch.chdir(tmp_path)  # model and data do not exist: the suffix is checked first
    _user_error(capsys, argv, flag, ".txt", ".png", ".pdf")


def test_save_figure_refuses_an_unsupported_suffix(tmp_path) -> None:
    import matplotlib.pyplot as plt

    from polyfid.analysis.plots import check_figure_path, save_figure

    fig = plt.figure()
    with pytest.raises(ConfigError, match=r"out\.txt: cannot save a figure as '\.txt'; use one of .*\.png"):
        save_figure(fig, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()
    assert not plt.fignum_exists(fig.number)  # closed all the same
    for name in ("a.png", "a.PDF", "a.svg", "a"):
        assert check_figure_path(tmp_path / name, "--plot").name == name
    fig = plt.figure()
    assert save_figure(fig, tmp_path / "sub" / "b.svg").is_file()


# 2. numeric flags of `polyfid sample` and SampleSettings

@pytest.mark.parametrize("flag, value", [
    ("--temperatures", "-300"), ("--temperatures", "0"), ("--temperatures", "nan"), ("--timestep", "0"),
    ("--timestep", "-0.5"), ("--md-frames", "-1"), ("--equilibration", "-1"), ("--stride", "0"),
    ("--normal-modes", "-1"), ("--select", "0"), ("--multiplicity", "0"), ("--dedup", "-1"), ("--seed", "-1"),
])
def test_sample_numeric_flags_are_checked(capsys, tmp_path, flag, value) -> None:
    _user_error(capsys, ["sample", "CCO", "-o", str(tmp_path / "o.xyz"), flag, value], f"argument {flag}")
    assert not (tmp_path / "o.xyz").exists()


@pytest.mark.parametrize("field, value", [
    ("temperatures_K", [-300.0]), ("temperatures_K", []), ("timestep_fs", 0.0), ("md_frames", -1),
    ("stride", 0), ("equilibration", -5), ("normal_modes", -1), ("friction_per_fs", float("nan")),
    ("method", "gfn0-xtb"), ("dedup_tolerance", -1.0), ("md_frames", 2.5),
])
def test_sample_settings_are_checked(field, value) -> None:
    from polyfid.sample import SampleSettings

    with pytest.raises(ConfigError, match=f"SampleSettings.{field}"):
        SampleSettings(**{field: value})


def test_sample_checks_settings_changed_after_construction() -> None:
    from ase.build import molecule

    from polyfid.sample import SampleSettings, sample

    s = SampleSettings(md_frames=1)
    s.timestep_fs = 0.0
    with pytest.raises(ConfigError, match="timestep_fs"):
        sample([molecule("H2O")], s)


# 3. structures xTB cannot compute, refused before MD; failures inside MD named

def test_sample_refuses_a_wrong_multiplicity_before_md(capsys, tmp_path) -> None:
    _user_error(capsys, ["sample", "CCO", "-o", str(tmp_path / "o.xyz"), "--multiplicity", "2", "--md-frames", "1"],
                "smiles:CCO", "multiplicity 2", "odd multiplicity")
    assert not (tmp_path / "o.xyz").exists()


def test_sample_refuses_elements_beyond_radon(capsys, tmp_path) -> None:
    xyz = tmp_path / "uranium.xyz"
    xyz.write_text("3\nUH2\nU 0 0 0\nH 0 0 2.0\nH 0 2.0 0\n")
    _user_error(capsys, ["sample", str(xyz), "-o", str(tmp_path / "o.xyz"), "--md-frames", "1"],
                "uranium.xyz", "U (Z=92)", "86")


def _failing_calculator(after: int):
    """An ASE calculator (harmonic bonds) whose `after`-th calculation fails as tblite's do."""
    from ase.calculators.calculator import CalculationFailed, Calculator, all_changes

    class Failing(Calculator):
        implemented_properties = ["energy", "forces"]
        calls = 0

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            Failing.calls += 1
            if Failing.calls >= after:
                raise CalculationFailed("(sygvd) failed to solve eigenvalue problem. info=1")
            c = self.atoms.positions - self.atoms.positions.mean(axis=0)
            self.results = {"energy": float((c ** 2).sum()), "forces": -2.0 * c}

    return Failing()


def test_md_calculation_failure_names_structure_temperature_and_step(capsys, tmp_path, monkeypatch) -> None:
    import polyfid.sample as sampling

    monkeypatch.setattr(sampling, "xtb_calculator", lambda *a, **k: _failing_calculator(after=4))
    last = _user_error(capsys, ["sample", "H2O", "-o", str(tmp_path / "o.xyz"), "--temperatures", "450",
                                "--md-frames", "3", "--stride", "2", "--equilibration", "0"],
                       "ase.build.molecule('H2O')", "450 K", "step", "sygvd")
    assert "MD" in last


def test_run_md_failure_is_a_source_error() -> None:
    from ase.build import molecule

    from polyfid.sample import run_md

    with pytest.raises(SourceError, match=r"water: the xTB calculation failed in MD at 300 K, step \d+"):
        run_md(300.0, 2, stride=1, equilibration=0, calc=_failing_calculator(after=2), atoms=molecule("H2O"),
               name="water")


# 4. single atoms: a well-defined (empty) descriptor, no warnings

def test_single_atom_sampling_without_warnings(capsys, tmp_path) -> None:
    import ase.io

    out = tmp_path / "o.xyz"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["sample", "[He]", "-o", str(out), "--md-frames", "2", "--equilibration", "0",
                     "--normal-modes", "2", "--temperatures", "300", "--select", "1"]) == 0
    assert len(ase.io.read(out, ":")) == 1  # every sample of one atom is the same structure
    assert "Traceback" not in capsys.readouterr().err


def test_single_atom_descriptors_deduplicate() -> None:
    from ase import Atoms
    from ase.build import molecule

    from polyfid.sample import deduplicate, farthest_point, inverse_distance_descriptor

    atoms = [Atoms("He", positions=[[0, 0, k]]) for k in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert inverse_distance_descriptor(atoms).shape == (3, 0)
        assert deduplicate(atoms) == [0]
        assert deduplicate([*atoms, molecule("H2O")]) == [0, 3]
        assert len(farthest_point(atoms, 2)) == 2


# 5. an unreachable Dask scheduler

@pytest.mark.parametrize("address, why", [
    ("tcp://127.0.0.1:1", "cannot reach the Dask scheduler"),
    ("nonsense", "malformed scheduler address"),
])
def test_label_dask_scheduler_unreachable(capsys, tmp_path, address, why) -> None:
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    xyz = tmp_path / "two.xyz"
    xyz.write_text(H2_XYZ)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        _user_error(capsys, ["label", str(xyz), "--level", "gfn2-xtb", "--store", str(tmp_path / "s.sqlite"),
                             "--dask", address], f"--dask {address}", why)


# 6. a basis set PySCF does not know

@pytest.mark.parametrize("basis", ["cc-pvdz", "def2-svp", "6-31g*", "sto-3g", "6-311++g(d,p)", "aug-cc-pvtz",
                                   "def2-tzvp", "631g**", "unc-cc-pvdz"])
def test_known_basis_sets_parse(basis) -> None:
    from polyfid.label.levels import parse_level

    assert parse_level(f"HF/{basis.upper()}").basis == basis
    assert parse_level(f"pbe/{basis}").kind == "dft"


def test_unknown_basis_set_is_a_level_error(capsys, tmp_path) -> None:
    from polyfid.label.levels import parse_level

    with pytest.raises(LevelError, match="basis 'nonsense-basis' is not a basis set PySCF knows"):
        parse_level("hf/nonsense-basis")
    xyz = tmp_path / "two.xyz"
    xyz.write_text(H2_XYZ)
    _user_error(capsys, ["label", str(xyz), "--level", "hf/nonsense-basis", "--store", str(tmp_path / "s.sqlite")],
                "nonsense-basis")
    assert not (tmp_path / "s.sqlite").exists()


# 7. diagnose and invariants options

@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2))
    path = tmp_path / "t30.csv"
    path.write_text("a,b,y\n" + "".join(f"{a},{b},{a + 2 * b}\n" for a, b in x))
    return path


@pytest.mark.parametrize("flags, words", [
    (["--jobs", "0"], ["argument --jobs"]),
    (["--repeats", "0"], ["argument --repeats"]),
    (["--min-gain", "-1"], ["argument --min-gain"]),
    (["--seed", "-1"], ["argument --seed"]),
    (["--features", "y", "a"], ["--features", "'y' is the --target"]),
    (["--features", "a", "a"], ["--features", "'a' given more than once"]),
])
def test_diagnose_options_are_checked(capsys, table, flags, words) -> None:
    _user_error(capsys, ["diagnose", str(table), "--target", "y", "--quick", *flags], *words)


@pytest.mark.parametrize("flags", [
    ["--sizes", "0"], ["--budget-s", "0"], ["--val-size", "0"], ["--n-radial", "0"], ["--cutoff", "-1"],
    ["--components", "-1"], ["--threads", "0"],
])
def test_diagnose_potential_options_are_checked(capsys, flags) -> None:
    _user_error(capsys, ["diagnose", "--potential", "train.xyz", "--test", "test.xyz", *flags], f"argument {flags[0]}")


@pytest.mark.parametrize("flag, value", [
    ("--points", "0"), ("--tol", "-1"), ("--tol", "0"), ("--tol", "2"), ("--l-max", "4"), ("--max-tensors", "0"),
    ("--seed", "-1"),
])
def test_invariants_options_are_checked(capsys, flag, value) -> None:
    _user_error(capsys, ["invariants", flag, value], f"argument {flag}")
