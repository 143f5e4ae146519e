"""polyfid invariants [--l-max L] [--max-tensors N] [--check INV ...] [--json]"""

from __future__ import annotations

import json

from polyfid.cli.args import int_at_least, int_in, number_in


def add_parser(sub) -> None:
    p = sub.add_parser(
        "invariants",
        help="find a functionally independent, complete set of Cartesian tensor invariants",
        description="Enumerate the rotation invariants of tensors s, v, Q, T (orders 0..L) with up to N factors "
        "as contraction multigraphs (no duplicates up to isomorphism), keep greedily those that raise the rank "
        "of their float64 Jacobian at random points, and compare with the rank completeness requires (degrees "
        "of freedom minus the rotation-orbit dimension). Also: the table for every smaller (L, N) and the "
        "degenerate points (tensors zero, tetrahedral, linear, trigonal environments) with the extra "
        "invariants that restore the rank there.",
    )
    p.add_argument("--l-max", type=int_in(0, 3), default=3, help="highest tensor order L, 0..3 (default 3)")
    p.add_argument("--max-tensors", type=int_in(1, 6), default=4, help="most factors per invariant N, 1..6 (default 4)")
    p.add_argument("--points", type=int_at_least(1), default=2,
                   help="random points a decision must hold at, 1 or more (default 2)")
    p.add_argument("--tol", type=number_in(0.0, 1.0, open_low=True), default=1e-8,
                   help="relative tolerance of the numerical rank, > 0 and <= 1 (default 1e-8)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    p.add_argument("--check", nargs="+", metavar="INV",
                   help='rank of your own set, in index notation, e.g. "v_a v_a" "v_a Q_ab v_b"')
    p.add_argument("--no-degenerate", action="store_true", help="skip the degenerate-point analysis")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from polyfid.errors import DataError
    from polyfid.invariants import invariant_report

    try:
        r = invariant_report(args.l_max, args.max_tensors, args.points, args.seed, args.tol, args.check,
                             degenerate=not args.no_degenerate)
    except ValueError as e:
        raise DataError(str(e)) from e
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"L = {r['l_max']}, N = {r['max_tensors']}: {r['candidates']} candidates, {r['selected']} selected, "
          f"{r['required']} required ({'complete' if r['complete'] else 'incomplete'})")
    print(f"rank gap: smallest new direction kept {r['gap']['smallest_kept']:.2e}, "
          f"largest rejected {r['gap']['largest_rejected']:.2e} (tolerance {r['tolerance']:.0e})")
    for d in r["decisions"]:
        print(f"  {'keep' if d['kept'] else 'drop'}  {d['new_direction']:.2e}  {d['candidate']}")
    print("\n  L  N  candidates  selected  required")
    for row in r["table"]:
        counts = f"{row['candidates']:10d}  {row['selected']:8d}  {row['required']:8d}"
        print(f"  {row['l_max']}  {row['max_tensors']}  {counts}")
    if "check" in r:
        c = r["check"]
        print(f"\nyour {len(c['invariants'])} invariants: rank {c['rank']} of {c['required']} required")
    for name, d in r.get("degenerate", {}).get("points", {}).items():
        extra = "; restored by: " + ", ".join(d["restoring_candidates"]) if d["restoring_candidates"] else ""
        print(f"\n{name}: selected set rank {d['rank_selected']}, all candidates (N ≤ "
              f"{r['degenerate']['pool_max_tensors']}) {d['rank_all_candidates']}{extra}")
    return 0
