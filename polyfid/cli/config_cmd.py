"""polyfid config: print every training option with its default and meaning."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print all training options with defaults and documentation")
    p.set_defaults(func=run)


def run(args) -> int:
    from polyfid.train.config import documented_defaults

    print(documented_defaults(), end="")
    return 0
