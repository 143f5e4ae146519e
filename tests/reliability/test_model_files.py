"""Model files and checkpoints that cannot be used say so: a missing, empty, truncated, foreign,
damaged (checksum), newer-format or non-finite file is a ModelFileError naming it, from the API,
the ASE calculator and the command line (exit 2, no traceback); loading never executes code;
non-finite weights are never written; temporary files of killed writes are removed on the next
write; damage anywhere in a file never gives silently different numbers."""

from __future__ import annotations

import copy
import io
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase.build import molecule
from conftest import tiny_config, toy_molecules
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyfid
from polyfid.calculators.ase import PolyfidCalculator
from polyfid.cli.main import main
from polyfid.errors import ModelFileError
from polyfid.models import (
    FORMAT_VERSION,
    DeltaPotential,
    atomic_write,
    build_potential,
    content_digest,
    load_model,
    model_dict,
    read_checkpoint,
    save_model,
)

CFG = {"architecture": "hipnn", "n_features": 4, "n_sensitivities": 4, "soft_min": 0.7, "soft_max": 3.0,
       "cutoff": 3.5, "n_interactions": 1, "n_atom_layers": 1}


def tiny_model():
    """A small HIP-NN for H, C, O with a non-zero readout (it starts at zero)."""
    torch.manual_seed(0)
    model = build_potential(CFG, [1, 6, 8], ["low", "high"])
    with torch.no_grad():
        model.readout.weight.normal_(0, 0.3)
        model.atom_ref.normal_(0, 1.0)
    return model


MODEL = tiny_model()
WATER = molecule("H2O")


def energy(model) -> float:
    return float(polyfid.predict(model, [WATER], fidelity="high")[0]["energy"])


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "model.pt"
    save_model(path, MODEL, CFG, {"target": "high"})
    return path


def description() -> dict:
    return model_dict(MODEL, CFG, {"target": "high"})


def sealed(d: dict) -> dict:
    """`d` with a checksum that fits it (so what is tested is not the checksum)."""
    d = {k: v for k, v in d.items() if k != "checksum"}
    return d | {"checksum": content_digest(d)}


def refused(path: Path, *words: str) -> str:
    with pytest.raises(ModelFileError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    return msg


# ---- files that are not (whole) model files ---------------------------------------------------
@pytest.mark.parametrize("keep", [1, 22, 0.1, 0.5, 0.9, -1])
def test_a_truncated_file_is_refused(good, tmp_path, keep) -> None:
    data = good.read_bytes()
    n = keep if isinstance(keep, int) and keep > 0 else len(data) - 1 if keep == -1 else int(keep * len(data))
    path = tmp_path / "model.pt"
    path.write_bytes(data[:n])
    refused(path, "cannot be read")


def test_an_empty_file_is_refused(tmp_path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    refused(path, "empty")


def test_a_text_file_is_refused(tmp_path) -> None:
    path = tmp_path / "model.pt"
    path.write_text("architecture: hipnn\nn_features: 8\n")
    refused(path, "not a torch file")


def test_random_bytes_are_refused(tmp_path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    msg = refused(path, "cannot be read")
    assert "weights_only" not in msg  # torch's advice to turn the safety off is not passed on


def test_a_plain_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"format": "polyfid-model"}))
    refused(path, "not a torch file")


def test_a_zip_that_is_not_a_torch_file_is_refused(tmp_path) -> None:
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    refused(path, "zip archive but not a complete torch file")


@pytest.mark.parametrize("obj", [torch.zeros(3), [1, 2, 3], {"state_dict": {}}, {"format": "other"}],
                         ids=["tensor", "list", "dict-without-format", "other-format"])
def test_a_torch_file_of_something_else_is_refused(tmp_path, obj) -> None:
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    refused(path, "not a polyfid model file")


def test_a_folder_is_refused(tmp_path) -> None:
    (tmp_path / "model.pt").mkdir()
    refused(tmp_path / "model.pt", "is a folder")


def test_a_missing_file_is_refused(tmp_path) -> None:
    refused(tmp_path / "nothing.pt", "does not exist")


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "model.pt"
    torch.save({"format": "polyfid-model", "version": 1, "payload": Exploit()}, path)
    refused(path, "refused: it asks to execute code", "makedirs")
    assert not marker.exists()
    with pytest.raises(ModelFileError, match="execute code"):
        PolyfidCalculator(path)
    assert not marker.exists()


