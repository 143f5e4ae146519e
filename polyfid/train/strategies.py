"""Multi-fidelity strategies on one backbone: single, multi-head, embedding, delta, transfer.

Each takes training and validation data sets whose frames carry labels per fidelity and
leaves a model in `out/model.pt` that predicts at every fidelity it knows. Strategies with
two stages (delta, transfer) train the base level in `out/base` and the second stage in
`out/delta` or `out/finetune`; a killed run resumes stage by stage.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfid.data.batch import PackedData
from polyfid.data.frame import Dataset, Labels
from polyfid.data.merge import files_per_fidelity
from polyfid.errors import DataError
from polyfid.models import (
    BranchedPotential,
    DeltaPotential,
    Potential,
    atomic_write,
    build_potential,
    load_model,
    model_dict,
)
from polyfid.neighbors.checks import model_geometry
from polyfid.numerics import resolve_device
from polyfid.train.config import Config, ConfigError, ModelConfig, StrategyConfig, TrainingConfig, from_dict
from polyfid.train.trainer import BEST_MODEL, CHECKPOINT, Trainer, TrainState

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class StrategyResult:
    """The trained model (best validation, EMA weights), its file and each stage's state."""

    model: Potential | DeltaPotential
    path: Path
    strategy: str
    target: str
    stages: dict[str, TrainState]

    @property
    def train_s(self) -> float:
        return sum(s.elapsed_s for s in self.stages.values())

    @property
    def epochs(self) -> int:
        return sum(s.epoch for s in self.stages.values())


# ---- data helpers ------------------------------------------------------------------------
def restrict(ds: Dataset, fidelities: list[str]) -> Dataset:
    """Frames with their labels at `fidelities` only; frames left without labels are dropped."""
    out = []
    for f in ds:
        labels = {k: v for k, v in f.labels.items() if k in fidelities}
        if labels:
            out.append(replace(f, labels=labels))
    return Dataset(out, name=ds.name)


def delta_dataset(ds: Dataset, target: str, base: str) -> Dataset:
    """Frames labelled at both levels, with labels target − base under the name `target`
    (energies where both have energies, forces where both have forces)."""
    out = []
    for f in ds:
        t, b = f.labels.get(target), f.labels.get(base)
        if t is None or b is None:
            continue
        e = t.energy - b.energy if t.energy is not None and b.energy is not None else None
        fo = t.forces - b.forces if t.forces is not None and b.forces is not None else None
        if e is not None or fo is not None:
            out.append(replace(f, labels={target: Labels(energy=e, forces=fo)}))
    return Dataset(out, name=ds.name)


def resolve_levels(sc: StrategyConfig, ds: Dataset) -> tuple[str, str, str | None]:
    """(strategy name, target fidelity, base fidelity or None) for the data at hand."""
    fids = ds.fidelities
    if not fids:
        raise DataError("the training data carry no labels")
    for key in ("target", "base"):
        v = getattr(sc, key)
        if v is not None and v not in fids:
            raise ConfigError(f"strategy.{key}: fidelity {v!r} is not in the training data, which has {fids}")
    n_e = {f: ds.count(f, "energy") for f in fids}
    n_f = {f: ds.count(f, "forces") for f in fids}
    target = sc.target or min(fids, key=lambda f: (n_e[f] + n_f[f], -fids.index(f)))
    others = [f for f in fids if f != target]
    base = sc.base or (max(others, key=lambda f: (n_f[f], n_e[f])) if others else None)
    name = sc.name
    if name == "auto":
        name = "single" if len(fids) == 1 else "multi-head"
    if name in ("delta", "transfer", "multi-head") and len(fids) > 1 and base == target:
        raise ConfigError(f"strategy.base and strategy.target are both {target!r}")
    if (name in ("delta", "transfer") or (name in ("multi-head", "embedding") and sc.warm_start)) and base is None:
        raise ConfigError(f"strategy {name!r}{' with warm_start' if sc.warm_start else ''} needs two fidelities "
                          f"in the training data; it has {fids}")
    return name, target, base


