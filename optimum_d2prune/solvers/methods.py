"""The built-in methods: D²Prune (dual-Taylor OBS + dual-Taylor Wanda for the un-updated projection) and the
SparseGPT, Wanda and magnitude baselines (one solver for every layer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import DualTaylor, Solver
from .magnitude import MagnitudeSolver
from .obs import OBSSolver
from .registry import register_method
from .wanda import WandaSolver

if TYPE_CHECKING:
    from ..configuration import D2PruneConfig


@register_method("d2prune")
def d2prune(config: "D2PruneConfig", seq_len: int) -> tuple[Solver, Solver]:
    dual = DualTaylor(config.lambda1, config.lambda2, config.resolve_activation_scale(seq_len))
    return (
        OBSSolver(dual_taylor=dual, block_size=config.block_size, damp_percent=config.damp_percent,
                  refine_steps=config.resolve_refine_steps(), refine_tolerance=config.refine_tolerance,
                  refine_budget=config.refine_steps is None, measure_flips=config.measure_flips,
                  admm_steps=config.admm_steps),
        WandaSolver(dual_taylor=dual),
    )


@register_method("sparsegpt")
def sparsegpt(config: "D2PruneConfig", seq_len: int) -> tuple[Solver, Solver]:
    solver = OBSSolver(block_size=config.block_size, damp_percent=config.damp_percent,
                       refine_steps=config.resolve_refine_steps(), refine_tolerance=config.refine_tolerance,
                       admm_steps=config.admm_steps)
    return solver, solver


@register_method("wanda")
def wanda(config: "D2PruneConfig", seq_len: int) -> tuple[Solver, Solver]:
    solver = WandaSolver()
    return solver, solver


@register_method("magnitude")
def magnitude(config: "D2PruneConfig", seq_len: int) -> tuple[Solver, Solver]:
    solver = MagnitudeSolver()
    return solver, solver
