"""polyfid evaluate MODEL DATA"""

from __future__ import annotations

import json

from polyfid.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="errors of a model on a labelled data file, per fidelity")
    p.add_argument("model", help="model file (model.pt of a run)")
    p.add_argument("data", nargs="+", help="labelled data files or folders; several are merged (the same geometry "
                   "in two files is one frame with both files' label sets)")
    p.add_argument("--format", help="reader name (detected if omitted)")
    p.add_argument("--fidelity", action="append", default=None, metavar="NAME",
                   help="the name of the data's labels (single-level files) or which label set to read (multi-level "
                   "files); once for all files or once per file (several files: unnamed labels take the file stem)")
    p.add_argument("--as", dest="as_fidelity", help="model fidelity the data's labels correspond to")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--parity", help="save a parity plot to this file (PNG, or PDF, SVG, ... by its suffix)")
    p.set_defaults(func=run)


def format_table(metrics: dict) -> str:
    rows = [f"{'fidelity':<16}{'frames':>8}{'E MAE meV':>12}{'E RMSE meV':>12}{'F MAE meV/Å':>13}{'F RMSE meV/Å':>14}"]
    for fid, m in metrics.items():
        if fid.startswith("_"):
            continue
        def g(k, m=m):
            return f"{m[k]:.3f}" if k in m else "-"
        n = m.get("n_energy", m.get("n_forces", 0))
        rows.append(f"{fid:<16}{n:>8}{g('energy_mae_meV'):>12}{g('energy_rmse_meV'):>12}"
                    f"{g('force_mae_meV_A'):>13}{g('force_rmse_meV_A'):>14}")
    return "\n".join(rows)


def run(args) -> int:
    from polyfid.analysis.metrics import public
    from polyfid.api import evaluate
    from polyfid.data.readers import read

    if args.parity:
        from polyfid.analysis.plots import check_figure_path

        check_figure_path(args.parity, "--parity")
    data = read(args.data, format=args.format, fidelity=args.fidelity)
    mapping = None
    if args.as_fidelity:
        if len(data.fidelities) != 1:
            raise ConfigError(f"--as needs one label set in the data; it has {data.fidelities} "
                              "(choose with --fidelity)")
        mapping = {data.fidelities[0]: args.as_fidelity}
    metrics = evaluate(args.model, data, mapping=mapping)
    print(json.dumps(public(metrics), indent=2) if args.json else format_table(metrics))
    if args.parity:
        from polyfid.analysis.plots import plot_parity

        plot_parity(metrics, args.parity, "evaluate")
    return 0
