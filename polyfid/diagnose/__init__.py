"""When is a neural network worth it? Interpretable (linear, transformed, multilinear, sparse)
against nonlinear regressions on the same cross-validation splits, with learning curves, a
RESET test, the selected formula and a verdict. For potentials (`polyfid.diagnose.potentials`):
ridge on moment-tensor invariants and on HIP-NN's atom features against the networks."""

from polyfid.diagnose.potentials import (
    PotentialDiagnosis,
    diagnose_potential,
    load_potential_data,
    write_potential_report,
)
from polyfid.diagnose.report import plot_learning_curves, write_report
from polyfid.diagnose.tables import EXAMPLES, example, read_table
from polyfid.diagnose.tabular import INTERPRETABLE, NONLINEAR, Diagnosis, diagnose, reset_test

__all__ = ["EXAMPLES", "INTERPRETABLE", "NONLINEAR", "Diagnosis", "diagnose", "example", "plot_learning_curves",
           "read_table", "reset_test", "write_report", "PotentialDiagnosis", "diagnose_potential",
           "load_potential_data", "write_potential_report"]
