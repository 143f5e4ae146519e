"""polyfid scan MODEL PATH [PATH ...] [--fidelity F] [--plot FILE] [--json FILE]"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("scan", help="smoothness of a model along ordered scan paths (normal mode, stretch, torsion) "
                       "against the paths' reference labels")
    p.add_argument("model", help="model file (model.pt of a run)")
    p.add_argument("paths", nargs="+", help="ordered path files with reference energies")
    p.add_argument("--format", help="reader name (detected if omitted)")
    p.add_argument("--fidelity", help="the model's head to scan (default: the model's default level)")
    p.add_argument("--reference", help="label set of the path files to compare with (default: the only one)")
    p.add_argument("--tolerance-meV", type=float, default=1.0, help="wiggles smaller than this are no extrema")
    p.add_argument("--plot", help="PNG with every path's energies and errors (one file per path: _NAME added)")
    p.add_argument("--json", help="write the reports to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    from polyfid.analysis.smoothness import plot_scan, scan_report
    from polyfid.api import _as_model
    from polyfid.data.readers import read

    model = _as_model(args.model)
    fid = args.fidelity or model.fidelities[model.head_index(None)]
    reports = {}
    print(f"{'path':<28}{'frames':>7}{'E MAE meV':>11}{'max meV':>9}{'Δ² RMSE meV':>13}{'extrema':>9}"
          f"{'reference':>10}{'spurious':>9}")
    for path in args.paths:
        ds = read(path, format=args.format, fidelity=args.reference)
        if len(ds.fidelities) != 1:
            raise KeyError(f"{path}: label sets {ds.fidelities}; choose one with --reference")
        ds.rename_fidelity(ds.fidelities[0], fid)
        r = scan_report(model, ds, fidelity=fid, tolerance_meV=args.tolerance_meV)
        reports[Path(path).stem] = r
        print(f"{Path(path).stem[:27]:<28}{r.n_frames:>7}{r.energy_mae_meV:>11.2f}{r.energy_max_error_meV:>9.2f}"
              f"{r.second_difference_rmse_meV:>13.2f}{len(r.model_extrema):>9}{len(r.reference_extrema):>10}"
              f"{r.spurious_extrema:>9}")
        if args.plot:
            out = Path(args.plot)
            target = out if len(args.paths) == 1 else out.with_name(f"{out.stem}_{Path(path).stem}{out.suffix}")
            plot_scan({fid: r}, target, Path(path).stem)
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
    return 0
