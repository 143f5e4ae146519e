"""Data model (frames with labels per fidelity), readers, splits and summaries. Units: eV and Å."""

from polyfid.data.frame import Dataset, Frame, Labels
from polyfid.data.readers import READERS, load_dataset, read
from polyfid.data.splits import nested_subsets, random_subset, split_indices
from polyfid.errors import DataError

__all__ = [
    "READERS",
    "DataError",
    "Dataset",
    "Frame",
    "Labels",
    "load_dataset",
    "nested_subsets",
    "random_subset",
    "read",
    "split_indices",
]