# ---- polyfid files that this polyfid must not use ---------------------------------------------
def test_a_file_of_a_newer_format_names_the_polyfid_that_wrote_it(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(sealed(description() | {"version": 999, "polyfid_version": "7.3.1"}), path)
    msg = refused(path, "written by polyfid 7.3.1 (model format 999)", "upgrade polyfid",
                  f"this polyfid {polyfid.__version__} reads formats up to {FORMAT_VERSION}")
    # no writer version recorded: still the format versions
    torch.save({k: v for k, v in description().items() if k != "polyfid_version"} | {"version": 2}, path)
    assert "model format 2" in refused(path, "upgrade polyfid") and msg


@pytest.mark.parametrize("change", ["no-state_dict", "missing-key", "extra-key", "wrong-shape", "not-tensors"])
def test_weights_that_do_not_fit_the_configuration_are_refused(tmp_path, change) -> None:
    d = description()
    sd = dict(d["state_dict"])
    name = "readout.weight"
    if change == "no-state_dict":
        del d["state_dict"]
        words = ("no weights",)
    else:
        if change == "missing-key":
            del sd[name]
        elif change == "extra-key":
            sd["readout.extra"] = torch.zeros(2)
        elif change == "wrong-shape":
            sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])
        else:
            sd[name] = [0.0]
        d["state_dict"] = sd
        words = ("named tensors",) if change == "not-tensors" else ("do not fit", "readout")
    path = tmp_path / "model.pt"
    torch.save(sealed(d), path)
    refused(path, *words)


def test_a_configuration_that_builds_nothing_is_refused(tmp_path) -> None:
    d = description()
    d["model_config"] = dict(d["model_config"], architecture="nonesuch")
    path = tmp_path / "model.pt"
    torch.save(sealed(d), path)
    refused(path, "does not build a model", "nonesuch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_them(tmp_path, bad) -> None:
    d = description()
    d["state_dict"] = dict(d["state_dict"])
    for name in ("readout.weight", "atom_ref"):
        d["state_dict"][name] = d["state_dict"][name].clone()
        d["state_dict"][name].view(-1)[0] = bad
    path = tmp_path / "model.pt"
    torch.save(sealed(d), path)
    refused(path, "non-finite weights", "readout.weight", "atom_ref")


@pytest.mark.parametrize("where", ["weight", "option"])
def test_a_flipped_byte_is_caught_by_the_checksum(good, tmp_path, where) -> None:
    """torch.load does not check the zip CRC32s: the checksum is what catches this."""
    data = bytearray(good.read_bytes())
    if where == "weight":  # the lowest mantissa bit of the first number of the first storage
        info = next(i for i in zipfile.ZipFile(good).infolist() if "/data/" in i.filename)
        at = info.header_offset  # the local header: 30 bytes, the name, the extra field, the data
        start = at + 30 + sum(int.from_bytes(data[k:k + 2], "little") for k in (at + 26, at + 28))
        data[start] ^= 0x01
    else:  # the cutoff 3.5 in the pickled configuration: 'G' and eight big-endian bytes
        i = data.index(b"cutoff")
        j = data.index(b"G@\x0c", i)
        data[j + 4] ^= 0x01
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(data))
    # torch itself reads the damaged file without complaint
    torch.load(path, weights_only=True)
    refused(path, "damaged", "checksum")


# ---- files that must still load ---------------------------------------------------------------
def test_a_file_written_before_versions_and_checksums_loads(good, tmp_path) -> None:
    old = {k: v for k, v in description().items() if k not in ("polyfid_version", "checksum")}
    path = tmp_path / "old.pt"
    torch.save(old, path)
    assert energy(load_model(path, dtype=torch.float64)) == energy(load_model(good, dtype=torch.float64))


def test_a_written_file_records_its_writer_and_loads_to_the_same_numbers(good) -> None:
    d = torch.load(good, weights_only=True)
    assert d["format"] == "polyfid-model" and d["version"] == FORMAT_VERSION
    assert d["polyfid_version"] == polyfid.__version__ and d["checksum"].startswith("sha256:")
    model = load_model(good, dtype=torch.float64)
    assert model.default_fidelity == "high"
    assert energy(model) == pytest.approx(energy(copy.deepcopy(MODEL).double()), rel=1e-12)


