"""SparseGPT (Frantar & Alistarh 2023): the OBS sweep with lazy batch updates, one solver for every matrix."""

from __future__ import annotations

from .base import PruningMethod
from .options import ObsOptions
from .registry import register_method
from .solvers import OBSSolver


def obs_solver(options: ObsOptions, **kwargs) -> OBSSolver:
    """The OBS solver of `options` (the dual-Taylor terms and diagnostics go through `kwargs`)."""
    return OBSSolver(block_size=options.block_size, damp_percent=options.damp_percent,
                     refit_steps=options.refit_steps, refit_tolerance=options.refit_tolerance,
                     refit_budget=options.refit_budget, admm_steps=options.admm_steps, **kwargs)


@register_method
class SparseGPTMethod(PruningMethod):
    name = "sparsegpt"
    options_class = ObsOptions

    def setup(self, seq_len: int) -> None:
        self.solver = obs_solver(self.options)
