"""Solvers: pure maths on one weight matrix and its statistics (see `base.Solver`). No model, no hooks."""

from .base import DualTaylor, Solver, SolverOutput, relative_error
from .magnitude import MagnitudeSolver
from .obs import OBSSolver, inverse_hessian_cholesky
from .wanda import WandaSolver

__all__ = ["DualTaylor", "MagnitudeSolver", "OBSSolver", "Solver", "SolverOutput", "WandaSolver",
           "inverse_hessian_cholesky", "relative_error"]
