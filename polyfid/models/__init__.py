"""Networks (one architecture per file), the Potential that wraps them, and model files.

A model file is a plain dict of tensors and primitives written with ``torch.save`` and
read with ``torch.load(weights_only=True)``: loading never executes code.

Model file format (``"format": "polyfid-model"``, ``"version"``: the format version, 1):
"model_config", "species", "fidelities", "units", "metadata", "state_dict" (a Δ model: "kind",
"target", "base_fidelity" and the two networks' descriptions under "base" and "delta"), and,
since polyfid 0.1.0 with no change of format version (older readers ignore them):
"polyfid_version" (the polyfid that wrote the file) and "checksum" (sha256 of everything else,
see `content_digest`). Checkpoints are plain dicts ("model", "optimizer", "state", ...) that
carry the same "checksum". Files without these keys (written before) load unchecked.

Reading a model file or checkpoint raises `ModelFileError` naming the file for anything wrong
with it: missing, a folder, empty, truncated, foreign, asking to execute code, written by a newer
format, damaged (checksum), weights that do not fit its configuration, non-finite weights. torch
does not verify the zip CRC32 of the records it reads, so without the checksum a flipped byte
in a weight or an option would load silently as a different model.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polyfid.errors import ConfigError, ModelFileError
from polyfid.models.branched import BranchedPotential
from polyfid.models.delta import DeltaPotential
from polyfid.models.embedding import FidelityEmbeddingPotential
from polyfid.models.hiphop import HIPHOPNN
from polyfid.models.hipnn import HIPNN
from polyfid.models.hipnn_ts import HIPNNTS
from polyfid.models.potential import Potential
from polyfid.numerics import resolve_device

#: architecture name -> representation class; each takes n_species plus its own options
ARCHITECTURES: dict[str, type[torch.nn.Module]] = {"hipnn": HIPNN, "hipnn_ts": HIPNNTS, "hiphop": HIPHOPNN}

MODEL_FORMAT = "polyfid-model"
#: the model-file format version this polyfid writes; it reads this one and every older one
FORMAT_VERSION = 1
UNITS = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³", "length": "Å"}


def build_potential(model_config: dict[str, Any], species: Sequence[int], fidelities: Sequence[str]) -> Potential:
    """Build a Potential from {"architecture": NAME, **options} for `species` and `fidelities`.

    With "fidelity_embedding": D (> 0) in the options, one head for all fidelities and a
    learned D-dimensional fidelity embedding (FidelityEmbeddingPotential); else one head per
    fidelity, and with "fidelity_blocks": k (> 0) and several fidelities, each fidelity's own
    last k interaction blocks (BranchedPotential)."""
    cfg = dict(model_config)
    name = cfg.pop("architecture", "hipnn")
    embed = int(cfg.pop("fidelity_embedding", 0) or 0)
    own_blocks = int(cfg.pop("fidelity_blocks", 0) or 0)
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    cfg = {k: v for k, v in cfg.items() if v is not None}  # unset architecture-specific options
    try:
        rep = ARCHITECTURES[name](n_species=len(species) + embed, **cfg)
    except TypeError as e:
        raise ConfigError(f"architecture {name!r}: {e}") from None
    if embed:
        pot: Potential = FidelityEmbeddingPotential(rep, species, fidelities, embed)
    elif own_blocks and len(fidelities) > 1:
        pot = BranchedPotential(rep, species, fidelities, own_blocks)
    else:
        pot = Potential(rep, species, fidelities)
    pot.model_config = dict(model_config)  # what rebuilds it (saved with the weights)
    return pot


def polyfid_version() -> str:
    """The version of this polyfid (recorded in the model files it writes)."""
    from polyfid import __version__  # at call time: polyfid/__init__ imports this module

    return __version__


# ---- digests and finiteness --------------------------------------------------------------
def content_digest(obj: Any) -> str:
    """sha256 of a description or checkpoint (its "checksum" key left out): the structure
    (dict keys in order, list/tuple items, primitives by repr) and each tensor's dtype, shape
    and bytes. The same before `torch.save` and after `torch.load`."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            items = [(k, v) for k, v in x.items() if not (x is obj and k == "checksum")]
            h.update(f"D{len(items)}:".encode())
            for k, v in items:
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}:".encode())
            for v in x:
                walk(v)
        else:
            r = repr(x)
            h.update(f"P{type(x).__name__}{len(r)}:{r}".encode())

    walk(obj)
    return "sha256:" + h.hexdigest()


