"""Structured shrinking as a registered method: `D2PruneConfig(method="shrink", sparsity=ratio)` removes that
fraction of the block parameters as whole MLP channels, attention heads, experts or blocks (`ShrinkOptions.mode`),
through the same `D2Pruner` and `optimum-cli d2prune --method shrink`. The work is `structured.shrink`; the engine's
per-matrix loop is not used (the whole run is the method's `prune_model`)."""

from __future__ import annotations

import dataclasses

from ..structured.config import ShrinkOptions, StructuredConfig
from .base import ModelRun, PruningMethod
from .registry import register_method


@register_method
class ShrinkMethod(PruningMethod):
    name = "shrink"
    options_class = ShrinkOptions
    options: ShrinkOptions

    def setup(self, seq_len: int) -> None:
        """Shrinking has no per-matrix solver."""

    def solvers(self) -> list:
        return []

    @property
    def statistics(self) -> str:
        return "none"

    def structured_config(self) -> StructuredConfig:
        values = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(ShrinkOptions)}
        return StructuredConfig(**values, ratio=self.pattern.sparsity)

    def prune_model(self, job: ModelRun):
        """`structured.shrink`: plans (and refuses a ratio the model cannot express) before any work, then shrinks;
        returns its `ShrinkReport`."""
        from ..structured.pipeline import shrink

        return shrink(job.model, job.batches, self.structured_config())