def warm_starts(sc: StrategyConfig, name: str, n_fidelities: int) -> bool:
    """Whether multi-head / embedding first train the base level alone (strategy.warm_start;
    null: multi-head with two or more levels)."""
    if name not in ("multi-head", "embedding") or n_fidelities < 2:
        return False
    return sc.warm_start if sc.warm_start is not None else name == "multi-head"


def frame_weights(ds: Dataset, sampling: dict[str, float]) -> np.ndarray | None:
    """Sampling weight of each frame such that the frames labelled at fidelity f make up a
    share `sampling[f]` of the draws; a frame with several levels counts for its rarest
    named level; unnamed frames share the rest in proportion to their number."""
    if not sampling:
        return None
    counts = {f: ds.count(f, "energy") + ds.count(f, "forces") for f in sampling}
    group = []
    for fr in ds:
        named = [f for f in fr.labels if f in sampling]
        group.append(min(named, key=lambda f: counts[f]) if named else None)
    w = np.zeros(len(ds))
    rest = 1.0 - sum(sampling.values())
    for g in set(group):
        members = np.array([k for k, x in enumerate(group) if x == g])
        share = sampling[g] if g is not None else rest
        w[members] = share / len(members)
    unknown = set(sampling) - set(ds.fidelities)
    if unknown:
        raise ConfigError(f"training.sampling names fidelities {sorted(unknown)} absent from the training data")
    if not w.any():
        raise ConfigError("training.sampling leaves no frame with a positive weight")
    return w


def _no_shared_geometry(ds: Dataset, target: str, base: str, tolerance: float | None) -> str:
    """The message for delta without a geometry labelled at both levels."""
    files = files_per_fidelity(ds)
    where = "; ".join(f"{f!r} from {', '.join(files.get(f, ['(none)']))}" for f in (target, base))
    merge = (f"positions within data.merge_tolerance = {tolerance:g} Å" if tolerance is not None
             else "data.merge_tolerance is null, so files are not merged")
    return (f"strategy delta learns {target} − {base} on geometries labelled at both levels, and no training "
            f"frame has labels at both ({where}). A geometry in two files is one frame when its atoms are in the "
            f"same order with {merge}: label the high level on geometries of the low-level file, or use "
            f"strategy transfer or multi-head, which need no shared geometry")


# ---- one training stage --------------------------------------------------------------------
def _stage(
    model: Potential,
    train_ds: Dataset,
    val_ds: Dataset | None,
    tc: TrainingConfig,
    out: Path,
    model_cfg: dict[str, Any],
    output: Any,
    resume: bool,
    fit_references: bool = True,
    regularizer=None,
    metadata: dict | None = None,
    energy_scale: torch.Tensor | None = None,
    geometry: dict[str, float] | None = None,
) -> tuple[Potential, TrainState]:
    """Fit references (optional; then set every head's scale to `energy_scale` if given:
    weights copied from another model keep their meaning), train, return the best model
    and the final state. `geometry`: the geometry checks' limits (data.min_distance,
    data.max_extent, Å; default: the model's own), kept in the model file's metadata."""
    dtype = DTYPES[tc.dtype]
    fids = list(model.fidelities)
    geometry = model_geometry(model) if geometry is None else dict(geometry)
    train = PackedData(train_ds, model.cutoff, fids, dtype=dtype, **geometry)
    val = (PackedData(val_ds, model.cutoff, fids, dtype=dtype, **geometry)
           if val_ds is not None and len(val_ds) else None)
    meta = dict(metadata or {}) | geometry
    if fit_references:
        refs = model.fit_reference_energies(train)
        meta["reference_energies_eV"] = {f: dict(zip(model.species, r)) for f, r in refs.items()}
        if energy_scale is not None:
            with torch.no_grad():
                model.energy_scale.fill_(float(energy_scale))
    meta |= {"n_train": len(train_ds), "n_val": 0 if val is None else len(val_ds)}
    model = model.to(dtype=dtype, device=resolve_device(tc.device, "training.device"))
    trainer = Trainer(
        model, train, val, tc, out, model_cfg, meta,
        progress=output.progress, tensorboard=output.tensorboard,
        frame_weights=frame_weights(train_ds, _stage_shares(tc.sampling, fids)), regularizer=regularizer,
    )
    state = trainer.fit(resume=resume)
    return load_model(out / BEST_MODEL, dtype=dtype, device=tc.device), state