def test_a_delta_model_round_trips_and_its_networks_are_checked(tmp_path) -> None:
    torch.manual_seed(1)
    base = build_potential(CFG, [1, 6, 8], ["low"])
    delta = build_potential(CFG, [1, 6, 8], ["high"])
    with torch.no_grad():
        delta.readout.weight.normal_(0, 0.3)
    model = DeltaPotential(base, delta, "high", "low")
    d = model_dict(model, {"base": CFG, "delta": CFG})
    path = tmp_path / "delta.pt"
    atomic_write(d, path)
    assert energy(load_model(path)) == pytest.approx(energy(model), rel=1e-6)
    d["delta"]["state_dict"] = {k: v.clone() for k, v in d["delta"]["state_dict"].items()}
    d["delta"]["state_dict"]["readout.weight"][0, 0] = float("nan")
    with pytest.raises(ModelFileError, match=r"refusing to write non-finite weights \(delta.readout.weight\)"):
        atomic_write(d, path)
    torch.save(sealed(d), path)
    refused(path, "non-finite weights (delta.readout.weight)")


# ---- writing ----------------------------------------------------------------------------------
def test_save_model_refuses_non_finite_weights_and_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "model.pt"
    save_model(path, MODEL, CFG)
    before = path.read_bytes()
    broken = tiny_model()
    with torch.no_grad():
        broken.readout.weight[0, 0] = float("nan")
    with pytest.raises(ModelFileError, match=r"refusing to write non-finite weights \(readout.weight\)"):
        save_model(path, broken, CFG)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    with pytest.raises(ModelFileError, match="non-finite"):
        atomic_write({"model": broken.state_dict(), "state": {}}, tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_temporary_files_of_killed_writes_are_removed_on_the_next_write(tmp_path) -> None:
    path = tmp_path / "model.pt"
    old = time.time() - 3600
    stale = [tmp_path / ".model.pt.k1ll3d_0.tmp", tmp_path / ".model.pt.abcdefgh.tmp"]
    live = tmp_path / ".model.pt.writing.tmp"  # another process writing this target now
    kept = [live,
            tmp_path / ".model.pt.inflight.tmp",  # just created: its writer may not have locked it yet
            tmp_path / ".other.pt.abcdefgh.tmp",  # another target's
            tmp_path / ".model.pt.tmp", tmp_path / "model.pt.abcdefgh.tmp"]  # not atomic_write's pattern
    for p in stale + kept:
        p.write_bytes(b"half a file")
        if p.name != ".model.pt.inflight.tmp":
            os.utime(p, (old, old))
    script = ("import fcntl, sys, time; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
              "print('locked', flush=True); time.sleep(60)")
    writer = subprocess.Popen([sys.executable, "-c", script, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        save_model(path, MODEL, CFG)
    finally:
        writer.kill()
        writer.wait()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    load_model(path)


def test_a_write_killed_midway_leaves_the_old_file_and_its_leftover_goes_next_time(tmp_path) -> None:
    """SIGKILL inside torch.save (no cleanup runs): the target keeps its old bytes, and the
    temporary file it left is removed by the next write."""
    path = tmp_path / "model.pt"
    save_model(path, MODEL, CFG)
    before = path.read_bytes()
    script = f"""
import os, signal, sys, torch
sys.path[:0] = {sys.path!r}
from test_model_files import CFG, MODEL
from polyfid.models import save_model
def dies(obj, fh):
    fh.write(b"PK half a file")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dies
save_model({str(path)!r}, MODEL, CFG)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    old = time.time() - 10
    os.utime(left, (old, old))
    save_model(path, MODEL, CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# ---- checkpoints ------------------------------------------------------------------------------
def test_read_checkpoint_checks_what_it_reads(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    assert read_checkpoint(path) is None  # none yet: a fresh run
    ck = {"model": MODEL.state_dict(), "state": {"epoch": 3}}
    atomic_write(ck, path)
    assert read_checkpoint(path)["state"] == {"epoch": 3}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="remove .*checkpoint.pt.* without --resume"):
        read_checkpoint(path)
    torch.save({"state": {}}, path)
    with pytest.raises(ModelFileError, match="not a polyfid checkpoint"):
        read_checkpoint(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished three-epoch run through the command line; its checkpoint's bytes."""
    d = tmp_path_factory.mktemp("resume")
    ase.io.write(d / "train.extxyz", toy_molecules(24, seed=0), format="extxyz")
    cfg = tiny_config(d / "train.extxyz", d / "run", epochs=3, checkpoint_interval_s=0.0)
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(d / "cfg.yaml")]) == 0
    (ck,) = (d / "run").rglob("checkpoint.pt")
    return d / "cfg.yaml", ck, ck.read_bytes()


def _nan_checkpoint(data: bytes) -> bytes:
    ck = torch.load(io.BytesIO(data), weights_only=True)
    name = next(iter(ck["model"]))
    ck["model"][name].view(-1)[0] = float("nan")
    buf = io.BytesIO()
    torch.save(sealed(ck), buf)
    return buf.getvalue()


def _resized_checkpoint(data: bytes) -> bytes:
    ck = torch.load(io.BytesIO(data), weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.ndim == 2)
    ck["model"][name] = torch.zeros(ck["model"][name].shape[0] + 1, ck["model"][name].shape[1])
    buf = io.BytesIO()
    torch.save(sealed(ck), buf)
    return buf.getvalue()


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[: len(b) // 2], ("cannot be read",)),
    (lambda b: b[:100], ("cannot be read",)),
    (lambda b: b"", ("empty",)),
    (_nan_checkpoint, ("non-finite weights",)),
    (_resized_checkpoint, ("does not fit this run",)),
], ids=["truncated-half", "truncated-100", "empty", "nan", "other-shapes"])
def test_resuming_from_a_damaged_checkpoint_is_a_clear_error(run, capsys, damage, words) -> None:
    cfg, ck, data = run
    ck.write_bytes(damage(data))
    try:
        assert main(["train", str(cfg), "--resume"]) == 2
    finally:
        ck.write_bytes(data)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(ck) in err and "remove" in err and "without --resume" in err, err
    for w in words:
        assert w in err, err


