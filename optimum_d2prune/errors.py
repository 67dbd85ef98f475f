"""The errors this library raises for input it cannot use. Each message says what to do instead.

Every class derives from `D2PruneError` and from the built-in exception a caller would expect (`ValueError` for a
bad value or file content, `OSError` for a path that cannot be used), so `except ValueError` keeps working and
`except D2PruneError` catches exactly the refusals of this library. The CLI prints them as one line (exit 2).
"""

from __future__ import annotations


class D2PruneError(Exception):
    """Base class: a refusal of this library, with a message that names a remedy."""


class ConfigError(D2PruneError, ValueError):
    """A `D2PruneConfig` value (or option group) that cannot be used."""


class InputError(D2PruneError, ValueError):
    """Calibration or evaluation data that cannot be used: a file, a record, a batch, an encoding."""


class UnsupportedModelError(D2PruneError, ValueError):
    """The model lacks what the requested pruning needs (a block list, q/k/v, inputs that reach every stack)."""


class CheckpointError(D2PruneError, ValueError):
    """A saved folder, a `d2prune_config.json` record or a resume checkpoint that does not match what it claims."""


class OutputPathError(D2PruneError, OSError):
    """An output folder that would overwrite or delete something this tool did not make, or cannot be written."""


class ModelStateError(D2PruneError, RuntimeError):
    """The in-memory model is in a state pruning cannot start from (e.g. partly pruned by an interrupted run)."""
