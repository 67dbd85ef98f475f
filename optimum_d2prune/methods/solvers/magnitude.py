"""Magnitude pruning: the data-free baseline."""

from __future__ import annotations

from typing import Optional

import torch

from ...calibration.statistics import LinearStatistics
from ...masks import lowest_k_mask, nm_mask
from ...patterns import SparsityPattern
from .base import Solver, SolverOutput, relative_error


class MagnitudeSolver(Solver):
    """Prune the smallest `|w|` over the whole matrix (unstructured) or within each N:M group."""

    name = "magnitude"
    statistics = "none"
    updates_weights = False

    def prune(self, weight: torch.Tensor, stats: Optional[LinearStatistics], pattern: SparsityPattern) -> SolverOutput:
        w = weight.detach().float().clone()
        score = w.abs()
        mask = nm_mask(score, pattern.n, pattern.m) if pattern.is_nm else lowest_k_mask(score, pattern.num_zeros(w.numel()))
        w[mask] = 0
        return SolverOutput(w, mask, relative_error(weight, w, stats))
