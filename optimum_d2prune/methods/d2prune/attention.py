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

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ...architectures import PROJECTIONS, ArchitectureAdapter, AttentionInputs
from ...patterns import SparsityPattern
from ...report import AttentionRecord
from ..solvers import Solver, SolverOutput

_EPS = 1e-12  # probability floor inside the logarithms (masked entries are exactly 0)

#: the projections that shape the attention probabilities (v only enters the attention output)
SCORE_PROJECTIONS = ("q", "k")


def attention_kl(
    p: Optional[torch.Tensor], log_q: torch.Tensor, query_mask: Optional[torch.Tensor] = None,
    log_p: Optional[torch.Tensor] = None,
) -> tuple[float, int]:
    """Sum over attention rows of `KL(p ‖ q)` and the number of rows (`[B, H, Tq, Tk]` probabilities `p`, or their
    log `log_p`, and `log_q = log(q)` computed once per reference).

    `query_mask` (`[B, Tq]`, False on padding) excludes rows of padded queries.
    """
    if log_p is None:
        kl = (p * (p.clamp_min(_EPS).log() - log_q)).sum(-1)  # [B, H, Tq]
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if query_mask is not None and query_mask.shape != (kl.shape[0], kl.shape[2]):  # else padding counts as data
        raise ValueError(f"`query_mask` {tuple(query_mask.shape)} does not match the attention rows [B, Tq] = "
                         f"{(kl.shape[0], kl.shape[2])}.")
    if query_mask is not None:
        rows = query_mask[:, None, :].expand_as(kl).to(kl.device)
        return float(kl[rows].sum()), int(rows.sum())
    return float(kl.sum()), kl.numel()


def query_rows(length: int, limit: Optional[int]) -> Optional[torch.Tensor]:
    """`limit` evenly spaced query positions of a `length`-token sequence, last and first included (None: all)."""
    if limit is None or length <= limit:
        return None
    return torch.linspace(length - 1, 0, limit).round().long().unique()  # spaced from the last position


def candidate_weights(
    chosen: str, updated: dict[str, SolverOutput], non_updated: dict[str, SolverOutput]
) -> dict[str, torch.Tensor]:
    """q/k weights of the block when `chosen` is the projection left without update."""
    return {p: (non_updated if p == chosen else updated)[p].weight for p in SCORE_PROJECTIONS}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def split_sequences(inputs: AttentionInputs) -> Iterator[AttentionInputs]:
    """One `AttentionInputs` per sequence of a captured batch, so that only one sequence's `[heads, T, T]`
    probabilities (reference and one candidate) are alive at a time.

    Tensors of two or more dimensions whose first dimension is the batch size are sliced; everything else
    (broadcast masks and position embeddings of batch 1, scalars, 1D positions) is shared. A batch that carries a
    tensor with another leading size (Swin's per-window masks, shared by the images) is kept whole.
    """
    size = inputs.hidden_states.shape[0]
    leading = {v.shape[0] for v in _tensors((inputs.args, inputs.kwargs)) if v.dim() >= 2}
    if size == 1 or leading - {1, size}:  # e.g. Swin: one mask per window position, shared by every image
        yield inputs
        return

    def take(value: Any, i: int) -> Any:
        if isinstance(value, torch.Tensor):
            return value[i : i + 1] if value.dim() >= 2 and value.shape[0] == size else value
        if isinstance(value, tuple):
            return tuple(take(v, i) for v in value)
        if isinstance(value, list):
            return [take(v, i) for v in value]
        return value

    for i in range(size):
        mask = inputs.token_mask
        yield AttentionInputs(take(inputs.args, i), {k: take(v, i) for k, v in inputs.kwargs.items()},
                              None if mask is None else mask[i : i + 1])


def _cloned(value: Any) -> Any:
    """A copy of the tensors in `value`, so that a kept sequence does not pin its whole batch in memory."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


class AttentionInputCapture:
    """Keeps the inputs of an attention module for exactly the first `max_sequences` calibration sequences (the KL
    term), one copied sequence at a time: memory does not depend on the loader's batch size."""

    def __init__(self, attention: nn.Module, max_sequences: int) -> None:
        self.max_sequences = max_sequences
        self.inputs: list[AttentionInputs] = []
        self.token_mask: Optional[torch.Tensor] = None
        self._count = 0
        self._handle = attention.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._count >= self.max_sequences:
            return
        for one in split_sequences(AttentionInputs(args, dict(kwargs), self.token_mask)):
            if self._count >= self.max_sequences:
                break
            self._count += one.hidden_states.shape[0]
            self.inputs.append(AttentionInputs(_cloned(one.args), _cloned(one.kwargs), _cloned(one.token_mask)))

    def remove(self) -> None:
        self._handle.remove()