# ---- the command line and the calculator ------------------------------------------------------
@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.extxyz"
    ase.io.write(path, toy_molecules(4, seed=3), format="extxyz")
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict", "finetune"])
@pytest.mark.parametrize("damage", ["truncated", "text", "nan", "missing"])
def test_commands_given_a_bad_model_exit_2_naming_it(tmp_path, good, data_file, capsys, command, damage) -> None:
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[:500])
    elif damage == "text":
        bad.write_text("not a model\n")
    elif damage == "nan":
        d = description()
        d["state_dict"] = {k: v.clone() for k, v in d["state_dict"].items()}
        d["state_dict"]["atom_ref"].fill_(float("nan"))
        torch.save(sealed(d), bad)
    args = {"evaluate": ["evaluate", str(bad), str(data_file)],
            "predict": ["predict", str(bad), str(data_file), "-o", str(tmp_path / "out.extxyz")],
            "finetune": ["finetune", str(bad), str(data_file), "--out", str(tmp_path / "ft"), "--steps", "1"]}
    assert main(args[command]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(bad) in err and "error:" in err, err


def test_the_calculator_refuses_a_bad_model(tmp_path, good) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="bad.pt"):
        PolyfidCalculator(bad)


# ---- damage anywhere ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(good):
    return good.read_bytes(), energy(load_model(good))


@settings(derandomize=True, max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_model_files_are_refused_or_give_the_same_numbers(tmp_path, reference, data) -> None:
    """Truncation or flipped bytes anywhere: a ModelFileError, or (damage in bytes nothing
    reads: zip padding, local headers) exactly the original model; never another exception,
    never a different model."""
    raw, e0 = reference
    if data.draw(st.booleans(), label="truncate"):
        damaged = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
    else:
        buf = bytearray(raw)
        for pos, mask in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)),
                                            min_size=1, max_size=3), label="flips"):
            buf[pos] ^= mask
        damaged = bytes(buf)
    path = tmp_path / "model.pt"
    path.write_bytes(damaged)
    try:
        model = load_model(path)
    except ModelFileError as e:
        assert str(path) in str(e)
        return
    assert all(bool(torch.isfinite(p).all()) for p in model.state_dict().values())
    e = energy(model)
    assert np.isfinite(e) and e == e0
