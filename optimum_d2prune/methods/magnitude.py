"""Magnitude pruning: the data-free baseline (no calibration pass at all)."""

from __future__ import annotations

from .base import PruningMethod
from .registry import register_method
from .solvers import MagnitudeSolver


@register_method
class MagnitudeMethod(PruningMethod):
    name = "magnitude"

    def setup(self, seq_len: int) -> None:
        self.solver = MagnitudeSolver()
