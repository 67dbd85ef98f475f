"""The statistics pass of a group: the block runs over the calibration batches with hooks on its targeted linears
(and expert modules, and whatever observers the method and refiners attach), then the sums are all-reduced."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..calibration.experts import ExpertStatisticsCollector
from ..calibration.hooks import HookManager, StatisticsCollector, StopForward
from ..calibration.statistics import LinearStatistics
from .capture import CapturedBatch
from .context import GroupWork
from .targets import PruneTarget


class BlockStatistics:
    """The statistics of one group: per module (shared by row blocks of a fused matrix), and per expert matrix,
    built when asked for (one expert's Hessians alive at a time) unless every rank must reduce them all."""

    def __init__(self, modules: dict[str, LinearStatistics], experts: Optional[ExpertStatisticsCollector] = None,
                 tokens: Optional[dict[tuple[str, int], int]] = None) -> None:
        self.modules = modules
        self.experts = experts
        self.tokens = tokens or {}

    @property
    def device(self) -> torch.device:
        return next(iter(self.modules.values())).inputs.device if self.modules else torch.device("cpu")

    def of(self, target: PruneTarget) -> Optional[LinearStatistics]:
        """The statistics of a target (its rows of a fused matrix), None when there are none (not collected, or an
        expert that received no token)."""
        if target.expert is not None and self.experts is not None and self.experts.deferred:
            stats = self.experts.statistics(target.module_name, target.param, target.expert)
        else:
            stats = self.modules.get(target.stats_key)
        return None if stats is None else stats.rows(target.rows)

    def free(self) -> None:
        for s in self.modules.values():
            s.inputs.free()
        if self.experts is not None:
            self.experts.free()


def collect_statistics(work: GroupWork, batches: list[CapturedBatch], level: str, observers: Sequence[Any] = (),
                       stop_after: Optional[nn.Module] = None) -> BlockStatistics:
    """Run the group's block over `batches` with statistics hooks of `level` on its targets (and `observers`, which
    get each batch's `token_mask`), stopping the forward after `stop_after`; every hook is removed on exit."""
    block, targets, services = work.block, work.targets, work.services
    if level == "none":
        return BlockStatistics({})
    device = _module_device(block)
    seq_len = batches[0].hidden_states.shape[1]
    modules = {t.module_name: t.module for t in targets if t.expert is None}
    experts = {t.module_name: t.module for t in targets if t.expert is not None}
    collector = StatisticsCollector(modules, level, device, seq_len)
    expert_collector = ExpertStatisticsCollector(experts, level, device, seq_len, all_experts=services.dist.active)
    hooks = HookManager()
    if stop_after is not None:
        hooks.add(stop_after.register_forward_hook(_raise_stop))
    try:
        with services.phase("statistics"):
            for batch in batches:
                collector.token_mask = expert_collector.token_mask = batch.token_mask
                for observer in observers:
                    observer.token_mask = batch.token_mask
                try:
                    block(batch.hidden_states.to(device, non_blocking=True), *batch.args, **batch.kwargs)
                except StopForward:
                    pass
                collector.end_batch()
    finally:
        hooks.remove()
        collector.remove()
        expert_collector.remove()
        for observer in observers:
            observer.remove()
    stats = {**collector.stats, **expert_collector.stats}
    services.dist.all_reduce_statistics(stats)
    return BlockStatistics(stats, expert_collector, expert_collector.token_counts(experts))


def _raise_stop(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    raise StopForward


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