def _stage_shares(sampling: dict[str, float], fids: list[str]) -> dict[str, float]:
    """The sampling shares that apply to a stage training `fids` (none for a single level)."""
    return {} if len(fids) < 2 else {k: v for k, v in sampling.items() if k in fids}


def _second_stage_config(tc: TrainingConfig, overrides: dict, name: str) -> TrainingConfig:
    """The training options after the base stage: strategy.second_stage over training; the stages
    that start from the base model's weights (transfer, multi-head) at a tenth of the learning
    rate unless it is named (fine-tuning at the first stage's rate undid what the base level
    taught: benchmarks/multifidelity.py --phase select)."""
    default = {"lr": tc.lr / 10} if name in ("transfer", "multi-head") else {}
    return from_dict(TrainingConfig, asdict(tc) | default | dict(overrides), "strategy.second_stage")


def _with_target_share(tc: TrainingConfig, sc: StrategyConfig, ds: Dataset, target: str) -> TrainingConfig:
    """Multi-head's joint stage: frames labelled at the target level make up at least
    strategy.target_share of the draws, unless training.sampling says otherwise."""
    if tc.sampling or sc.target_share is None or len(ds.fidelities) < 2:
        return tc
    natural = sum(1 for f in ds if target in f.labels) / max(len(ds), 1)
    return replace(tc, sampling={target: max(sc.target_share, natural)})


def _species(*sets: Dataset) -> list[int]:
    return sorted(set().union(*[set(s.elements) for s in sets if s is not None]))


