"""Mask-only solver: Wanda, and D²-Wanda when the dual-Taylor terms are on (no weight update)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ...calibration.statistics import LinearStatistics
from ...masks import nm_mask, rowwise_mask
from ...patterns import SparsityPattern
from .base import DualTaylor, Solver, SolverOutput, relative_error


@dataclass
class WandaSolver(Solver):
    """Wanda's saliency `w_ij² · ‖x_j‖²` (the square of `|w|·‖x‖`, same ranking), compared per output row.

    With the dual-Taylor terms, `S = λ1·s(‖y_i‖)·|w_ij|·s(‖x_j‖) − λ2·w_ij²·s(‖x_j‖)² + w_ij²·‖x_j‖²`. Within one row
    every term is a function of `|w_ij|·‖x_j‖`, so the per-row ranking only changes when λ2 makes the score
    non-monotone; the terms matter for the OBS solver, whose comparison groups span rows.
    """

    dual_taylor: DualTaylor = field(default_factory=DualTaylor)

    statistics = "diag"
    updates_weights = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return "d2-wanda" if self.dual_taylor.active else "wanda"

    def prune(self, weight: torch.Tensor, stats: Optional[LinearStatistics], pattern: SparsityPattern) -> SolverOutput:
        if stats is None:
            raise ValueError(f"{self.name} needs calibration statistics.")
        w = weight.detach().to(device=stats.inputs.device, dtype=torch.float32).clone()
        base = w.square() * stats.x_norm().square()
        dual = self.dual_taylor if self.dual_taylor.active else None
        score = base + dual.extra(w, *dual.prepare(stats)) if dual else base
        mask = nm_mask(score, pattern.n, pattern.m) if pattern.is_nm else rowwise_mask(score, pattern.sparsity)
        flipped = None
        if dual and dual.lambda2 != 0.0:  # with λ2 = 0 every term is monotone in |w|·‖x‖: no flip by construction
            reference = nm_mask(base, pattern.n, pattern.m) if pattern.is_nm else rowwise_mask(base, pattern.sparsity)
            flipped = int((mask & ~reference).sum())
        w[mask] = 0
        return SolverOutput(w, mask, relative_error(weight, w, stats), flipped)
