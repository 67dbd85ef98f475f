"""Solvers: pure maths on one weight matrix and its statistics (see `base.Solver`)."""

from __future__ import annotations

from ..configuration import D2PruneConfig
from .base import DualTaylor, Solver, SolverOutput, relative_error
from .magnitude import MagnitudeSolver
from .obs import OBSSolver, inverse_hessian_cholesky
from .wanda import WandaSolver

__all__ = [
    "DualTaylor",
    "MagnitudeSolver",
    "OBSSolver",
    "Solver",
    "SolverOutput",
    "WandaSolver",
    "inverse_hessian_cholesky",
    "relative_error",
    "solvers_for",
]


def solvers_for(config: D2PruneConfig, seq_len: int) -> tuple[Solver, Solver]:
    """`(update_solver, non_update_solver)` for a config: the solvers for updated layers and for the layer(s) left
    without weight update. Baselines use the same solver for both."""
    if config.method == "magnitude":
        solver = MagnitudeSolver()
        return solver, solver
    if config.method == "wanda":
        solver = WandaSolver()
        return solver, solver
    if config.method == "sparsegpt":
        solver = OBSSolver(block_size=config.block_size, damp_percent=config.damp_percent,
                           refine_steps=config.resolve_refine_steps())
        return solver, solver
    dual = DualTaylor(config.lambda1, config.lambda2, config.resolve_activation_scale(seq_len))
    return (
        OBSSolver(dual_taylor=dual, block_size=config.block_size, damp_percent=config.damp_percent,
                  refine_steps=config.resolve_refine_steps()),
        WandaSolver(dual_taylor=dual),
    )
