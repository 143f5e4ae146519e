"""The training engine's shape: small functions with few, typed parameters (issue: one
training engine), one run loop that every kind of training subclasses, strategies in a registry."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import polyfid.train
from polyfid.train.config import StrategyConfig
from polyfid.train.descriptor import DescriptorTrainer
from polyfid.train.loop import RunLoop
from polyfid.train.meta import ReptileTrainer
from polyfid.train.strategies import STRATEGIES, Strategy
from polyfid.train.trainer import Trainer

TRAIN = Path(polyfid.train.__file__).parent
MAX_LINES, MAX_PARAMETERS = 80, 8


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    out = []
    for path in sorted(TRAIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((f"{path.name}:{node.lineno} {node.name}", node))
    return out


def test_no_function_in_train_is_long_or_takes_many_parameters():
    found = functions()
    assert len(found) > 50  # the walk sees the package
    long = [name for name, f in found if f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines: {long}"
    many, hidden = [], []
    for name, f in found:
        a = f.args
        params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
        if len(params) > MAX_PARAMETERS:
            many.append(f"{name} ({len(params)})")
        if a.kwarg is not None:
            hidden.append(name)
    assert not many, f"over {MAX_PARAMETERS} parameters: {many}"
    assert not hidden, f"**kwargs: {hidden}"


def test_every_training_runs_on_the_one_loop():
    for cls in (Trainer, ReptileTrainer, DescriptorTrainer):
        assert issubclass(cls, RunLoop)
        assert "fit" not in vars(cls) and "_fit" not in vars(cls), cls  # the loop's own, not a second one


def test_every_configurable_strategy_is_a_registered_class():
    names = set(typing.get_args(typing.get_type_hints(StrategyConfig)["name"])) - {"auto"}
    assert names == set(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name
    source = (TRAIN / "strategies.py").read_text()
    assert 'name == "delta"' not in source and 'name in ("' not in source  # no dispatch on strings
