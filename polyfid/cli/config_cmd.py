"""polyfid config [--finetune]: print every option with its default and meaning."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print all training options with defaults and documentation (--finetune: "
                       "those of a fine-tuning configuration)")
    p.add_argument("--finetune", action="store_true",
                   help="the options of `polyfid finetune CONFIG.yaml` instead of `polyfid train`'s")
    p.set_defaults(func=run)


def run(args) -> int:
    from polyfid.train.config import Config, FinetuneConfig, documented_defaults

    print(documented_defaults(FinetuneConfig if args.finetune else Config), end="")
    return 0
