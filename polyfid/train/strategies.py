"""Multi-fidelity strategies on one backbone, as a registry of small classes: single,
multi-head, embedding, delta, transfer.

Each takes training and validation data sets whose frames carry labels per fidelity and
leaves a model in `out/model.pt` that predicts at every fidelity it knows. Each strategy owns
its stages; a stage is one run of the run loop (`polyfid.train.stage`). Strategies with two stages
train the base level in `out/base` and the second stage in `out/delta`, `out/finetune` or
`out/train`; a killed run resumes stage by stage. A new strategy is a subclass of `Strategy`
with `@register`, and `strategy.name` in a configuration picks it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from polyfid.data.frame import Dataset
from polyfid.data.merge import files_per_fidelity
from polyfid.errors import DataError
from polyfid.models import (
    BranchedPotential,
    DeltaPotential,
    Potential,
    atomic_write,
    build_potential,
    model_dict,
)
from polyfid.numerics import resolve_device
from polyfid.train.config import (
    Config,
    ConfigError,
    ModelConfig,
    StrategyConfig,
    TrainingConfig,
    from_dict,
)
from polyfid.train.loop import BEST_MODEL, CHECKPOINT, TrainState
from polyfid.train.stage import DTYPES, Stage, data_geometry, freeze, train_stage


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




def second_stage_config(tc: TrainingConfig, overrides: dict[str, Any], from_base_weights: bool) -> TrainingConfig:
    """The training options after the base stage: strategy.second_stage over training; a stage
    that starts from the base model's weights (transfer, multi-head) at a tenth of the learning
    rate unless it is named (fine-tuning at the first stage's rate undid what the base level
    taught: benchmarks/multifidelity.py --phase select)."""
    default = {"lr": tc.lr / 10} if from_base_weights else {}
    return from_dict(TrainingConfig, asdict(tc) | default | dict(overrides), "strategy.second_stage")


# ---- the levels of a run -------------------------------------------------------------------
@dataclass
class StrategyRun:
    """What every strategy works from: the configuration, the data, the run folder, the target
    and base levels, the elements, and an already trained base-level model (or None)."""

    cfg: Config
    train: Dataset
    val: Dataset | None
    out: Path
    resume: bool
    target: str
    base: str | None
    species: list[int]
    base_model: Potential | None = None

    @property
    def geometry(self) -> dict[str, float]:
        return data_geometry(self.cfg)

    def data(self, fidelities: list[str]) -> tuple[Dataset, Dataset | None]:
        """The training and validation frames with their labels at `fidelities` only."""
        return (self.train.restrict(fidelities),
                self.val.restrict(fidelities) if self.val is not None else None)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy to the registry under its `name`."""
    STRATEGIES[cls.name] = cls
    return cls


class Strategy:
    """A way of combining levels of theory: `fit` trains its stages and returns the result.

    two_levels: needs a base level besides the target (delta, transfer); distinct_base: the
    base and the target must differ where the data have several levels."""

    name: ClassVar[str] = ""
    two_levels: ClassVar[bool] = False
    distinct_base: ClassVar[bool] = False

    def __init__(self, run: StrategyRun) -> None:
        self.run = run
        self.stages: dict[str, TrainState] = {}

    @classmethod
    def needs_base(cls, sc: StrategyConfig) -> bool:
        """Whether the training data must have a level besides the target."""
        return cls.two_levels

    def fit(self) -> StrategyResult:
        raise NotImplementedError

    # ---- stages every strategy may use ----------------------------------------------------
    def result(self, model: Potential | DeltaPotential) -> StrategyResult:
        return StrategyResult(model, self.run.out / BEST_MODEL, self.name, self.run.target, self.stages)

    def stage(self, folder: str, model: Potential, fidelities: list[str], spec: Stage) -> Potential:
        """Train `model` on the levels `fidelities` in out/`folder`, recording the stage's state."""
        tr, va = self.run.data(fidelities)
        best, self.stages[folder or "train"] = train_stage(model, tr, va, spec, self.run.cfg.output, self.run.resume)
        return best

    def base_stage(self) -> Potential:
        """The base level alone, in out/base (unless a base model was given); its model."""
        r = self.run
        assert r.base is not None
        if r.base_model is not None:
            if r.base not in r.base_model.fidelities:
                raise ConfigError(f"the given base model has fidelities {r.base_model.fidelities}, not {r.base!r}")
            return r.base_model
        tc, model_cfg = r.cfg.training, asdict(r.cfg.model)
        torch.manual_seed(tc.seed)
        model = build_potential(model_cfg, r.species, [r.base])
        spec = Stage(r.out / "base", tc, model_cfg, {"strategy": "single", "target": r.base}, r.geometry)
        return self.stage("base", model, [r.base], spec)

    def second_stage(self, from_base_weights: bool) -> TrainingConfig:
        """The second stage's training options, the torch seed set from them."""
        tc = second_stage_config(self.run.cfg.training, self.run.cfg.strategy.second_stage, from_base_weights)
        torch.manual_seed(tc.seed)
        return tc

    def metadata(self) -> dict[str, Any]:
        return {"strategy": self.name, "target": self.run.target, "base": self.run.base}

    def finish(self, folder: str, model: Potential) -> StrategyResult:
        """The result of a strategy whose last stage trained in out/`folder`."""
        shutil.copyfile(self.run.out / folder / BEST_MODEL, self.run.out / BEST_MODEL)
        return self.result(model)


