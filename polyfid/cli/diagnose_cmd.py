"""polyfid diagnose TABLE.csv --target COLUMN [--json] | polyfid diagnose --example NAME"""

from __future__ import annotations

import json

from polyfid.cli.args import int_at_least, int_in, number_in, positive_number

#: largest seed scikit-learn's splitters take (numpy's legacy RandomState)
MAX_SEED = 2**32 - 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="is a neural network worth it? linear/transformed/multilinear/sparse vs nonlinear regressions",
        description="Fit linear, transformed-linear, multilinear, Lasso and SISSO-like models and kernel ridge, "
        "gradient boosting and a small neural network on the same repeated cross-validation splits; learning "
        "curves, a RESET test, the selected formula and a verdict, written as a Markdown report with plots.",
    )
    p.add_argument("table", nargs="?", help="CSV file with a header row")
    p.add_argument("--target", help="the column to predict")
    p.add_argument("--features", nargs="+", help="columns used as variables (default: all others)")
    p.add_argument("--example", choices=["diabetes", "xtb-molecules"], help="a shipped example instead of a table")
    p.add_argument("--out", help="report folder (default: runs/diagnose/<name>)")
    p.add_argument("--quick", action="store_true", help="one repeat, three training sizes, smaller grids")
    p.add_argument("--repeats", type=int_at_least(1),
                   help="repeats of the 5-fold cross-validation (default 3; quick 1)")
    p.add_argument("--min-gain", type=number_in(0.0, 1.0), default=0.10,
                   help="relative error reduction a nonlinear model must show, 0..1 (default 0.10)")
    p.add_argument("--jobs", type=int_in(1), default=1, help="parallel fits (default 1)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group(
        "potentials", "--potential TRAIN --test TEST: linear and multilinear ridge on moment-tensor invariants and a "
        "ridge on HIP-NN's atom features against HIP-NN, as learning curves of test energy and force errors")
    g.add_argument("--potential", metavar="TRAIN", help="training file with energies and forces (any polyfid format)")
    g.add_argument("--test", metavar="TEST", help="test file with energies and forces")
    g.add_argument("--fidelity", help="label set to use (default: the training file's first)")
    g.add_argument("--format", help="reader of both files (default: detected)")
    g.add_argument("--sizes", type=int_at_least(1), nargs="+",
                   help="training-set sizes (default 50 100 250 500 950; --quick: 50 200)")
    g.add_argument("--budget-s", type=positive_number(),
                   help="training time of each network at each size (default 90; quick 20)")
    g.add_argument("--val-size", type=int_at_least(1), default=50,
                   help="validation frames split off the training file (50)")
    g.add_argument("--networks", nargs="+", choices=["hipnn", "hiphop"], default=["hipnn"],
                   help="networks to train (default hipnn)")
    g.add_argument("--no-feature-model", action="store_true", help="skip the ridge on HIP-NN's atom features")
    g.add_argument("--select", help="frames of the training file to use, a slice such as 0:300")
    g.add_argument("--test-select", help="frames of the test file to use (default all; --quick: 0:200)")
    g.add_argument("--radial", choices=["bessel", "gaussian"], default="bessel", help="radial basis (bessel)")
    g.add_argument("--n-radial", type=int_at_least(1), default=8, help="radial functions (8)")
    g.add_argument("--cutoff", type=positive_number(), default=5.0, help="descriptor cutoff, Å (5)")
    g.add_argument("--element-channels", choices=["single", "blind", "pairs"], default="pairs",
                   help="neighbour-element channel blocks (pairs)")
    g.add_argument("--components", type=int_at_least(0), default=20,
                   help="principal components per element whose pairwise products the multilinear model adds (20)")
    g.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="network model option, e.g. --model-set n_features=64 (repeatable)")
    g.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="network training option, e.g. --train-set lr=2e-3 (repeatable)")
    g.add_argument("--threads", type=int_in(1), help="torch CPU threads")
    p.set_defaults(func=run)


def _key_values(items: list[str], option: str) -> dict:
    import yaml

    from polyfid.errors import DataError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"{option} {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_potential(args) -> int:
    """polyfid diagnose --potential TRAIN --test TEST: the descriptor diagnostic of a potential."""
    from pathlib import Path

    from polyfid.diagnose.potentials import (
        DEFAULT_SIZES,
        diagnose_potential,
        load_potential_data,
        write_potential_report,
    )
    from polyfid.errors import DataError

    if not args.test:
        raise DataError("--potential TRAIN needs --test TEST (frames with energies and forces)")
    test_select = args.test_select or ("0:200" if args.quick else None)
    data = load_potential_data(args.potential, args.test, fidelity=args.fidelity, val_size=args.val_size,
                               seed=args.seed, format=args.format, select=args.select, test_select=test_select)
    sizes = args.sizes or ((50, 200) if args.quick else DEFAULT_SIZES)
    budget = args.budget_s if args.budget_s is not None else (20.0 if args.quick else 90.0)
    out = Path(args.out or Path("runs") / "diagnose" / data.name)
    log = None if args.json else print
    d = diagnose_potential(
        data, sizes=sizes, budget_s=budget, networks=args.networks, feature_models=not args.no_feature_model,
        out=out / "networks", radial=args.radial, n_radial=args.n_radial, cutoff=args.cutoff,
        element_channels=args.element_channels, n_components=args.components,
        model_options=_key_values(args.model_set, "--model-set"),
        training_options=_key_values(args.train_set, "--train-set"), min_gain=args.min_gain,
        feature_tangents=6 if args.quick else 9, seed=args.seed, threads=args.threads, log=log)
    report = write_potential_report(d, out, title=data.name)
    return _print(d, report, args.json)


def _print(d, report, as_json: bool, formula: str | None = None) -> int:
    if as_json:
        print(json.dumps(d.to_dict() | {"report": str(report)}, indent=2))
        return 0
    print(f"verdict: {d.verdict}")
    for e in d.evidence:
        print(f"  - {e}")
    if formula is not None:
        print(f"  formula: {formula}")
    print(f"report: {report}")
    return 0


def _check_features(target: str, features: list[str] | None) -> None:
    """ConfigError if --features names the target (y = 1*y) or a column twice."""
    from polyfid.errors import ConfigError

    if not features:
        return
    if target in features:
        raise ConfigError(f"--features: {target!r} is the --target; the target cannot be one of the features "
                          "(leave it out)")
    twice = sorted({f for f in features if features.count(f) > 1})
    if twice:
        raise ConfigError(f"--features: {', '.join(map(repr, twice))} given more than once")


def run(args) -> int:
    from pathlib import Path

    from polyfid.diagnose import diagnose, example, read_table, write_report
    from polyfid.errors import DataError

    if args.potential:
        return run_potential(args)
    if args.example:
        X, y, names, target, unit = example(args.example)
        label = args.example
    else:
        if not args.table or not args.target:
            raise DataError("give TABLE.csv and --target COLUMN, or --example NAME")
        _check_features(args.target, args.features)
        X, y, names = read_table(args.table, args.target, args.features)
        target, unit, label = args.target, "", Path(args.table).stem
    d = diagnose(X, y, names, target=target, quick=args.quick, n_repeats=args.repeats, min_gain=args.min_gain,
                 n_jobs=args.jobs, seed=args.seed)
    out = Path(args.out or Path("runs") / "diagnose" / label)
    report = write_report(d, out, title=label, unit=unit)
    return _print(d, report, args.json, d.formula)
