"""polyfid: machine-learning interatomic potentials from data at several levels of theory.

Layout: `data` (frames, readers, units, batching), `neighbors` (vesin), `models` (one file
per architecture, shared `layers`), `train` (config, losses, trainer, runs), `analysis`
(metrics, plots), `calculators` (ASE), `cli` (one module per command).
"""

from polyfid.api import evaluate, predict, train_model
from polyfid.calculators.ase import PolyfidCalculator
from polyfid.data import DataError, Dataset, Frame, Labels, read
from polyfid.models import load_model, save_model

__version__ = "0.1.0"
__all__ = [
    "DataError", "Dataset", "Frame", "Labels", "PolyfidCalculator", "evaluate", "load_model", "predict",
    "read", "save_model", "train_model",
]
