"""polyfid scan MODEL PATH [PATH ...] [--fidelity F] [--reference NAME] [--format FMT] [--tolerance-meV X]
[--plot FILE] [--json FILE]"""

from __future__ import annotations

import json
from pathlib import Path

from polyfid.cli.args import number_at_least


def add_parser(sub) -> None:
    p = sub.add_parser("scan", help="smoothness of a model along ordered scan paths (normal mode, stretch, torsion) "
                       "against the paths' reference labels")
    p.add_argument("model", help="model file (model.pt of a run)")
    p.add_argument("paths", nargs="+", help="ordered path files with reference energies, one scan each")
    p.add_argument("--format", help="reader name (detected if omitted)")
    p.add_argument("--fidelity", help="the model's head to scan (default: --reference if it names a head, else "
                   "the model's default level)")
    p.add_argument("--reference", help="label set of the path files to compare with: the name given to the labels "
                   "of single-level files, the level chosen in multi-level ones (default: the only one)")
    p.add_argument("--tolerance-meV", type=number_at_least(0.0), default=1.0,
                   help="wiggles up to this size are no extrema (meV)")
    p.add_argument("--plot", help="PNG of energies and errors along the scan (several paths: _STEM added per path)")
    p.add_argument("--json", help="write the reports (no arrays) to this JSON file, keyed by path stem")
    p.set_defaults(func=run)


TABLE = ("{:<28}{:>7}{:>11}{:>11}{:>9}{:>13}{:>9}{:>10}{:>10}{:>9}",
         ("path", "frames", "E MAE meV", "raw meV", "max meV", "Δ² RMSE meV", "extrema", "reference", "spurious",
          "missing"))


def run(args) -> int:
    from polyfid.analysis.smoothness import plot_scan, scan_report
    from polyfid.api import align_fidelities
    from polyfid.data.readers import read
    from polyfid.errors import DataError
    from polyfid.models import load_model

    if args.plot:
        from polyfid.analysis.plots import check_figure_path

        check_figure_path(args.plot, "--plot")
    model = load_model(args.model)
    fid = args.fidelity or (args.reference if args.reference in model.fidelities else None)
    head = model.fidelities[model.head_index(fid)]
    names = [Path(p).stem for p in args.paths]
    if len(set(names)) < len(names):  # the same file name in two folders: number them
        names = [f"{k}_{n}" for k, n in enumerate(names)]
    fmt, columns = TABLE
    print(fmt.format(*columns))
    reports = {}
    for path, name in zip(args.paths, names):
        data = read(path, format=args.format, fidelity=args.reference)
        labels = data.fidelities
        if len(labels) > 1 and head not in labels:
            raise DataError(f"{path}: label sets {labels}; choose the reference with --reference")
        if labels:  # the path's label set answers for the scanned head, as `polyfid evaluate --as` maps it
            align_fidelities(data, model, {labels[0]: head} if len(labels) == 1 else None)
        r = reports[name] = scan_report(model, data, fidelity=head, tolerance_meV=args.tolerance_meV)
        print(fmt.format(name[-27:], r.n_frames, f"{r.energy_mae_meV:.2f}", f"{r.energy_mae_raw_meV:.2f}",
                         f"{r.energy_max_error_meV:.2f}", f"{r.second_difference_rmse_meV:.2f}",
                         len(r.model_extrema), len(r.reference_extrema), r.spurious_extrema, r.missing_extrema))
        if args.plot:
            out = Path(args.plot)
            target = out if len(args.paths) == 1 else out.with_name(f"{out.stem}_{name}{out.suffix}")
            plot_scan({head: r}, target, f"{Path(path).stem}: {head}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
    return 0
