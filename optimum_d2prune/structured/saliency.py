"""Group saliencies: which channels / key-value groups of heads to remove (lowest score first). Pure functions.

`groups [G, g]` are the consumer's input columns of each unit (one column per MLP channel; the `g = heads per
group × head_dim` columns of a key/value group's query heads for o_proj). `weight [rows, cols]` is the consumer's
matrix, `stats` its `ConsumerStatistics`.

- d2prune (D²Prune's dual-Taylor saliency, docs/method.md, summed over a group's weights). With compensation the
  base term is the OBS error of removing the group with the kept weights refit, `tr(W_g [(H⁻¹)_gg]⁻¹ W_gᵀ)` (for one
  column `Σ_i w_ij² / [H⁻¹]_jj`, SparseGPT's saliency); groups are removed greedily in `rounds` rounds, each followed
  by the OBS update of the weights and of `H⁻¹`, so later scores see the compensated weights (as the unstructured
  sweep does). Without compensation the base term is `Σ w_ij² ‖x_j‖²` (D²-Wanda's). The activation terms
  `λ1·(‖y_i‖/s)·|w_ij|·(‖x_j‖/s) − λ2·w_ij²·(‖x_j‖/s)²` are added in both cases.
- wanda: `Σ_{i, j∈g} |w_ij|·‖x_j‖` (Wanda's metric summed over the group: Wanda-sp, as in the FLAP paper).
- magnitude: the squared L2 norm of every weight the unit owns (producers' rows and consumer's columns).
- flap: FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024,
  arXiv 2312.11983): the fluctuation `Σ_{j∈g} Var(x_j)·‖W_:,j‖²`, whose removal the bias compensation (the mean)
  absorbs best. FLAP's adaptive per-layer widths are not used: a standard config needs the same width everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .statistics import ConsumerStatistics


@dataclass(frozen=True)
class DualTaylorTerms:
    """The activation terms of the dual-Taylor saliency for one consumer (norms already divided by s)."""

    lambda1: float
    lambda2: float
    x: torch.Tensor  # ‖x_j‖/s [cols]
    y: torch.Tensor  # ‖y_i‖/s [rows]

    @classmethod
    def of(cls, stats: ConsumerStatistics, lambda1: float, lambda2: float, scale: float) -> "DualTaylorTerms":
        y = stats.y_norm() / scale if stats.y_sq is not None else torch.zeros(0)
        return cls(lambda1, lambda2, stats.x_norm() / scale, y)

    @property
    def active(self) -> bool:
        return self.lambda1 != 0.0 or self.lambda2 != 0.0

    def per_column(self, w: torch.Tensor) -> torch.Tensor:
        """`Σ_i (λ1·y_i·|w_ij|·x_j − λ2·w_ij²·x_j²)` for the first `len(x)` columns of `w` `[cols]`."""
        w = w[:, : self.x.numel()]
        x, y = self.x.to(w), self.y.to(w)
        out = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
        if self.lambda1:
            out += self.lambda1 * (y @ w.abs()) * x
        if self.lambda2:
            out -= self.lambda2 * w.square().sum(0) * x.square()
        return out


def group_sum(per_column: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return per_column[groups.to(per_column.device)].sum(1)


def wanda_scores(weight: torch.Tensor, stats: ConsumerStatistics, groups: torch.Tensor) -> torch.Tensor:
    return group_sum(weight.abs().float().sum(0) * stats.x_norm(), groups)


def flap_scores(weight: torch.Tensor, stats: ConsumerStatistics, groups: torch.Tensor) -> torch.Tensor:
    return group_sum(stats.variance() * weight.float().square().sum(0), groups)


def d2prune_scores(weight: torch.Tensor, stats: ConsumerStatistics, groups: torch.Tensor,
                   dual: Optional[DualTaylorTerms]) -> torch.Tensor:
    """The non-update dual-Taylor saliency per group (D²-Wanda's base term)."""
    w = weight.float()
    per_column = w.square().sum(0) * stats.x_norm().square()
    if dual is not None and dual.active:
        per_column = per_column + dual.per_column(w)
    return group_sum(per_column, groups)


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` lowest scores (ties: the lower index), ascending by index."""
    order = torch.argsort(scores, stable=True)
    return order[:count].sort().values


def obs_group_errors(w: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """`tr(W_g [(H⁻¹)_gg]⁻¹ W_gᵀ)` per group: the layer error of removing it with the others refit."""
    if groups.shape[1] == 1:
        cols = groups[:, 0]
        return w[:, cols].square().sum(0) / torch.diagonal(hinv)[cols]
    blocks = hinv[groups[:, :, None], groups[:, None, :]]  # [G, g, g]
    wg = w[:, groups].permute(1, 2, 0)  # [G, g, rows]
    solved = torch.linalg.solve(blocks, wg)
    return (wg * solved).sum((1, 2))


def obs_select(weight: torch.Tensor, hessian: torch.Tensor, groups: torch.Tensor, count: int, rounds: int,
               extra: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Greedy OBS selection of `count` groups in at most `rounds` rounds (see the module docstring).

    `hessian` is the damped `H` over all of `weight`'s columns (which may include a bias's constant input, never in
    `groups`); `extra(w)` adds per-group terms evaluated on the current weights. Returns the removed group indices
    (ascending).
    """
    w = weight.to(hessian.dtype).clone()
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        raise RuntimeError("The damped H is not positive definite; raise `damp_percent`.")
    hinv = torch.cholesky_inverse(factor)
    groups = groups.to(w.device)
    alive = torch.ones(groups.shape[0], dtype=torch.bool, device=w.device)
    removed: list[int] = []
    rounds = max(1, min(rounds, count))
    for r in range(rounds):
        need = count - len(removed)
        if need <= 0:
            break
        take = -(-need // (rounds - r))
        idx = alive.nonzero().squeeze(1)
        scores = obs_group_errors(w, hinv, groups[idx])
        if extra is not None:
            scores = scores + extra(w)[idx]
        chosen = idx[lowest(scores, take)]
        cols = groups[chosen].reshape(-1)
        update = torch.linalg.solve(hinv[cols][:, cols], hinv[cols, :])  # [(H⁻¹)_RR]⁻¹ (H⁻¹)_R,:
        w -= w[:, cols] @ update
        hinv -= hinv[:, cols] @ update
        w[:, cols] = 0
        hinv[cols, :] = 0
        hinv[:, cols] = 0
        alive[chosen] = False
        removed += chosen.tolist()
    return torch.tensor(sorted(removed), dtype=torch.long)