def choose_unupdated_projection(
    scorer: "AttentionScorer",
    dense: dict[str, torch.Tensor],
    updated: dict[str, SolverOutput],
    non_updated: dict[str, SolverOutput],
    block: int,
) -> AttentionRecord:
    """Evaluate the objective for the three candidates and return the record of the best one.

    The KL is accumulated one sequence and one slice of heads at a time, the slice sized so that one `[h, rows, T]`
    fp32 tensor takes at most `scorer.chunk_bytes` (a few such tensors are alive at once). The KL is a mean over
    attention rows: with `scorer.max_query_rows`, it is estimated on that many evenly spaced query positions of each
    sequence (`query_rows`), so its cost grows as T, not T². `scorer.reduce` sums the KL sums and row counts over
    data-parallel ranks (identity when not distributed). Without an attention module (`scorer.attention` None) the
    choice rests on the reconstruction errors alone.
    """
    adapter, attention, inputs = scorer.adapter, scorer.attention, scorer.inputs
    kl_weight, reduce, chunk_bytes, max_query_rows = (scorer.kl_weight, scorer.reduce, scorer.chunk_bytes,
                                                       scorer.max_query_rows)
    errors = {
        c: sum((non_updated if p == c else updated)[p].error for p in PROJECTIONS) for c in PROJECTIONS
    }
    kl_sums = dict.fromkeys(PROJECTIONS, 0.0)
    rows = 0
    for sequence in (one for batch in inputs for one in split_sequences(batch)):
        reference = adapter.attention_scores(attention, sequence, dense)
        candidates = {c: adapter.attention_scores(attention, sequence, candidate_weights(c, updated, non_updated))
                      for c in PROJECTIONS}
        length = sequence.hidden_states.shape[1]
        rows_kept = query_rows(length, max_query_rows)
        token_mask = sequence.token_mask
        if rows_kept is not None and token_mask is not None:
            token_mask = token_mask.index_select(1, rows_kept.to(token_mask.device))
        num_rows = length if rows_kept is None else len(rows_kept)
        per_head = sequence.hidden_states.shape[0] * num_rows * length * 4
        for heads in reference.chunks(max(1, chunk_bytes // per_head)):
            log_reference = reference.log_probabilities(heads, rows_kept)
            for c in PROJECTIONS:
                total, n = attention_kl(None, log_reference, token_mask,
                                        log_p=candidates[c].log_probabilities(heads, rows_kept))
                kl_sums[c] += total
            rows += n
            del log_reference
        del reference, candidates  # before the next sequence's are built: one sequence's queries alive at a time
    if reduce is not None:
        *sums, rows = reduce([kl_sums[c] for c in PROJECTIONS] + [float(rows)])
        kl_sums = dict(zip(PROJECTIONS, sums))
    kls = {c: kl_sums[c] / max(rows, 1) for c in PROJECTIONS}
    objectives = {c: errors[c] + kl_weight * kls[c] for c in PROJECTIONS}
    chosen = min(PROJECTIONS, key=lambda c: objectives[c])
    return AttentionRecord(block=block, chosen=chosen, strategy="layer", errors=errors, kls=kls, objectives=objectives)


@dataclass
class AttentionScorer:
    """What the KL term needs: the adapter, the block's attention module and its captured inputs (module None:
    the choice is made on reconstruction error alone)."""

    adapter: ArchitectureAdapter
    attention: Optional[nn.Module]
    inputs: list[AttentionInputs]
    kl_weight: float
    reduce: Optional[Callable[[list[float]], list[float]]] = None
    chunk_bytes: int = 64 * 2**20
    max_query_rows: Optional[int] = None


@dataclass
class AttentionPlan:
    """How a block's q/k/v are pruned: the projections left without update, solver outputs already computed while
    choosing (keyed by `(target name, updates_weights)`), and the record for the report."""

    unupdated: set[str] = field(default_factory=set)
    outputs: dict[tuple[str, bool], SolverOutput] = field(default_factory=dict)
    record: Optional[AttentionRecord] = None


@dataclass
class Projections:
    """The q/k/v of one attention module: `qkv` maps "q"/"k"/"v" to prune targets (`.name`, `.weight()`),
    `stats_of(target)` gives their statistics, `patterns` each one's sparsity pattern (non-uniform budgets give each
    its exact count)."""

    qkv: dict[str, Any]
    stats_of: Callable[[Any], Any]
    patterns: dict[str, SparsityPattern]


def plan_attention_updates(skip_update: str, block: int, projections: Projections, solvers: tuple[Solver, Solver],
                           scorer: AttentionScorer) -> AttentionPlan:
    """Decide which of q/k/v is pruned without weight update in one block (METHOD.md §4).

    `skip_update` is "none" (every projection updated), "qkv" (none updated), "q"/"k"/"v" (fixed) or "dynamic": the
    candidates are solved here (one OBS solve without the refit and one mask-only solve per projection), scored by
    `choose_unupdated_projection`, and the two projections kept updated are refit. `solvers` is (update solver,
    non-update solver).
    """
    update_solver, non_update_solver = solvers
    qkv, stats_of, patterns = projections.qkv, projections.stats_of, projections.patterns
    if skip_update == "none" or not qkv:
        return AttentionPlan()
    if skip_update == "qkv":
        return AttentionPlan(set(PROJECTIONS))
    if skip_update in PROJECTIONS:
        return AttentionPlan({skip_update}, record=AttentionRecord(block, skip_update, "fixed"))
    candidate_solver = update_solver.without_refit()  # refit only the two projections kept updated
    updated = {p: candidate_solver.prune(t.weight(), stats_of(t), patterns[p]) for p, t in qkv.items()}
    non_updated = {p: non_update_solver.prune(t.weight(), stats_of(t), patterns[p]) for p, t in qkv.items()}
    dense = {p: qkv[p].weight().detach().float() for p in SCORE_PROJECTIONS}
    record = choose_unupdated_projection(scorer, dense, updated, non_updated, block)
    for p in PROJECTIONS:
        if p != record.chosen:
            updated[p] = update_solver.refit(qkv[p].weight(), updated[p], stats_of(qkv[p]), patterns[p])
    # only the solutions the block keeps: the other three would stay in memory until their targets are written
    outputs = {qkv[p].name: (non_updated if p == record.chosen else updated)[p] for p in PROJECTIONS}
    return AttentionPlan({record.chosen}, outputs, record)