@register
class Single(Strategy):
    """One network on the target level."""

    name = "single"

    def fit(self) -> StrategyResult:
        r = self.run
        model_cfg = asdict(r.cfg.model)
        model = build_potential(model_cfg, r.species, [r.target])
        spec = Stage(r.out, r.cfg.training, model_cfg, self.metadata(), r.geometry)
        return self.result(self.stage("", model, [r.target], spec))


@register
class MultiHead(Strategy):
    """One network trained on every level at once, each level with its own head, reference
    energies and last interaction blocks; by default started from a model of the base level."""

    name = "multi-head"
    distinct_base = True

    @classmethod
    def needs_base(cls, sc: StrategyConfig) -> bool:
        return bool(sc.warm_start)

    def warm(self) -> bool:
        """Whether the base level is trained alone first (strategy.warm_start; null: this
        strategy's default), or a base model was given."""
        r, sc = self.run, self.run.cfg.strategy
        if r.base_model is not None:
            return True
        if len(r.train.fidelities) < 2:
            return False
        return sc.warm_start if sc.warm_start is not None else self.name == "multi-head"

    def model_config(self, fidelities: list[str]) -> dict[str, Any]:
        model_cfg = asdict(self.run.cfg.model)
        if len(fidelities) > 1:
            model_cfg["fidelity_blocks"] = own_blocks(self.run.cfg.strategy, self.run.cfg.model.n_interactions)
        return model_cfg

    def training(self, tc: TrainingConfig, ds: Dataset) -> TrainingConfig:
        """The joint stage's options on its data `ds`: frames labelled at the target level make
        up at least strategy.target_share of the draws, unless training.sampling says otherwise."""
        r, sc = self.run, self.run.cfg.strategy
        if tc.sampling or sc.target_share is None or len(ds.fidelities) < 2:
            return tc
        natural = sum(1 for f in ds if r.target in f.labels) / max(len(ds), 1)
        return replace(tc, sampling={r.target: max(sc.target_share, natural)})

    def regularizer(self, model: Potential, fidelities: list[str]) -> Callable[[], torch.Tensor] | None:
        r, lam = self.run, self.run.cfg.strategy.head_tie
        if lam <= 0 or r.base is None:
            return None
        b = fidelities.index(r.base)
        return lambda: lam * model.head_tie_penalty(b)

    def fit(self) -> StrategyResult:
        r = self.run
        if not self.warm():
            return self.result(self.joint(r.out, r.cfg.training, None))
        if r.resume and r.base_model is None and (r.out / CHECKPOINT).exists() and not (r.out / "base").exists():
            raise ConfigError(  # a folder of the one-stage default these strategies had
                f"{r.out} holds the checkpoint of a one-stage {self.name} run, and strategy {self.name!r} now trains "
                "the base level first (in base/) then every level (in train/): to resume that run as it was, set "
                "strategy.warm_start: false, fidelity_blocks: 0 and target_share: null; or train into a new folder")
        base_model = self.base_stage()
        tc = self.second_stage(from_base_weights=self.name == "multi-head")
        return self.finish("train", self.joint(r.out / "train", tc, base_model))

    def joint(self, out: Path, tc: TrainingConfig, start: Potential | None) -> Potential:
        """Every level at once in `out`, from `start`'s weights if given."""
        r = self.run
        fids = r.train.fidelities
        model_cfg = self.model_config(fids)
        model = build_potential(model_cfg, r.species, fids)
        scale = None
        if start is not None:
            col = start.head_index(r.base)
            warm_start(model, start, col)
            scale = start.energy_scale[col]  # copied head weights were learnt at the base level's scale
        spec = Stage(out, self.training(tc, r.train.restrict(fids)), model_cfg, self.metadata(), r.geometry,
                     energy_scale=scale, regularizer=self.regularizer(model, fids))
        return self.stage("train" if start is not None else "", model, fids, spec)


