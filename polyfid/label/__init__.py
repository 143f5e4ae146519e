"""Labelling at several levels of theory: GFN-xTB through tblite, HF/DFT/MP2/CCSD(T)
through PySCF, results kept in a resumable on-disk store that reads back as a data set."""

from polyfid.label.levels import CalculationFailed, Level, LevelError, compute, parse_level
from polyfid.label.runner import CostEstimate, LabelReport, check_frames, estimate_cost, label_frames
from polyfid.label.store import LabelStore, frame_key, structure_key

__all__ = [
    "CalculationFailed",
    "CostEstimate",
    "LabelReport",
    "LabelStore",
    "Level",
    "LevelError",
    "check_frames",
    "compute",
    "estimate_cost",
    "frame_key",
    "label_frames",
    "parse_level",
    "structure_key",
]
