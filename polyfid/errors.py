"""polyfid's one error hierarchy.

Every error polyfid raises about its input or environment (a file, a frame, an option, a model
file, a calculation, a run that cannot go on) derives from `PolyfidError`; its message names the
file, frame, atoms, key or option and what was expected. The command line prints these as
``polyfid CMD: error: ...`` and exits 2. Anything else escaping polyfid is a bug: the command
line exits 1 with its traceback. ``polyfid --debug CMD`` prints full tracebacks for both.

The classes also derive from the built-in exception a Python caller would expect
(`ValueError`, `RuntimeError`, `KeyError`), so ``except ValueError`` keeps working.
This module imports nothing from polyfid: every layer may use it.
"""

from __future__ import annotations


class PolyfidError(Exception):
    """Base of every error polyfid raises on purpose: bad input, bad options, a failed run."""


class DataError(PolyfidError, ValueError):
    """Malformed, inconsistent or non-physical input data. The message names the file, frame
    (0-based), atoms or key, and what was expected."""


class GeometryError(DataError):
    """A frame whose geometry no neighbour list should see: atoms closer than
    ``data.min_distance``, a molecule wider than ``data.max_extent``, a singular or
    non-finite cell, non-finite positions."""


class ConfigError(PolyfidError, ValueError):
    """An invalid configuration or command-line option; the message names the key path and
    what was expected."""


class ModelFileError(PolyfidError, ValueError):
    """A model or checkpoint file that cannot be loaded: missing, truncated, foreign, written by
    an incompatible polyfid, or holding non-finite weights."""


class FidelityError(PolyfidError, KeyError):
    """A fidelity (level of theory) asked of a model or data set that does not have it."""

    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0]) if self.args else ""


class LevelError(PolyfidError, ValueError):
    """An unknown or unavailable level of theory, or a structure it cannot compute (e.g. a
    charge and multiplicity of the wrong parity)."""


class CalculationFailed(PolyfidError, RuntimeError):
    """A quantum-chemistry calculation that failed for one structure (recorded, not fatal)."""


class LabellingAborted(PolyfidError, RuntimeError):
    """A labelling run that cannot go on (a worker process died, e.g. killed for memory); every
    result finished before is in the store, and rerunning the command continues."""


class SourceError(PolyfidError, ValueError):
    """A structure source (SMILES, file) that cannot be turned into structures."""


class TrainingDiverged(PolyfidError, RuntimeError):
    """A non-finite loss or gradient: training stopped, the last finite checkpoint kept. The
    message names the step, the batch's frames and the options to change."""
