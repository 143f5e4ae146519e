"""The command line's contract for errors: a user error (any PolyfidError, or a path the user
named that cannot be opened) exits 2 with one line naming what is wrong and no traceback;
anything else is a bug and exits 1 with its traceback; `polyfid --debug` prints every traceback."""

from __future__ import annotations

import argparse

import pytest

from polyfid import errors
from polyfid.cli import main as cli


def _run_raising(monkeypatch, exc: BaseException, *flags: str) -> int:
    """Run `polyfid [flags] config` with the command replaced by one that raises `exc`."""
    def boom(args: argparse.Namespace) -> int:
        raise exc

    register = cli.config_cmd.add_parser

    def add_parser(sub) -> None:
        register(sub)
        sub.choices["config"].set_defaults(func=boom)

    monkeypatch.setattr(cli.config_cmd, "add_parser", add_parser)
    return cli.main([*flags, "config"])


USER_ERRORS = [
    errors.DataError("data.npz: frame 3: forces have shape (4, 3), expected (5, 3)"),
    errors.GeometryError("data.npz: frame 0: atoms 0 (C) and 1 (H) are 0 Å apart"),
    errors.ConfigError("config.training.grad_clip: must be > 0 or null, got -1"),
    errors.ModelFileError("model.pt: not a polyfid model file"),
    errors.FidelityError("this model has no fidelity 'ccsd'; it has ['lo', 'hi']"),
    errors.LevelError("level 'mp3': unknown method"),
    errors.SourceError("'C1CC': not a file, an ASE molecule name or SMILES"),
    errors.TrainingDiverged("step 12: the loss is NaN"),
    errors.CalculationFailed("SCF did not converge"),
    errors.LabellingAborted("a labelling worker died while computing w.xyz:3"),
    FileNotFoundError(2, "No such file or directory", "missing.xyz"),
    IsADirectoryError(21, "Is a directory", "folder.xyz"),
    OSError(28, "No space left on device", "runs/x/checkpoint.pt"),
]


@pytest.mark.parametrize("exc", USER_ERRORS, ids=lambda e: type(e).__name__)
def test_user_errors_exit_2_with_one_line(monkeypatch, capsys, exc) -> None:
    assert cli._user_error(exc)
    assert _run_raising(monkeypatch, exc) == cli.USER_ERROR == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("polyfid config: error: ")
    expected = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) else str(exc)
    assert expected in err and len(err.strip().splitlines()) == 1


BUGS = [
    KeyError("state_dict"),
    ValueError("operands could not be broadcast together"),
    IndexError("pop from empty list"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
    TypeError("unsupported operand"),
    ZeroDivisionError("division by zero"),
    AttributeError("'NoneType' object has no attribute 'shape'"),
    AssertionError(),
    OSError(22, "Invalid argument"),  # no file name: not something the user named
    FileNotFoundError("a file polyfid made itself"),  # no file name either
]


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: type(e).__name__)
def test_anything_else_is_a_bug_with_its_traceback(monkeypatch, capsys, exc) -> None:
    assert not cli._user_error(exc)
    assert _run_raising(monkeypatch, exc) == cli.BUG == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(exc).__name__ in err
    assert "this is a bug in polyfid" in err


def test_debug_prints_the_traceback_of_a_user_error(monkeypatch, capsys) -> None:
    assert _run_raising(monkeypatch, errors.DataError("x.npz: frame 2: bad"), "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "polyfid config: error: x.npz: frame 2: bad" in err


def test_interrupt_exits_130(monkeypatch, capsys) -> None:
    assert _run_raising(monkeypatch, KeyboardInterrupt()) == 130
    assert "interrupted" in capsys.readouterr().err


def test_every_polyfid_error_is_a_builtin_error_too() -> None:
    """`except ValueError` (or RuntimeError, KeyError) written against earlier versions still catches."""
    builtin = {errors.DataError: ValueError, errors.GeometryError: ValueError, errors.ConfigError: ValueError,
               errors.ModelFileError: ValueError, errors.LevelError: ValueError, errors.SourceError: ValueError,
               errors.FidelityError: KeyError, errors.CalculationFailed: RuntimeError,
               errors.LabellingAborted: RuntimeError,
               errors.TrainingDiverged: RuntimeError}
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PolyfidError)}
    assert classes - {errors.PolyfidError} == set(builtin)
    for cls, base in builtin.items():
        assert issubclass(cls, base)
    assert str(errors.FidelityError("no fidelity 'x'")) == "no fidelity 'x'"  # not KeyError's quoted repr


def test_a_missing_config_file_is_a_user_error(tmp_path, capsys) -> None:
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, words", [
    (["label", "x.xyz", "--level", "gfn2-xtb", "--workers", "0"], "--workers: must be in [1, 1024], got 0"),
    (["label", "x.xyz", "--level", "gfn2-xtb", "--threads", "-1"], "--threads: must be in [1, 1024], got -1"),
    (["label", "x.xyz", "--level", "gfn2-xtb", "--sample", "-2"], "--sample: must be in [0, 10000], got -2"),
    (["scan", "m.pt", "p.xyz", "--tolerance-meV", "-1"], "--tolerance-meV: must be a finite number >= 0"),
    (["scan", "m.pt", "p.xyz", "--tolerance-meV", "nan"], "--tolerance-meV: must be a finite number >= 0"),
])
def test_numeric_flags_out_of_range_stop_at_parsing(capsys, argv, words) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_a_missing_replay_file_is_a_user_error(tmp_path, toy_xyz, capsys) -> None:
    for spec in ("nothere.xyz=lj", "nothere.xyz", "=lj"):
        assert cli.main(["finetune", str(tmp_path / "m.pt"), str(toy_xyz), "--replay", spec]) == 2
        err = capsys.readouterr().err
        assert f"--replay {spec}: no file" in err and "Traceback" not in err
