"""Solvers: pure maths on one weight matrix and its statistics (see `base.Solver`), and the method registry
(`registry.register_method`). Every module of this package is imported, so a new solver file registers itself."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from .base import DualTaylor, Solver, SolverOutput, relative_error
from .magnitude import MagnitudeSolver
from .obs import OBSSolver, inverse_hessian_cholesky
from .registry import METHOD_REGISTRY, register_method
from .wanda import WandaSolver

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

if TYPE_CHECKING:
    from ..configuration import D2PruneConfig

__all__ = [
    "METHOD_REGISTRY",
    "DualTaylor",
    "MagnitudeSolver",
    "OBSSolver",
    "Solver",
    "SolverOutput",
    "WandaSolver",
    "inverse_hessian_cholesky",
    "register_method",
    "relative_error",
    "solvers_for",
]


def solvers_for(config: "D2PruneConfig", seq_len: int) -> tuple[Solver, Solver]:
    """`(update_solver, non_update_solver)` for a config, from the method registry: the solvers for updated layers
    and for the layer(s) left without weight update. Baselines use the same solver for both."""
    try:
        factory = METHOD_REGISTRY[config.method]
    except KeyError:
        raise ValueError(f"`method` must be one of {tuple(METHOD_REGISTRY)}, got {config.method!r}.") from None
    return factory(config, seq_len)