@register
class Embedding(MultiHead):
    """One network and one head for every level, the level a learned embedding in the input."""

    name = "embedding"
    distinct_base = False

    def model_config(self, fidelities: list[str]) -> dict[str, Any]:
        return asdict(self.run.cfg.model) | {"fidelity_embedding": self.run.cfg.strategy.embedding_dim}

    def training(self, tc: TrainingConfig, ds: Dataset) -> TrainingConfig:
        return tc

    def regularizer(self, model: Potential, fidelities: list[str]) -> None:
        return None


@register
class Delta(Strategy):
    """A base model of the low level, then a second model of target − base where frames have both."""

    name = "delta"
    two_levels = distinct_base = True

    def fit(self) -> StrategyResult:
        r = self.run
        base_model = self.base_stage()
        tc = self.second_stage(from_base_weights=False)
        tr = r.train.delta(r.target, r.base)
        if not len(tr):
            raise DataError(_no_shared_geometry(r.train, r.target, r.base, r.cfg.data.merge_tolerance))
        va = r.val.delta(r.target, r.base) if r.val is not None else None
        model_cfg = asdict(r.cfg.model)
        d_cfg = asdict(from_dict(ModelConfig, model_cfg | dict(r.cfg.strategy.delta_model), "strategy.delta_model"))
        meta = self.metadata() | r.geometry
        spec = Stage(r.out / "delta", tc, d_cfg, meta, r.geometry)
        delta, self.stages["delta"] = train_stage(build_potential(d_cfg, r.species, [r.target]), tr, va, spec,
                                                  r.cfg.output, r.resume)
        b = base_model.to(dtype=DTYPES[r.cfg.training.dtype],
                          device=resolve_device(tc.device, "strategy.second_stage.device"))
        model = DeltaPotential(b, delta, r.target, r.base)
        model.geometry_limits = r.geometry
        b_cfg = getattr(base_model, "model_config", None) or model_cfg
        atomic_write(model_dict(model, {"base": b_cfg, "delta": d_cfg}, meta), r.out / BEST_MODEL)
        return self.result(model)


@register
class Transfer(Strategy):
    """Pre-train on the base level, fine-tune on the target level."""

    name = "transfer"
    two_levels = distinct_base = True

    def fit(self) -> StrategyResult:
        r = self.run
        base_model = self.base_stage()
        tc = self.second_stage(from_base_weights=True)
        model_cfg = asdict(r.cfg.model)
        model = build_potential(model_cfg, r.species, [r.target])
        col = base_model.head_index(r.base)
        warm_start(model, base_model, col)
        freeze(model, r.cfg.strategy.trainable)
        spec = Stage(r.out / "finetune", tc, model_cfg, self.metadata() | r.geometry, r.geometry,
                     energy_scale=base_model.energy_scale[col])
        return self.finish("finetune", self.stage("finetune", model, [r.target], spec))


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
    name = sc.name if sc.name != "auto" else "single" if len(fids) == 1 else "multi-head"
    cls = STRATEGIES[name]
    if cls.distinct_base and len(fids) > 1 and base == target:
        raise ConfigError(f"strategy.base and strategy.target are both {target!r}")
    if cls.needs_base(sc) and base is None:
        raise ConfigError(f"strategy {name!r}{' with warm_start' if sc.warm_start else ''} needs two fidelities "
                          f"in the training data; it has {fids}")
    return name, target, base


def fit_strategy(
    cfg: Config,
    train_ds: Dataset,
    val_ds: Dataset | None,
    out: str | Path,
    resume: bool = False,
    base_model: Potential | None = None,
) -> StrategyResult:
    """Train as `cfg.strategy` says; the final model is written to out/model.pt.

    base_model: an already trained base-level model for the strategies that train one (its
    stage is then skipped; e.g. one low-level model shared by several high-level subsets)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name, target, base = resolve_levels(cfg.strategy, train_ds)
    for option in ("sampling", "fidelity_weights"):  # a misspelt level would silently weigh nothing
        unknown = set(getattr(cfg.training, option)) - set(train_ds.fidelities)
        if unknown:
            raise ConfigError(f"training.{option} names fidelities {sorted(unknown)} absent from the training data "
                              f"({train_ds.fidelities})")
    species = sorted(set().union(*[set(s.elements) for s in (train_ds, val_ds) if s is not None]))
    torch.manual_seed(cfg.training.seed)
    run = StrategyRun(cfg, train_ds, val_ds, out, resume, target, base, species, base_model)
    return STRATEGIES[name](run).fit()


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