def nonfinite(tensors: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in `tensors` holding a NaN or an infinity."""
    return [prefix + k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _names(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def nonfinite_weights(obj: Any) -> list[str]:
    """Names of the non-finite weight tensors of a model description or a checkpoint (see
    `_weights`): what atomic_write refuses to write."""
    return nonfinite(_weights(obj))


def _weights(obj: Any) -> dict[str, Any]:
    """The weight tensors of a model description (every network of a Δ model) or of a
    checkpoint ("model" and the EMA's shadow weights), by name; {} for anything else."""
    if not isinstance(obj, dict):
        return {}
    if obj.get("format") == MODEL_FORMAT:
        if obj.get("kind") == "delta":
            return {f"{part}.{k}": v for part in ("base", "delta") for k, v in _weights(obj.get(part)).items()}
        sd = obj.get("state_dict")
        return dict(sd) if isinstance(sd, dict) else {}
    out = dict(obj["model"]) if isinstance(obj.get("model"), dict) else {}
    ema = obj.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("shadow"), (list, tuple)):
        out |= {f"ema.shadow.{i}": v for i, v in enumerate(ema["shadow"])}
    return out


# ---- writing -----------------------------------------------------------------------------
try:
    import fcntl
except ImportError:  # not POSIX: no locks, the age alone tells a dead write
    fcntl = None

#: a temporary file younger than this is never removed: its writer may not hold its lock yet
FRESH_TMP_S = 2.0
#: where there are no locks, a temporary file is removed only when untouched for this long
STALE_UNLOCKED_S = 600.0


def _lock(fd: int) -> bool | None:
    """Take an exclusive advisory lock on `fd` without waiting (released when it is closed or its
    process dies): True if taken, False if another process holds it, None where the system or
    the file system has no such locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _remove_stale_tmp(path: Path) -> None:
    """Remove the temporary files `atomic_write` left beside `path` when killed mid-write.

    Only names of its own pattern for this very target (``.NAME.<8 mkstemp characters>.tmp``).
    A run folder has one writer (the run), so there a sibling temporary file of the same target
    is always a dead write; but two processes may save to one path at once (a user's scripts),
    so a file is removed only when no live writer holds it: each writer keeps an flock on its
    temporary file until the rename, and the kernel drops it when the writer dies. Files
    younger than FRESH_TMP_S are left (a writer between creating and locking its file); where
    there are no locks (not POSIX, some network file systems), only files untouched for
    STALE_UNLOCKED_S are removed (torch.save touches its file as it writes). Removing a live
    one would not corrupt anything anyway: that writer's rename would fail, the target stay whole."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    now = time.time()
    try:
        entries = [e for e in os.scandir(path.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
            if not e.is_file(follow_symlinks=False) or now - st.st_mtime < FRESH_TMP_S:
                continue
            fd = os.open(e.path, os.O_RDONLY)
            try:
                locked = _lock(fd)
                if locked or (locked is None and now - st.st_mtime > STALE_UNLOCKED_S):
                    os.unlink(e.path)
            finally:
                os.close(fd)
        except OSError:
            pass  # gone meanwhile, or not ours to remove: harmless


def atomic_write(obj: Any, path: str | Path, durable: bool = True) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half file.

    A dict (model description, checkpoint) is written with its "checksum" (`content_digest`),
    and refused with ModelFileError when its weights are not all finite: a file of NaN weights
    would only fail later, far from its cause. Temporary files of this target left by killed
    writes are removed first (`_remove_stale_tmp`).

    durable=False skips fsync: still safe against a killed process (the rename is atomic),
    not against a power cut; training checkpoints use it to keep epochs cheap."""
    path = Path(path)
    if isinstance(obj, dict):
        bad = nonfinite_weights(obj)
        if bad:
            raise ModelFileError(f"refusing to write non-finite weights ({_names(bad)}) to {path}")
        obj = {k: v for k, v in obj.items() if k != "checksum"}
        obj["checksum"] = content_digest(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _lock(fd)  # held until closed (or killed): tells other writers' `_remove_stale_tmp` it is live
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)  # inside the block: the lock is held until the file has its name
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- reading -----------------------------------------------------------------------------
def _unreadable(path: Path, e: BaseException) -> str:
    """Why torch.load could not read `path`, in words."""
    if isinstance(e, PermissionError):
        return "permission denied"
    msg = str(e)
    weights_only = "Weights only load failed" in msg
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    if weights_only and m:
        return (f"refused: it asks to execute code (GLOBAL {m.group(1)}); polyfid files hold only tensors and "
                "plain values, so this is another program's file or a damaged one")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        head = b""
    if head[:2] == b"PK":
        what = "a zip archive but not a complete torch file (truncated, damaged or another program's)"
    else:
        what = "not a torch file (truncated, damaged, a text file or another program's)"
    if weights_only:  # torch's advice (weights_only=False) is not for files of unknown origin
        m = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
        detail = m.group(1).strip() if m else "unpickling failed"
    else:
        detail = msg.strip().split(". This is an internal")[0].splitlines()[0][:200] if msg.strip() else ""
    return f"{what}: {type(e).__name__}" + (f": {detail}" if detail else "")


def _read(path: Path, device: torch.device | str, kind: str) -> Any:
    """torch.load(weights_only=True) of `path`; every way the file cannot be read is a
    ModelFileError naming it (`kind`: "model file" or "checkpoint")."""
    if path.is_dir():
        raise ModelFileError(f"{kind} {path} is a folder, not a file")
    if not path.exists():
        raise ModelFileError(f"{kind} {path} does not exist")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelFileError(f"{kind} {path} cannot be read: {e.strerror or e}") from None
    if size == 0:
        raise ModelFileError(f"{kind} {path} is empty (a write that never finished?)")
    try:
        with warnings.catch_warnings():  # what torch says on meeting damage is in the error below
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            return torch.load(path, map_location=device, weights_only=True)
    # the one boundary where bytes become objects: whatever torch.load raises (RuntimeError from
    # its zip reader, UnpicklingError, EOFError, IndexError, OSError, zipfile errors, ...) means
    # the file cannot be read, so every exception becomes the one error that names the file
    except Exception as e:
        raise ModelFileError(f"{kind} {path} cannot be read: {_unreadable(path, e)}") from None


def _verify(d: dict, source: str, kind: str) -> None:
    """The checksum of a description or checkpoint (when it has one) and its weights' finiteness."""
    want = d.get("checksum")
    if want is not None and want != content_digest(d):
        raise ModelFileError(
            f"{kind} {source} is damaged: its contents do not match the checksum written with it (a corrupted "
            "copy or disk? if you edited it on purpose, delete its 'checksum' key)")
    bad = nonfinite(_weights(d))
    if bad:
        raise ModelFileError(f"{kind} {source} holds non-finite weights ({_names(bad)}): the run that wrote it "
                             "diverged or the file is damaged")


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The checkpoint at `path` (tensors only: weights_only=True), None if there is none.

    A checkpoint that cannot be read, is not a polyfid checkpoint, fails its checksum or holds
    non-finite weights is a ModelFileError naming it and how to go on (`checkpoint_error`)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        ck = _read(path, device, "checkpoint")
        if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
            raise ModelFileError(f"checkpoint {path} is not a polyfid checkpoint (no 'model' weights)")
        _verify(ck, str(path), "checkpoint")
    except ModelFileError as e:
        raise checkpoint_error(path, str(e)) from None
    return ck


def checkpoint_error(path: str | Path, what: str) -> ModelFileError:
    """The error for a checkpoint a run cannot resume from: `what`, and how to go on."""
    return ModelFileError(f"{what}; to go on, remove {path} (the run then starts over) or train without --resume")


def model_dict(
    model: Potential | DeltaPotential, model_config: dict[str, Any], metadata: dict[str, Any] | None = None
) -> dict:
    """The serialisable description of a model (config, species, fidelities, units, weights).

    A Δ model holds its two networks' descriptions under "base" and "delta"."""
    if isinstance(model, DeltaPotential):
        return {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "polyfid_version": polyfid_version(),
            "kind": "delta",
            "target": model.target,
            "base_fidelity": model.base_fidelity,
            "species": list(model.species),
            "fidelities": list(model.fidelities),
            "units": dict(UNITS),
            "metadata": dict(metadata or {}),
            "base": model_dict(model.base, model_config["base"]),
            "delta": model_dict(model.delta, model_config["delta"]),
        }
    return {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "polyfid_version": polyfid_version(),
        "model_config": dict(model_config),
        "species": list(model.species),
        "fidelities": list(model.fidelities),
        "units": dict(UNITS),
        "metadata": dict(metadata or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def save_model(path: str | Path, model: Potential, model_config: dict[str, Any], metadata: dict | None = None) -> None:
    """Write a model file atomically (with its checksum); ModelFileError for non-finite weights,
    leaving an existing file at `path` as it was."""
    atomic_write(model_dict(model, model_config, metadata), path)


def model_config_of(d: dict) -> dict[str, Any]:
    """The model options of a model description (nested for a Δ model)."""
    if d.get("kind") == "delta":
        return {"base": model_config_of(d["base"]), "delta": model_config_of(d["delta"])}
    return dict(d["model_config"])


def _check_format(d: Any, source: str) -> None:
    """A polyfid model description of a format version this polyfid reads, else ModelFileError."""
    if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{source}: not a polyfid model file (format key missing or wrong)")
    v = d.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ModelFileError(f"{source}: not a readable polyfid model file (format version {v!r})")
    if v > FORMAT_VERSION:
        writer = d.get("polyfid_version")
        writer = f"polyfid {writer}" if isinstance(writer, str) else "a newer polyfid"
        raise ModelFileError(f"{source} was written by {writer} (model format {v}); this polyfid "
                             f"{polyfid_version()} reads formats up to {FORMAT_VERSION}: upgrade polyfid")


def _network(d: dict, source: str) -> Potential:
    """One network from its description; ModelFileError when the description does not build one."""
    cfg, species, fids, sd = (d.get(k) for k in ("model_config", "species", "fidelities", "state_dict"))
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{source}: no model configuration ('model_config')")
    if not isinstance(species, list) or not all(isinstance(z, int) for z in species):
        raise ModelFileError(f"{source}: 'species' is not a list of atomic numbers")
    if not isinstance(fids, list) or not fids or not all(isinstance(f, str) for f in fids):
        raise ModelFileError(f"{source}: 'fidelities' is not a list of level names")
    if not isinstance(sd, dict):
        raise ModelFileError(f"{source}: no weights ('state_dict')")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ModelFileError(f"{source}: 'state_dict' holds something other than named tensors")
    try:
        model = build_potential(cfg, species, fids)
    except (ConfigError, TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ModelFileError(f"{source}: its model configuration does not build a model: {e}") from None
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:600]
        raise ModelFileError(f"{source}: its weights do not fit the model its configuration describes: "
                             f"{detail}") from None
    return model


def model_from_dict(d: dict, source: str = "model") -> Potential | DeltaPotential:
    """The model a description holds (format, version, checksum, weights checked: ModelFileError
    naming `source` for anything wrong)."""
    _check_format(d, source)
    _verify(d, source, "model file")
    if d.get("kind") == "delta":
        for part in ("base", "delta"):
            _check_format(d.get(part), f"{source} ({part} network)")
        base = _network(d["base"], f"{source} (base network)")
        delta = _network(d["delta"], f"{source} (delta network)")
        try:
            return DeltaPotential(base, delta, d["target"], d["base_fidelity"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{source}: not a readable Δ model: {e}") from None
    if d.get("kind") is not None:
        raise ModelFileError(f"{source}: unknown model kind {d.get('kind')!r}")
    return _network(d, source)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> Potential:
    """Load a model file (no code executed: weights_only=True) in `dtype`, in eval mode.

    ModelFileError, naming the file, for a missing, unreadable, foreign, damaged or newer-format
    file and for non-finite weights."""
    path = Path(path)
    dev = resolve_device(device)  # first: a missing GPU is the clearer error
    d = _read(path, "cpu", "model file")
    model = model_from_dict(d, str(path)).to(dtype=dtype, device=dev)
    # the level a multi-fidelity model was trained to predict answers when none is named
    meta = d.get("metadata")
    target = (meta.get("target") if isinstance(meta, dict) else None) if d.get("kind") != "delta" else d["target"]
    if target in model.fidelities:
        model.default_fidelity = target
    # the geometry checks it was trained with (data.min_distance, data.max_extent) apply to its inputs
    meta = d.get("metadata") or {}
    model.geometry_limits = {k: float(meta[k]) for k in ("min_distance", "max_extent") if k in meta}
    model.eval()
    return model


__all__ = [
    "ARCHITECTURES",
    "HIPNN",
    "BranchedPotential",
    "DeltaPotential",
    "FidelityEmbeddingPotential",
    "Potential",
    "atomic_write",
    "build_potential",
    "load_model",
    "save_model",
]
