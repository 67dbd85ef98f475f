"""The solver contract: a weight and its statistics in, a pruned weight and its mask out. No model, no hooks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from ...calibration.statistics import InputStatistics, LinearStatistics
from ...patterns import SparsityPattern


@dataclass(frozen=True)
class DualTaylor:
    """The activation terms of the dual-Taylor saliency (METHOD.md §2).

    `extra(w) = λ1 · (‖y_i‖/s) · |w_ij| · (‖x_j‖/s) − λ2 · w_ij² · (‖x_j‖/s)²`, added to the base saliency of the
    solver. `lambda1 = lambda2 = 0` switches it off and the solver reduces exactly to its baseline.
    """

    lambda1: float = 0.0
    lambda2: float = 0.0
    scale: float = 1500.0

    @property
    def active(self) -> bool:
        return self.lambda1 != 0.0 or self.lambda2 != 0.0

    def prepare(self, stats: LinearStatistics) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scaled norms `(‖x‖/s [cols], ‖y‖/s [rows, 1] or None)` for `extra`."""
        x = stats.x_norm() / self.scale
        y = stats.y_norm().unsqueeze(1) / self.scale if self.lambda1 != 0.0 else None
        return x, y

    def coefficients(
        self, x: torch.Tensor, y: Optional[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """`(λ1 · y ⊗ x [rows, cols], λ2 · x² [cols])` for a slice of `prepare`'s norms (None for a zero λ): the
        part of `extra` that does not depend on the weights, computed once per column block by the OBS sweep."""
        linear = self.lambda1 * y * x if self.lambda1 != 0.0 else None
        quadratic = self.lambda2 * x.square() if self.lambda2 != 0.0 else None
        return linear, quadratic

    @staticmethod
    def apply(w: torch.Tensor, linear: Optional[torch.Tensor], quadratic: Optional[torch.Tensor]) -> torch.Tensor:
        """Activation terms of `w` from its `coefficients`: `linear · |w| − quadratic · w²`."""
        out = w.abs().mul_(linear) if linear is not None else torch.zeros_like(w)
        if quadratic is not None:
            out.sub_(w.square().mul_(quadratic))
        return out

    def extra(self, w: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """Activation terms for a `[rows, cols]` slice `w`, given the matching slices of `prepare`'s norms."""
        return self.apply(w, *self.coefficients(x, y))


@dataclass
class LayerProblem:
    """The least-squares problem of one matrix: `min_w (w − w0) H (w − w0)ᵀ` over its surviving entries, or, with
    `target`, the normal equations `w H = target` (the block reconstruction's right-hand side `W_d C + δW_d`)."""

    dense: torch.Tensor  # w0, the weights before pruning
    hessian: Union[torch.Tensor, "InputStatistics"]  # the damped H, or statistics holding it
    target: Optional[torch.Tensor] = None
    dead: Optional[torch.Tensor] = None  # never-active inputs (ADMM prunes them first)


@dataclass
class SolverOutput:
    """Result of pruning one weight matrix (or one row block of it)."""

    weight: torch.Tensor  # fp32, pruned (and updated, for OBS solvers)
    mask: torch.Tensor  # bool, True where the weight was pruned
    error: float  # relative reconstruction error ‖(W - W')X‖² / ‖WX‖² on the calibration data
    flipped: Optional[int] = None  # mask entries the dual-Taylor terms changed, where it was measured


class Solver(ABC):
    """Prunes one weight matrix from its calibration statistics.

    Attributes:
        name: short name shown in reports.
        statistics: what the engine must collect: "hessian" (X Xᵀ), "diag" (sum of x²) or "none".
        updates_weights: whether surviving weights are changed (OBS family) or only masked (Wanda family).
        admm_steps: steps of mask search after the sweep (0 for solvers without one); a block-level refiner runs
            them on its own objective for the matrices it takes over.
    """

    name: ClassVar[str]
    statistics: ClassVar[str]
    updates_weights: ClassVar[bool]
    admm_steps: int = 0

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: Optional[LinearStatistics], pattern: SparsityPattern) -> SolverOutput:
        """Return the pruned weight; `weight` itself is not modified."""

    def without_refit(self) -> "Solver":
        """The same solver minus its final refit and mask search (to score candidates cheaply, or when a block-level
        refiner decides the matrix's final mask and weights)."""
        return self

    def refit(self, weight: torch.Tensor, out: SolverOutput, stats: Optional[LinearStatistics],
              pattern: SparsityPattern) -> SolverOutput:
        """Apply what `without_refit` skipped (identity for solvers without a refit)."""
        return out


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, stats: Optional[LinearStatistics]) -> float:
    """`‖(W - W')X‖² / ‖Y‖²` on the calibration data (Y: the dense outputs).

    Exact with a Hessian; with diagonal statistics the numerator uses the diagonal approximation.
    """
    if stats is None:
        return float("nan")
    delta = weight.detach().to(new_weight.device, torch.float32) - new_weight
    if stats.inputs.has_hessian:
        num = (stats.inputs.gram_matmul(delta) * delta).sum()
    else:
        num = (delta.square() * stats.inputs.x_sq).sum()
    den = stats.y_sq.sum() if stats.y_sq is not None else float("nan")
    return float(num / den) if den > 0 else 0.0
