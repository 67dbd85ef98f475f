"""Non-uniform layer budgets: how the target sparsity is shared between blocks (`sparsity_allocation`).

"uniform" gives every block the configured sparsity (each matrix rounds its own zero count, as always). "owl"
follows OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", 2024): blocks whose Wanda metric `|W_ij|·‖x_j‖` has
more outliers (entries above `M` times the block's mean) keep more weights. With D the blocks' outlier ratios,

    n_l = λ·2·(D_l − min D) / (max D − min D),      s_l = s − (n_l − mean_w(n))

where `mean_w` is weighted by each block's number of targeted weights, so the parameter-weighted mean of the
budgets is exactly s, and every budget lies in [s − 2λ, s + 2λ]. Zero counts are then handed out target by target
with cumulative rounding (`budget_zero_counts`), so the model ends with exactly `round(s · total)` zeros over the
targeted weights. The pure maths lives here; `dense_outlier_ratios` is the one-forward dense pre-pass that OWL
also makes (diagonal statistics only).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .hooks import CapturedBatch, StatisticsCollector
from .masks import round_half_up
from .offload import onloaded

logger = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl")


def outlier_ratio(metrics: Iterable[torch.Tensor], outlier_factor: float) -> float:
    """Fraction of the entries of all `metrics` (one block's Wanda metrics) above `outlier_factor` × their mean.

    Two passes over the matrices instead of one concatenation, so a block of a 70B model needs no extra copy.
    """
    metrics = list(metrics)
    total = sum(m.numel() for m in metrics)
    if not total:
        return 0.0
    mean = sum(float(m.double().sum()) for m in metrics) / total
    above = sum(int((m > outlier_factor * mean).sum()) for m in metrics)
    return above / total


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """OWL budgets: `s_l = s − (n_l − mean_w(n))` with `n` the ratios min-max scaled to [0, 2λ] (module docstring).

    Raises `ValueError` when a budget leaves [0, 1): lower `owl_lambda` then.
    """
    if len(ratios) != len(sizes):
        raise ValueError(f"{len(ratios)} outlier ratios for {len(sizes)} blocks.")
    weighted = [(r, n) for r, n in zip(ratios, sizes) if n > 0]
    if not weighted:
        return [sparsity] * len(ratios)
    low, high = min(r for r, _ in weighted), max(r for r, _ in weighted)
    if high - low <= 0 or lam == 0:
        return [sparsity] * len(ratios)
    scaled = [(r - low) / (high - low) * 2 * lam for r in ratios]
    total = sum(n for _, n in weighted)
    mean = sum(x * n for x, n in zip(scaled, sizes) if n > 0) / total
    budgets = [sparsity - (x - mean) for x in scaled]
    bad = [(i, b) for i, b in enumerate(budgets) if sizes[i] > 0 and not 0 <= b < 1]
    if bad:
        i, b = bad[0]
        raise ValueError(f"OWL gives block {i} a sparsity of {b:.4f}, outside [0, 1) at sparsity {sparsity} with "
                         f"`owl_lambda`={lam}: lower `owl_lambda` (budgets lie within sparsity ± 2·owl_lambda).")
    return budgets


def budget_zero_counts(budgets: Sequence[float], sizes: Sequence[Sequence[int]], sparsity: float) -> list[list[int]]:
    """Zero count of every target (`sizes[block][target]` entries) for per-block `budgets`.

    Cumulative rounding over all targets in order: each count is within one of `budget · size`, and the total is
    exactly `round_half_up(sparsity · total)` (the last counts absorb floating-point drift of the weighted mean).
    """
    total = sum(n for block in sizes for n in block)
    goal = round_half_up(sparsity * total)
    counts: list[list[int]] = []
    ideal = 0.0
    done = 0
    for budget, block in zip(budgets, sizes):
        counts.append([])
        for n in block:
            ideal += budget * n
            target = min(max(round_half_up(ideal), done), done + n)
            counts[-1].append(target - done)
            done = target
    drift = goal - done  # at most a few units of floating-point rounding; fix it on the last targets that can
    for b in reversed(range(len(counts))):
        for i in reversed(range(len(counts[b]))):
            step = max(-counts[b][i], min(drift, sizes[b][i] - counts[b][i]))
            counts[b][i] += step
            drift -= step
    return counts


def weight_metric(weight: torch.Tensor, x_rms: Optional[torch.Tensor]) -> torch.Tensor:
    """Wanda's metric `|W_ij|·‖x_j‖` (`|W|` alone without activation statistics, e.g. for magnitude pruning)."""
    w = weight.detach().float().abs()
    return w if x_rms is None else w * x_rms.to(w.device).unsqueeze(0)


def dense_outlier_ratios(
    blocks: nn.ModuleList,
    targets: list[list],
    captured: list[CapturedBatch],
    device: torch.device,
    outlier_factor: float,
    reduce_stats: Callable[[dict], None] = lambda stats: None,
) -> list[float]:
    """OWL's pre-pass: the dense model's activations run through every block (diagonal statistics only) and each
    block's outlier ratio is measured on its targets. `captured` is left untouched (its hidden states are copied).

    Expert matrices of fused MoE modules are not metered (they still get their block's budget).
    """
    hidden = [b.hidden_states for b in captured]  # replaced, never modified in place
    seq_len = hidden[0].shape[1]
    ratios = []
    for index in tqdm(range(len(blocks)), desc="OWL outlier ratios", unit="block", leave=False):
        block, block_targets = blocks[index], targets[index]
        modules = {t.module_name: t.module for t in block_targets if t.expert is None}
        with onloaded(block, device):
            collector = StatisticsCollector(modules, "diag", device, seq_len)
            try:
                for number, batch in enumerate(captured):
                    batch.use_block(index)
                    collector.token_mask = batch.token_mask
                    out = block(hidden[number].to(device), *batch.args, **batch.kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    hidden[number] = out.to(hidden[number].device)  # stays where the activations are kept
                    collector.end_batch()
            finally:
                collector.remove()
            reduce_stats(collector.stats)
            metrics = []
            for t in block_targets:
                if t.expert is not None:
                    continue
                stats = collector.stats.get(t.module_name)
                x_rms = stats.inputs.x_sq_mean().sqrt() if stats is not None else None
                metrics.append(weight_metric(t.weight(), x_rms))
            ratios.append(outlier_ratio(metrics, outlier_factor))
            collector.free()
    for batch in captured:
        batch.use_block(0)
    return ratios


def weight_outlier_ratios(blocks: nn.ModuleList, targets: list[list], device: torch.device,
                          outlier_factor: float) -> list[float]:
    """Outlier ratios of `|W|` alone (data-free methods: no activations to weigh the weights with)."""
    ratios = []
    for block, block_targets in zip(blocks, targets):
        with onloaded(block, device):
            ratios.append(outlier_ratio([weight_metric(t.weight(), None) for t in block_targets], outlier_factor))
    return ratios