# ---- strategies -----------------------------------------------------------------------------
def fit_strategy(
    cfg: Config,
    train_ds: Dataset,
    val_ds: Dataset | None,
    out: str | Path,
    resume: bool = False,
    base_model: Potential | None = None,
) -> StrategyResult:
    """Train as `cfg.strategy` says; the final model is written to out/model.pt.

    base_model: an already trained base-level model for delta and transfer (its stage is
    then skipped; e.g. one low-level model shared by several high-level subsets)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sc, tc = cfg.strategy, cfg.training
    name, target, base = resolve_levels(sc, train_ds)
    for option in ("sampling", "fidelity_weights"):  # a misspelt level would silently weigh nothing
        unknown = set(getattr(tc, option)) - set(train_ds.fidelities)
        if unknown:
            raise ConfigError(f"training.{option} names fidelities {sorted(unknown)} absent from the training data "
                              f"({train_ds.fidelities})")
    species = _species(train_ds, val_ds)
    model_cfg = asdict(cfg.model)
    torch.manual_seed(tc.seed)
    stages: dict[str, TrainState] = {}
    geometry = data_geometry(cfg)

    warm = name in ("multi-head", "embedding") and (warm_starts(sc, name, len(train_ds.fidelities))
                                                     or base_model is not None)
    if name == "single" or (name in ("multi-head", "embedding") and not warm):
        fids = [target] if name == "single" else train_ds.fidelities
        best, stages["train"] = _one_network(cfg, name, fids, train_ds, val_ds, out, resume, target, base, species)
        return StrategyResult(best, out / BEST_MODEL, name, target, stages)

    assert base is not None
    if (name in ("multi-head", "embedding") and resume and base_model is None and (out / CHECKPOINT).exists()
            and not (out / "base").exists()):  # a folder of the one-stage default these strategies had
        raise ConfigError(
            f"{out} holds the checkpoint of a one-stage {name} run, and strategy {name!r} now trains the base level "
            "first (in base/) then every level (in train/): to resume that run as it was, set strategy.warm_start: "
            "false, fidelity_blocks: 0 and target_share: null; or train into a new folder")
    # stage 1: the base level alone
    if base_model is None:
        torch.manual_seed(tc.seed)
        m = build_potential(model_cfg, species, [base])
        tr_b = restrict(train_ds, [base])
        va_b = restrict(val_ds, [base]) if val_ds is not None else None
        base_model, stages["base"] = _stage(m, tr_b, va_b, tc, out / "base", model_cfg, cfg.output, resume,
                                            metadata={"strategy": "single", "target": base}, geometry=geometry)
    elif base not in base_model.fidelities:
        raise ConfigError(f"the given base model has fidelities {base_model.fidelities}, not {base!r}")
    tc2 = _second_stage_config(tc, sc.second_stage, name)
    torch.manual_seed(tc2.seed)
    meta = {"strategy": name, "target": target, "base": base} | geometry

    if name == "delta":
        tr_d = delta_dataset(train_ds, target, base)
        if not len(tr_d):
            raise DataError(_no_shared_geometry(train_ds, target, base, cfg.data.merge_tolerance))
        va_d = delta_dataset(val_ds, target, base) if val_ds is not None else None
        d_cfg = asdict(from_dict(ModelConfig, model_cfg | dict(sc.delta_model), "strategy.delta_model"))
        delta = build_potential(d_cfg, species, [target])
        delta, stages["delta"] = _stage(delta, tr_d, va_d, tc2, out / "delta", d_cfg, cfg.output, resume,
                                        metadata=meta, geometry=geometry)
        b = base_model.to(dtype=DTYPES[tc.dtype], device=resolve_device(tc2.device, "strategy.second_stage.device"))
        model: Potential | DeltaPotential = DeltaPotential(b, delta, target, base)
        model.geometry_limits = geometry
        b_cfg = getattr(base_model, "model_config", None) or model_cfg
        atomic_write(model_dict(model, {"base": b_cfg, "delta": d_cfg}, meta), out / BEST_MODEL)
        return StrategyResult(model, out / BEST_MODEL, name, target, stages)

    col = base_model.head_index(base)
    scale = base_model.energy_scale[col]  # copied head weights were learnt at the base level's scale
    if name in ("multi-head", "embedding"):
        # every level from the base model's weights, then all levels together
        fids = train_ds.fidelities
        best, stages["train"] = _one_network(cfg, name, fids, train_ds, val_ds, out / "train", resume, target, base,
                                             species, tc2, base_model, scale)
        shutil.copyfile(out / "train" / BEST_MODEL, out / BEST_MODEL)
        return StrategyResult(best, out / BEST_MODEL, name, target, stages)

    # transfer: start from the base model's weights, fine-tune on the target level alone
    tr_t = restrict(train_ds, [target])
    va_t = restrict(val_ds, [target]) if val_ds is not None else None
    model = build_potential(model_cfg, species, [target])
    warm_start(model, base_model, col)
    _freeze(model, sc.trainable)
    best, stages["finetune"] = _stage(model, tr_t, va_t, tc2, out / "finetune", model_cfg, cfg.output, resume,
                                      metadata=meta, energy_scale=scale, geometry=geometry)
    shutil.copyfile(out / "finetune" / BEST_MODEL, out / BEST_MODEL)
    return StrategyResult(best, out / BEST_MODEL, name, target, stages)


def _one_network(cfg, name, fids, train_ds, val_ds, out, resume, target, base, species, tc=None, start=None,
                 scale=None) -> tuple[Potential, TrainState]:
    """single / multi-head / embedding: one network on `fids`, optionally from `start`'s weights."""
    sc, tc = cfg.strategy, tc or cfg.training
    model_cfg = asdict(cfg.model)
    tr = restrict(train_ds, fids)
    if name == "multi-head":
        tc = _with_target_share(tc, sc, tr, target)
    va = restrict(val_ds, fids) if val_ds is not None else None
    if name == "embedding":
        model_cfg["fidelity_embedding"] = sc.embedding_dim
    if name == "multi-head" and len(fids) > 1:
        model_cfg["fidelity_blocks"] = own_blocks(sc, cfg.model.n_interactions)
    model = build_potential(model_cfg, species, fids)
    if start is not None:
        warm_start(model, start, start.head_index(base))
    reg = None
    if name == "multi-head" and sc.head_tie > 0 and base is not None:
        b, lam = fids.index(base), sc.head_tie
        reg = lambda: lam * model.head_tie_penalty(b)  # noqa: E731
    meta = {"strategy": name, "target": target, "base": base}
    return _stage(model, tr, va, tc, out, model_cfg, cfg.output, resume, regularizer=reg, metadata=meta,
                  energy_scale=scale, geometry=data_geometry(cfg))


