"""Wanda (Sun et al. 2024): mask by `|w|·‖x‖` per output row, no weight update."""

from __future__ import annotations

from .base import PruningMethod
from .registry import register_method
from .solvers import WandaSolver


@register_method
class WandaMethod(PruningMethod):
    name = "wanda"

    def setup(self, seq_len: int) -> None:
        self.solver = WandaSolver()
