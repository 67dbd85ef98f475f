"""The pruning engine: for each block stack, capture the inputs of its first block, then per block: statistics ->
the method's plan -> solve -> refine -> propagate (and checkpoint).

It names no method, no projection and no feature: a method (`methods.base.PruningMethod`) plans each group of
targets, an allocation rule (`refine.allocation`) gives per-target sparsities, block refiners
(`refine.reconstruction`) run after a block's layer solves, and the architecture adapter says where the blocks and
their attention are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import ArchitectureAdapter
from ..calibration.hooks import calibration_context
from ..configuration import D2PruneConfig
from ..errors import ConfigError
from ..memory.measure import PeakMemory, TensorCounter
from ..methods.base import PruningMethod
from ..methods.registry import get_method
from ..refine.allocation import ALLOCATION_RULES, AllocationJob, budget_patterns
from ..refine.reconstruction import BlockReconstruction
from ..report import PruneReport
from .capture import CapturedBatch, CaptureOptions, capture_block_arguments, capture_block_inputs
from .checkpoint import BlockCheckpoint, restore_report, run_fingerprint
from .context import BlockRun, GroupWork, PatternBook, RunServices
from .distributed import DistributedContext, module_stores
from .finite import check_hidden_states, screen_targets
from .groups import execution_groups
from .offload import execution_device, onloaded
from .propagate import input_device, module_device, move_outside, propagate
from .solve import solve_group
from .statistics import BlockStatistics, collect_statistics
from .targets import ModelPlan, PruneTarget, StackPlan, clear_partly_pruned, find_targets

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """One run of the engine: the model, this rank's calibration batches, the method, the shared services, and the
    resume checkpoint with its saved state (None without one)."""

    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    method: PruningMethod
    services: RunServices
    saved: Optional[BlockCheckpoint] = None
    state: Optional[dict] = None


@dataclass
class StackRun:
    """One stack being pruned: its plan, the calibration batches at its current block (None without data), and the
    first block still to prune (after a resumed run)."""

    stack: StackPlan
    batches: Optional[list[CapturedBatch]]
    patterns: PatternBook
    first: int = 0


class PruningEngine:
    """Runs pruning passes of `config` over a model through `adapter`."""

    def __init__(self, config: D2PruneConfig, adapter: ArchitectureAdapter,
                 memory_counter: Optional[TensorCounter] = None) -> None:
        self.config = config
        self.adapter = adapter
        self.memory_counter = memory_counter  # measure live tensor bytes instead of the RSS (CPU benchmarks)

    def make_method(self) -> PruningMethod:
        return get_method(self.config.method)(self.config.method_options, self.config.pattern)

    def plan(self, model: nn.Module) -> ModelPlan:
        """Every block stack and its targets; raises before any work if nothing matches or a target cannot take the
        pattern."""
        stacks, offset = [], 0
        for path, blocks in self.adapter.block_stacks(model):
            targets = [find_targets(self.adapter, block, f"{path}.{i}", self.config.targets, self.config.ignore)
                       for i, block in enumerate(blocks)]
            stacks.append(StackPlan(path, blocks, targets, offset, self.adapter.mask_keys(model, path)))
            offset += len(blocks)
        plan = ModelPlan([s for s in stacks if any(s.targets)])
        if not plan.stacks:
            raise ConfigError("No Linear layer matches `targets`/`ignore`: nothing to prune.")
        for t in plan.targets():
            self.config.pattern.check_shape(t.name, t.weight().shape[1])
        return plan

    # ------------------------------------------------------------------ running
    def run(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], plan: ModelPlan,
            method: PruningMethod, checkpoint: bool = True) -> PruneReport:
        """Prune `model` once with `method`; `checkpoint=False` ignores `runtime.checkpoint_dir`."""
        report = PruneReport(method=method.name, pattern=str(self.config.pattern))
        start = time.perf_counter()
        services = RunServices(self.adapter, self.config.runtime, DistributedContext.detect(), report)
        device = self._device(plan.stacks[0].blocks[0])
        method.setup(1)
        data = method.statistics != "none"
        saved = self._checkpoint(model, batches, method, services) if checkpoint and data else None
        state = saved.load() if saved is not None else None
        if state is not None:
            restore_report(state, report)
        job = _Job(model, services.dist.shard(batches) if data else [], method, services, saved, state)
        if self.config.runtime.weights_from_rank0:  # what runs before the blocks (embeddings), then block by block
            services.dist.share_weights(module_stores([model], [b for s in plan.stacks for b in s.blocks]), device)
        with PeakMemory(device, counter=self.memory_counter) as memory, calibration_context(model):
            services.memory = memory
            try:
                for stack in plan.stacks:
                    self._run_stack(job, stack)
            finally:
                services.memory = None
        clear_partly_pruned(model)
        report.seconds = time.perf_counter() - start
        report.peak_memory_bytes, report.peak_memory_kind = memory.peak_bytes, memory.kind
        report.memory_increase_bytes = memory.increase_bytes
        report.phase_memory_bytes = memory.phase_increases()
        return report

    def _device(self, block: nn.Module) -> torch.device:
        device = torch.device(self.config.runtime.device) if self.config.runtime.device else module_device(block)
        return execution_device(block) if device.type == "meta" else device  # accelerate-offloaded weights

    def _checkpoint(self, model, batches, method, services) -> Optional[BlockCheckpoint]:
        directory = self.config.runtime.checkpoint_dir
        if not directory:
            return None
        config = {**self.config.to_dict(), "method_options": method.options.to_dict()}
        # every parameter and buffer, by value (on rank 0 when only it holds the weights)
        fingerprint = services.dist.fingerprint(lambda: run_fingerprint(config, model, batches))
        return BlockCheckpoint(directory, fingerprint, services.dist.rank, services.dist.world_size)

    def _run_stack(self, job: _Job, stack: StackPlan) -> None:
        model, method, services, saved, state = job.model, job.method, job.services, job.saved, job.state
        last = state["last_block"] if state is not None else -1
        if last >= stack.offset + len(stack.blocks) - 1:  # finished before the interruption
            self._restore(stack, len(stack.blocks), saved)
            return
        device = self._device(stack.blocks[0])
        captured = self._capture(model, stack, job.batches, device, services) if job.batches else None
        method.setup(captured[0].hidden_states.shape[1] if captured else 1)
        refiners = self._refiners(method, services) if captured else []
        for refiner in refiners:
            refiner.start_stack(captured)
        run = StackRun(stack, captured, PatternBook(self.config.pattern))
        if last >= stack.offset:
            run.first = self._resume(run, last, saved, state, refiners)
        self._allocate(run, device, services)
        blocks, remote = stack.blocks, self.config.runtime.weights_from_rank0
        progress = tqdm(range(run.first, len(blocks)), desc=f"{method.name} {self.config.pattern}", unit="block",
                        initial=run.first, total=len(blocks), disable=services.dist.rank > 0)
        for local in progress:
            index = stack.offset + local
            if captured:
                check_hidden_states([b.hidden_states for b in captured], index)
                for batch in captured:
                    batch.use_block(local)
            with services.dist.received(blocks[local], device, remote), onloaded(blocks[local], device):
                block_run = BlockRun(index, blocks[local], stack.targets[local], captured or [], run.patterns,
                                     services)
                self._prune_block(block_run, method, refiners)
                if captured:
                    with services.phase("propagate"):
                        propagate(blocks[local], captured, device)
            if saved is not None:
                streams = refiners[0].streams if refiners else None
                saved.save(index, stack.targets[local], [b.hidden_states for b in captured], services.report,
                           reference_states=streams)
            errors = [r.error for r in services.report.layers if r.block == index]
            if errors:
                progress.set_postfix(err=f"{max(errors):.3g}")

    def _capture(self, model, stack: StackPlan, batches, device, services) -> list[CapturedBatch]:
        """The calibration batches as the stack's first block receives them, with each block's own arguments."""
        restore = move_outside(model, list(stack.blocks), device) if self.config.runtime.device else (lambda: None)
        try:
            with services.phase("inputs"):
                store = torch.device("cpu") if self.config.runtime.offload_activations else device
                captured = capture_block_inputs(model, stack.blocks[0], batches, CaptureOptions(
                    input_device(model), store, self.adapter.forward_model, stack.mask_keys))
                if store != device and torch.cuda.is_available():  # pinned: the copies to the device overlap
                    for batch in captured:
                        batch.hidden_states = batch.hidden_states.pin_memory()
            arguments = capture_block_arguments(model, stack.blocks, batches, input_device(model),
                                                self.adapter.forward_model)
        finally:
            restore()
        for batch, block_arguments in zip(captured, arguments or []):
            batch.block_arguments = block_arguments
        return captured

    def _refiners(self, method: PruningMethod, services: RunServices) -> list[BlockReconstruction]:
        if not self.config.reconstruction:
            return []
        return [BlockReconstruction(self.config.reconstruction_options, method.solver.admm_steps, services)]

    def _allocate(self, run: StackRun, device: torch.device, services: RunServices) -> None:
        """Per-target patterns of the allocation rule (a resumed run keeps the budgets measured on the dense
        model)."""
        stack, report = run.stack, services.report
        budgets = report.block_sparsity[stack.offset:stack.offset + len(stack.blocks)]
        if not budgets:
            rule = ALLOCATION_RULES[self.config.allocation](self.config.allocation_options)
            job = AllocationJob(stack.blocks, stack.targets, run.batches, device, self.config.pattern,
                                services.dist.all_reduce_statistics)
            budgets = rule.budgets(job) or []
            report.block_sparsity += budgets
        if budgets:
            run.patterns.overrides = budget_patterns(budgets, AllocationJob(
                stack.blocks, stack.targets, run.batches, device, self.config.pattern))

    def _restore(self, stack: StackPlan, count: int, saved: BlockCheckpoint) -> None:
        device = self._device(stack.blocks[0])
        for local in range(count):
            with onloaded(stack.blocks[local], device):
                saved.restore_weights(stack.offset + local, stack.targets[local])

    def _resume(self, run: StackRun, last: int, saved, state, refiners) -> int:
        """Load the finished blocks of an interrupted run, and the activations after them; the first block to do."""
        done = last - run.stack.offset + 1
        self._restore(run.stack, done, saved)
        for batch, hidden in zip(run.batches, state["hidden_states"]):
            batch.hidden_states = hidden.to(device=batch.hidden_states.device, dtype=batch.hidden_states.dtype)
        for refiner in refiners:
            if refiner.streams is not None:
                refiner.streams[:] = [hidden.to(device=kept.device, dtype=kept.dtype)
                                      for kept, hidden in zip(refiner.streams, state["reference_states"])]
        logger.info("Resuming from %s: blocks 0-%d are done.", saved.directory, last)
        return done

    # ------------------------------------------------------------------ one block
    def _prune_block(self, run: BlockRun, method: PruningMethod, refiners: list[BlockReconstruction]) -> None:
        for refiner in refiners:
            refiner.advance(run)
        if not run.targets:
            return
        device = module_device(run.block)
        if run.batches and (self.config.sequential or refiners):
            run.groups = execution_groups(run.block, run.targets, run.batches[0], device)
        groups = run.groups if self.config.sequential and run.groups else [run.targets]
        for refiner in refiners:
            refiner.start_block(run)
        extra = [o for refiner in refiners for o in refiner.observers(len(groups))]

        def replaced(target: PruneTarget) -> bool:
            return any(r.replaces(target) for r in refiners)

        for number, group in enumerate(groups):
            stop_after = None if number == len(groups) - 1 else group[-1].module
            work = GroupWork(run.index, run.block, group, run.targets, BlockStatistics({}), run.pattern_of,
                             run.services)
            observers = [*method.observers(work), *(extra if number == 0 else [])]
            work.stats = collect_statistics(work, run.batches, method.statistics, observers,
                                            stop_after) if run.batches else BlockStatistics({})
            try:
                with run.services.phase("solve"):
                    kept = screen_targets(run.index, group, work.stats.modules, self.config.runtime.on_nonfinite,
                                          run.services.report)
                    work.screened, work.targets = len(kept) < len(group), kept
                    solve_group(work, method.plan(work), replaced, self.config.method_options.min_expert_tokens)
            finally:
                work.stats.free()
        for refiner in refiners:
            refiner.finish_block(run)