def data_geometry(cfg: Config) -> dict[str, float]:
    """The geometry checks' limits of a configuration (data.min_distance, data.max_extent, Å)."""
    return {"min_distance": cfg.data.min_distance, "max_extent": cfg.data.max_extent}


def own_blocks(sc: StrategyConfig, n_interactions: int) -> int:
    """The interaction blocks each fidelity of a multi-head model owns (strategy.fidelity_blocks)."""
    if sc.fidelity_blocks is None:
        return 1 if n_interactions > 1 else 0
    if sc.fidelity_blocks >= n_interactions:
        raise ConfigError(f"strategy.fidelity_blocks: {sc.fidelity_blocks}, but the network has {n_interactions} "
                          f"interaction block(s) and at least one stays shared: give 0..{n_interactions - 1}")
    return sc.fidelity_blocks


@torch.no_grad()
def warm_start(model: Potential, source: Potential, col: int) -> None:
    """Copy `source`'s network into `model`; every head of `model` starts as `source`'s head
    `col`. Tensors that differ in size (an embedding's wider input) get the overlapping part
    and zeros elsewhere, so that the new model starts out predicting what `source` does."""
    if list(model.species) != list(source.species):
        raise DataError(f"cannot start from a model of species {source.species}: this one has {model.species}")
    dst = model.representation.state_dict()
    for k, v in source.representation.state_dict().items():
        if k in dst:
            region = tuple(slice(0, min(a, b)) for a, b in zip(dst[k].shape, v.shape))
            if dst[k].shape != v.shape:
                dst[k].zero_()
            dst[k][region] = v[region].to(dst[k])
    src_w = source.readout.weight[col].split(source.representation.feature_sizes)
    dst_w = list(model.readout.weight.split(model.representation.feature_sizes, dim=1))
    for d, s_ in zip(dst_w, src_w):
        n = min(d.shape[1], s_.shape[0])
        d[:, :n] = s_[:n].to(d)
    model.readout.bias.fill_(float(source.readout.bias[col]))
    if isinstance(model, BranchedPotential):
        model.sync_tails()  # every fidelity's own blocks start as the source's last blocks


def _freeze(model: Potential, trainable: str) -> None:
    """Leave only the named part trainable: all, head, or last (last block and head)."""
    if trainable == "all":
        return
    for p in model.representation.parameters():
        p.requires_grad_(False)
    if trainable == "last":
        for p in model.representation.blocks[-1].parameters():
            p.requires_grad_(True)
    if isinstance(model, BranchedPotential):  # each fidelity's own blocks are the backbone's last ones
        for p in model.tails.parameters():
            p.requires_grad_(trainable == "last")
