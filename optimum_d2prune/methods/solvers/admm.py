"""ADMM support refinement (ALPS, Meng et al. 2024): move a pruned layer's mask towards a lower layer error.

The OBS sweep picks each column block's mask once, greedily, from saliencies of weights that later columns' updates
then change. ALPS solves the layer problem `min_w (w - w0) H (w - w0)ᵀ s.t. w sparse` by operator splitting: a
dense variable `B` (a ridge solve), a sparse copy `D` (the projection of `B + V/μ` onto the pattern) and a dual `V`,
with the penalty μ raised while the support still moves. Here it starts from the sweep's solution instead of the
dense weights, so it refines a good mask rather than searching from scratch: on SmolLM2's layers at 70 % (blocks 0
and 11 of `max_quality`, 32 x 512 C4 calibration tokens) the refit layer error after 20 steps equals that after 60 to
three digits, and 10 steps give 90-95 % of the gain.

With the block reconstruction, the projections it refits (o_proj, down_proj) run it there instead, on the block
objective `‖W_d X_d − W X_p‖²` (the `target` argument; reconstruction.py): their masks then follow the error the
next block sees.

Work is done in the coordinates where H has a unit diagonal (`b = w·sqrt(diag H)`), in which the Euclidean
projection keeps the entries of largest `|w|·‖x‖` (Wanda's metric) and one μ schedule fits every layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...masks import kth_smallest, lowest_k_mask, nm_mask
from ...patterns import SparsityPattern
from .base import LayerProblem

#: μ at the first step, on the unit-diagonal Hessian. Started from the OBS solution, μ sets how far the first steps
#: may move from it: on the SmolLM2 dev split at 50 % (max_quality), 1.0 for 30 steps moved 0.5-1 % of the mask and
#: gained 1.5 % PPL, 0.3 for 60 steps moved about 7 % and gained 4.6 % (ALPS starts from the dense weights at 0.1)
INITIAL_PENALTY = 0.3
#: every `PENALTY_PERIOD` steps μ grows by a factor that depends on how much of the support changed (ALPS's schedule)
PENALTY_PERIOD = 3
PENALTY_GROWTH = ((0.1, 1.3), (0.005, 1.2), (0.0, 1.1))  # (changed fraction above, factor)


def admm_support(problem: LayerProblem, start: torch.Tensor, mask: torch.Tensor, pattern: SparsityPattern,
                 steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` ADMM iterations from the pruned `start` (`mask`: True = pruned); returns the sparse solution and its
    mask, with exactly as many zeros as `mask` (unstructured, over the whole matrix) or N of every M (N:M).

    `problem.hessian` is the layer's damped H (a tensor); `problem.target`, when given, replaces the linear term
    `dense·H` of the objective (`w H wᵀ − 2 w·target`): the block-level reconstruction's right-hand side, as in
    `refit_surviving_weights` (`problem.dense` is then not read); `problem.dead` marks never-active inputs, pruned
    first as in the sweep. Costs one symmetric eigendecomposition of H, one `[rows, cols] @ [cols, cols]` product per
    step and one `cols³` product per change of μ (every `PENALTY_PERIOD` steps); the projection's threshold is
    searched near the previous step's.
    """
    dense, hessian, dead, target = problem.dense, problem.hessian, problem.dead, problem.target
    scale = torch.diagonal(hessian).sqrt()
    unit = hessian / scale[:, None]
    unit /= scale[None, :]
    if target is None:
        target = (dense.to(start.device, torch.float32) * scale) @ unit  # w0·H in the unit-diagonal coordinates
    else:
        target = target.to(start.device, torch.float32) / scale
    eigvals, eigvecs = torch.linalg.eigh(unit)
    del unit
    count = int(mask.sum())
    sparse = start * scale
    dual = torch.zeros_like(sparse)
    support, penalty, threshold = mask, INITIAL_PENALTY, None
    inverse = _ridge_inverse(eigvals, eigvecs, penalty)
    for step in range(steps):
        free = (target - dual).add_(sparse, alpha=penalty) @ inverse  # B = (w0 H − V + μ D)(H + μI)⁻¹
        shifted = dual.div(penalty).add_(free)
        support, threshold = _project(shifted, pattern, count, dead, threshold)
        sparse = shifted.masked_fill_(support, 0.0)
        dual.add_(free.sub_(sparse), alpha=penalty)
        if (step + 1) % PENALTY_PERIOD == 0:
            changed = float((support ^ mask).sum()) / max(count, 1)
            penalty *= next(factor for above, factor in PENALTY_GROWTH if changed > above or above == 0.0)
            mask = support
            if step + 1 < steps:
                inverse = None  # released before the next one is built
                inverse = _ridge_inverse(eigvals, eigvecs, penalty)
    return sparse.div_(scale), support


def _ridge_inverse(eigvals: torch.Tensor, eigvecs: torch.Tensor, penalty: float) -> torch.Tensor:
    """`(H + μI)⁻¹` from H's eigendecomposition: one `cols³` product per μ, against the `rows·cols²` of each step
    it then takes (applying the eigenbasis twice per step instead costs `2·rows·cols²`)."""
    return (eigvecs / (eigvals + penalty)) @ eigvecs.t()


def _project(values: torch.Tensor, pattern: SparsityPattern, count: int, dead: Optional[torch.Tensor],
             previous: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The mask of the Euclidean projection onto the pattern: prune the smallest magnitudes (dead inputs first).
    Unstructured: also the magnitude threshold, the next step's starting guess (it moves little between steps)."""
    score = values.abs()
    if dead is not None and bool(dead.any()):
        score[:, dead] = float("-inf")
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m), None
    if not 0 < count < score.numel():
        return lowest_k_mask(score, count), None
    threshold = kth_smallest(score.view(-1), count, near=previous)
    return lowest_k_mask(score, count, threshold), threshold
