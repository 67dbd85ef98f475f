"""Attention-distribution awareness: which of q/k/v is left without weight update in a block (METHOD.md §4).

Per block (strategy "layer"), each candidate l ∈ {q, k, v} is scored by

    objective(l) = Σ_{p ∈ q,k,v} relerr(p | l) + ρ · KL(softmax(q̃k̃ᵀ) ‖ softmax(qkᵀ))

where relerr(p | l) is the relative reconstruction error ‖(W_p − W̃_p) X‖² / ‖W_p X‖² of projection p pruned with
the non-update solver if p = l and with the update solver otherwise, and the KL is averaged over the
attention rows (batch × heads × query positions) of a few calibration sequences. Both pruned variants of each
projection are computed anyway from the same statistics and Hessian factorisation, so the choice costs one extra
OBS solve of one projection, three mask-only solves and four attention-probability evaluations per block.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .architectures import PROJECTIONS, ArchitectureAdapter, AttentionInputs
from .report import AttentionRecord
from .solvers import SolverOutput

_EPS = 1e-12  # probability floor inside the logarithms (masked entries are exactly 0)


def attention_kl(
    p: torch.Tensor, log_q: torch.Tensor, query_mask: Optional[torch.Tensor] = None
) -> tuple[float, int]:
    """Sum over attention rows of `KL(p ‖ q)` and the number of rows (`[B, H, Tq, Tk]` probabilities `p`, and
    `log_q = log(q)` computed once per reference).

    `query_mask` (`[B, Tq]`, False on padding) excludes rows of padded queries.
    """
    kl = (p * (p.clamp_min(_EPS).log() - log_q)).sum(-1)  # [B, H, Tq]
    if query_mask is not None and query_mask.shape != (kl.shape[0], kl.shape[2]):  # else padding counts as data
        raise ValueError(f"`query_mask` {tuple(query_mask.shape)} does not match the attention rows [B, Tq] = "
                         f"{(kl.shape[0], kl.shape[2])}.")
    if query_mask is not None:
        rows = query_mask[:, None, :].expand_as(kl).to(kl.device)
        return float(kl[rows].sum()), int(rows.sum())
    return float(kl.sum()), kl.numel()


def candidate_weights(
    chosen: str, updated: dict[str, SolverOutput], non_updated: dict[str, SolverOutput]
) -> dict[str, torch.Tensor]:
    """q/k weights of the block when `chosen` is the projection left without update."""
    return {p: (non_updated if p == chosen else updated)[p].weight for p in ("q", "k")}


def choose_unupdated_projection(
    adapter: ArchitectureAdapter,
    attention: nn.Module,
    inputs: list[AttentionInputs],
    dense: dict[str, torch.Tensor],
    updated: dict[str, SolverOutput],
    non_updated: dict[str, SolverOutput],
    kl_weight: float,
    block: int,
    reduce: Optional[Callable[[list[float]], list[float]]] = None,
) -> AttentionRecord:
    """Evaluate the objective for the three candidates and return the record of the best one.

    `reduce` sums the KL sums and row counts over data-parallel ranks (identity when not distributed).
    """
    errors = {
        c: sum((non_updated if p == c else updated)[p].error for p in PROJECTIONS) for c in PROJECTIONS
    }
    kl_sums = dict.fromkeys(PROJECTIONS, 0.0)
    rows = 0
    for batch_inputs in inputs:
        log_reference = adapter.attention_probs(attention, batch_inputs, dense).clamp_min(_EPS).log()
        for c in PROJECTIONS:
            probs = adapter.attention_probs(attention, batch_inputs, candidate_weights(c, updated, non_updated))
            total, n = attention_kl(probs, log_reference, batch_inputs.token_mask)
            kl_sums[c] += total
        rows += n
    if reduce is not None:
        *sums, rows = reduce([kl_sums[c] for c in PROJECTIONS] + [float(rows)])
        kl_sums = dict(zip(PROJECTIONS, sums))
    kls = {c: kl_sums[c] / max(rows, 1) for c in PROJECTIONS}
    objectives = {c: errors[c] + kl_weight * kls[c] for c in PROJECTIONS}
    chosen = min(PROJECTIONS, key=lambda c: objectives[c])
    return AttentionRecord(block=block, chosen=chosen, strategy="layer", errors=errors, kls=kls, objectives=objectives)
