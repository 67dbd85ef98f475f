"""Allocation rules: how the target sparsity is shared between blocks (`allocation`), and the registry of rules.

"uniform" gives every block the configured sparsity (each matrix rounds its own zero count, as always). "owl"
follows OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", 2024): blocks whose Wanda metric `|W_ij|·‖x_j‖` has
more outliers (entries above `M` times the block's mean) keep more weights. With D the blocks' outlier ratios,

    n_l = λ·2·(D_l − min D) / (max D − min D),      s_l = s − (n_l − mean_w(n))

where `mean_w` is weighted by each block's number of targeted weights, so the parameter-weighted mean of the
budgets is exactly s, and every budget lies in [s − 2λ, s + 2λ]. Zero counts are then handed out target by target
with cumulative rounding (`budget_zero_counts`), so the model ends with exactly `round(s · total)` zeros over the
targeted weights. The pure maths lives here; `dense_outlier_ratios` is the one-forward dense pre-pass that OWL
also makes (diagonal statistics only). A rule returns per-block budgets; `budget_patterns` turns them into each
target's exact pattern.

A new rule is one class registered with `register_allocation` (its options dataclass rides along):

```python
@register_allocation
class MyRule(AllocationRule):
    name = "my-rule"
    def budgets(self, job):
        return [job.sparsity] * len(job.blocks)
```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hooks import StatisticsCollector
from ..errors import ConfigError
from ..patterns import SparsityPattern, round_half_up
from ..pipeline.capture import CapturedBatch
from ..pipeline.offload import onloaded
from ..validation import OptionGroup
from .options import ALLOCATION_OPTIONS, OwlOptions, UniformOptions

logger = logging.getLogger(__name__)

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

    Raises `ConfigError` when a budget leaves [0, 1): lower the deviation then.
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
        raise ConfigError(f"OWL gives block {i} a sparsity of {b:.4f}, outside [0, 1) at sparsity {sparsity} with "
                          f"`deviation`={lam}: lower `allocation_options['deviation']` (budgets lie within sparsity "
                          "± 2·deviation).")
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


def dense_outlier_ratios(job: "AllocationJob", outlier_factor: float) -> list[float]:
    """OWL's pre-pass: the dense model's activations run through every block (diagonal statistics only) and each
    block's outlier ratio is measured on its targets. `captured` is left untouched (its hidden states are copied).

    Expert matrices of fused MoE modules are not metered (they still get their block's budget).
    """
    blocks, targets, captured, device, reduce_stats = job.blocks, job.targets, job.batches, job.device, job.reduce_stats
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


@dataclass
class AllocationJob:
    """What a rule may look at: the stack's blocks and targets, the calibration batches entering its first block
    (None for a method that needs no data), where blocks run, and the configured pattern."""

    blocks: nn.ModuleList
    targets: list[list]
    batches: Optional[list[CapturedBatch]]
    device: torch.device
    pattern: SparsityPattern
    reduce_stats: Callable[[dict], None] = lambda stats: None

    @property
    def sparsity(self) -> float:
        return self.pattern.sparsity


class AllocationRule:
    """Base class: `budgets` returns each block's sparsity (parameter-weighted mean = the target), or None for the
    same sparsity everywhere."""

    name: ClassVar[str]
    options_class: ClassVar[type[OptionGroup]] = UniformOptions

    def __init__(self, options: OptionGroup) -> None:
        self.options = options

    def budgets(self, job: AllocationJob) -> Optional[list[float]]:
        raise NotImplementedError


#: rule name -> class (their options: `refine.options.ALLOCATION_OPTIONS`, kept in step by `register_allocation`)
ALLOCATION_RULES: dict[str, type[AllocationRule]] = {}


def register_allocation(cls: type[AllocationRule]) -> type[AllocationRule]:
    """Class decorator: register an allocation rule (and its options class) under its `name`."""
    if ALLOCATION_RULES.get(cls.name, cls) is not cls:
        raise ConfigError(f"Allocation rule {cls.name!r} is registered twice.")
    ALLOCATION_RULES[cls.name] = cls
    ALLOCATION_OPTIONS[cls.name] = cls.options_class
    return cls


@register_allocation
class UniformAllocation(AllocationRule):
    name = "uniform"

    def budgets(self, job: AllocationJob) -> Optional[list[float]]:
        return None


@register_allocation
class OwlAllocation(AllocationRule):
    name = "owl"
    options_class = OwlOptions
    options: OwlOptions

    def budgets(self, job: AllocationJob) -> Optional[list[float]]:
        o = self.options
        if not o.applies(job.pattern):
            return None
        sizes = [sum(target_sizes(block, block_targets, job.device))
                 for block, block_targets in zip(job.blocks, job.targets)]
        if job.batches is None:  # no activations: outliers of |W| alone
            ratios = weight_outlier_ratios(job.blocks, job.targets, job.device, o.outlier_threshold)
        else:
            ratios = dense_outlier_ratios(job, o.outlier_threshold)
        budgets = owl_sparsities(ratios, sizes, job.sparsity, o.deviation)
        logger.info("OWL budgets (outlier ratio -> sparsity): %s", ", ".join(
            f"{i}: {r:.4f} -> {b:.4f}" for i, (r, b) in enumerate(zip(ratios, budgets))))
        return budgets


def target_sizes(block: nn.Module, targets: list, device: torch.device) -> list[int]:
    """Entries of each target's matrix (the block is onloaded to read offloaded shapes)."""
    with onloaded(block, device):
        return [t.weight().numel() for t in targets]


def budget_patterns(budgets: Sequence[float], job: AllocationJob) -> dict[str, SparsityPattern]:
    """One pattern per target holding its exact zero count (`budget_zero_counts`); none when every budget is the
    target (OWL with λ = 0 or equal outlier ratios is the uniform allocation, bit for bit)."""
    if all(b == job.sparsity for b in budgets):
        return {}
    sizes = [target_sizes(block, block_targets, job.device) for block, block_targets in zip(job.blocks, job.targets)]
    counts = budget_zero_counts(budgets, sizes, job.sparsity)
    return {t.name: SparsityPattern(k / n if n else 0.0)
            for block_targets, block_sizes, block_counts in zip(job.targets, sizes, counts)
            for t, n, k in zip(block_targets, block_sizes, block_counts)}
