"""argparse types for numeric flags: a value out of range ends the command at parsing, with
argparse's usage line and exit 2, before anything is read or computed."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from polyfid.numerics import MAX_THREADS


def _flag_type(integer: bool, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """A parser of a whole (`integer`) or finite number for which `ok` holds; `rule` says
    which, in the message."""
    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if integer else 'a number'}, got {text!r}") from None
        if not (integer or math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value if integer else text}")
        return value

    parse.__name__ = "int" if integer else "float"  # argparse names the type in its message
    return parse


def int_in(lo: int, hi: int = MAX_THREADS) -> Callable[[str], int]:
    """A whole number in [lo, hi]."""
    return _flag_type(True, lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def int_at_least(lo: int) -> Callable[[str], int]:
    """A whole number >= lo, with no upper bound (frames, steps, samples)."""
    return _flag_type(True, lambda v: v >= lo, f"a whole number >= {lo}")


def number_at_least(lo: float) -> Callable[[str], float]:
    """A finite number >= lo."""
    return _flag_type(False, lambda v: v >= lo, f"a finite number >= {lo:g}")


def number_above(lo: float) -> Callable[[str], float]:
    """A finite number > lo (strictly): a temperature, a time step, a tolerance that must not be 0."""
    return _flag_type(False, lambda v: v > lo, f"a finite number > {lo:g}")


def positive_number() -> Callable[[str], float]:
    """A finite number > 0."""
    return number_above(0.0)


def number_in(lo: float, hi: float, open_low: bool = False, open_high: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi] (with `open_low`: lo itself refused, `open_high`: hi refused)."""
    interval = f"{'(' if open_low else '['}{lo:g}, {hi:g}{')' if open_high else ']'}"
    return _flag_type(False, lambda v: (lo < v if open_low else lo <= v) and (v < hi if open_high else v <= hi),
                      f"a number in {interval}")
