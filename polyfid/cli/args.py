"""argparse types for numeric flags: a value out of range ends the command at parsing, with
argparse's usage line and exit 2, before anything is read or computed."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: most threads or processes a flag takes (torch.set_num_threads(100000) crashes the process)
MAX_THREADS = 1024


def int_in(lo: int, hi: int = MAX_THREADS) -> Callable[[str], int]:
    """A whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message
    return parse


def number_at_least(lo: float) -> Callable[[str], float]:
    """A finite number >= lo."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {lo:g}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def int_at_least(lo: int) -> Callable[[str], int]:
    """A whole number >= lo, with no upper bound (frames, steps, samples)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {lo}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def number_above(lo: float) -> Callable[[str], float]:
    """A finite number > lo (strictly): a temperature, a time step, a tolerance that must not be 0."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value <= lo:
            raise argparse.ArgumentTypeError(f"must be a finite number > {lo:g}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def positive_number() -> Callable[[str], float]:
    """A finite number > 0."""
    return number_above(0.0)


def number_in(lo: float, hi: float, open_low: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi] (with `open_low`: in (lo, hi], lo itself refused)."""
    interval = f"{'(' if open_low else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi or (open_low and value == lo):
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    parse.__name__ = "float"
    return parse
