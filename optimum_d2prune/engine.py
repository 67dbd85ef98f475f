"""The pruning engine: block-0 input capture, then per block statistics -> solve -> propagate.

Architecture-agnostic: it only talks to an `ArchitectureAdapter` (where the blocks and q/k/v are) and to
`Solver`s (maths on one matrix). Each block is run twice over the calibration data: once with statistics
hooks, once after pruning to produce the next block's inputs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import budget_zero_counts, dense_outlier_ratios, owl_sparsities, weight_outlier_ratios
from .architectures import PROJECTIONS, PRUNABLE_TYPES, ArchitectureAdapter, AttentionInputs
from .architectures.base import Rows, read_rows, write_rows
from .attention import AttentionInputCapture, AttentionScorer, plan_attention_updates, scores_attention
from .checkpoint import BlockCheckpoint, restore_report, run_fingerprint, targeted_weights
from .configuration import D2PruneConfig
from .distributed import DistributedContext
from .finite import check_hidden_states, screen_targets
from .hooks import (
    CapturedBatch,
    HookManager,
    StatisticsCollector,
    _StopForward,
    calibration_context,
    capture_block_arguments,
    capture_block_inputs,
)
from .masks import SparsityPattern
from .memory import PeakMemory, TensorCounter
from .moe import ExpertStatisticsCollector, expert_key, expert_matrix, expert_parameters, expert_solver
from .offload import execution_device as _execution_device
from .offload import onloaded
from .reconstruction import (DenseOutputRecorder, output_projections, reconstruct_block_outputs,
                             reconstruction_groups)
from .report import ExpertRecord, LayerRecord, PruneReport
from .solvers import Solver, SolverOutput, solvers_for

logger = logging.getLogger(__name__)

_LEVEL_RANK = {"none": 0, "diag": 1, "hessian": 2}
#: conjugate-gradient steps of the block-level reconstruction when the refit has none of its own (`refine_steps=0`)
RECONSTRUCTION_STEPS = 16


@dataclass
class PruneTarget:
    """One matrix to prune: a Linear (or GPT-2 `Conv1D`), or one row block (q, k or v) of a fused one.

    `weight()` is always `[out, in]`: a Conv1D's stored `[in, out]` weight is seen transposed.
    """

    name: str  # full module name, plus "[q]"/"[k]"/"[v]" for a row block, or ".param[e]" for an expert matrix
    module_name: str
    module: nn.Module
    rows: Rows = None
    projection: Optional[str] = None  # "q"/"k"/"v" when it is an attention projection
    attention: int = 0  # which attention module of the block (`adapter.attention_groups`) it belongs to
    param: Optional[str] = None  # for an expert matrix: the 3D parameter of the experts module...
    expert: Optional[int] = None  # ...and the expert's index in it

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    @property
    def stats_key(self) -> str:
        """Key of this target's statistics: the module (shared by its row blocks), or the expert matrix."""
        return self.module_name if self.expert is None else self.name

    def weight(self) -> torch.Tensor:
        if self.expert is not None:
            return expert_matrix(self.module, self.param, self.expert)
        return read_rows(self.module, self.rows)

    def write(self, new_weight: torch.Tensor) -> None:
        if self.expert is not None:
            w = expert_matrix(self.module, self.param, self.expert).data
            w.copy_(new_weight.to(device=w.device, dtype=w.dtype))
        else:
            write_rows(self.module, self.rows, new_weight)


def find_targets(
    config: D2PruneConfig, adapter: ArchitectureAdapter, block: nn.Module, prefix: str
) -> list[PruneTarget]:
    """The Linears (and Conv1Ds) of a block selected by `targets`/`ignore` (regexes searched in full module names)."""
    by_module: dict[str, list[tuple[str, Rows, int]]] = {}
    for number, (_, projections) in enumerate(adapter.attention_groups(block)):
        for p, ref in projections.items():
            by_module.setdefault(ref.module, []).append((p, ref.rows, number))
    found = []
    for local_name, module in block.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        full = f"{prefix}.{local_name}"
        if config.targets is not None and not any(re.search(p, full) for p in config.targets):
            continue
        if any(re.search(p, full) for p in config.ignore):
            continue
        refs = by_module.get(local_name, [])
        if any(rows is not None for _, rows, _ in refs):  # fused projection: one target per row block
            found += [PruneTarget(f"{full}[{p}]", full, module, rows, p, number) for p, rows, number in refs]
        else:
            found.append(PruneTarget(full, full, module, None, refs[0][0] if refs else None,
                                     refs[0][2] if refs else 0))
    for local_name, module in block.named_modules():  # fused MoE experts: one target per expert matrix
        full = f"{prefix}.{local_name}"
        params = [param for param in expert_parameters(module)
                  if (config.targets is None or any(re.search(p, f"{full}.{param}") for p in config.targets))
                  and not any(re.search(p, f"{full}.{param}") for p in config.ignore)]
        experts = getattr(module, params[0]).shape[0] if params else 0
        # expert by expert (its first matrix, then its second): one expert's statistics are alive at a time
        found += [PruneTarget(expert_key(full, param, e), full, module, param=param, expert=e)
                  for e in range(experts) for param in params]
    return found


class PruningEngine:
    """Runs one pruning pass of `config` over `model` with the given adapter.

    `attention_update` overrides the config's choice (used by the global q/k/v search).
    """

    def __init__(self, config: D2PruneConfig, adapter: ArchitectureAdapter, attention_update: Optional[str] = None,
                 memory_counter: Optional[TensorCounter] = None):
        self.config = config
        self.adapter = adapter
        self.pattern: SparsityPattern = config.pattern
        #: per-target patterns of a non-uniform allocation (exact zero counts); targets not in it use `pattern`
        self.patterns: dict[str, SparsityPattern] = {}
        #: targets of the block being pruned whose masks the block reconstruction re-selects by ADMM (their layer
        #: solve stops after the sweep: the block objective decides their masks and weights)
        self.block_admm: frozenset[str] = frozenset()
        self.attention_update = attention_update or config.attention_update
        self.dist = DistributedContext()  # set from the process group in `run`
        self.memory: Optional[PeakMemory] = None  # the running measurement (per-phase peaks)
        self.memory_counter = memory_counter  # measure live tensor bytes instead of the RSS (CPU benchmarks)

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        """Attribute the memory peak of a region to a phase of the running measurement (none outside `run`)."""
        return self.memory.phase(name) if self.memory is not None else contextlib.nullcontext()

    # ---------------------------------------------------------------- planning
    def plan(self, model: nn.Module) -> tuple[nn.ModuleList, str, list[list[PruneTarget]]]:
        """Blocks, their name prefix and targets; raises before any work if a target cannot take the pattern."""
        blocks = self.adapter.blocks(model)
        prefix = next(name for name, module in model.named_modules() if module is blocks)
        targets = [find_targets(self.config, self.adapter, block, f"{prefix}.{i}") for i, block in enumerate(blocks)]
        if not any(targets):
            raise ValueError("No Linear layer matches `targets`/`ignore`: nothing to prune.")
        for block_targets in targets:
            for t in block_targets:
                self.pattern.check_shape(t.name, t.in_features)
        if self.config.uses_attention_awareness and not any(t.projection for b in targets for t in b):
            missing = getattr(self.adapter, "missing_qkv_error", None)
            if missing is not None and not self.adapter.attention_groups(blocks[0]):
                raise missing(blocks[0])
        return blocks, prefix, targets

    # ------------------------------------------------------------------ running
    def run(
        self,
        model: nn.Module,
        batches: list[dict[str, torch.Tensor]],
        plan: Optional[tuple[nn.ModuleList, str, list[list[PruneTarget]]]] = None,
    ) -> PruneReport:
        blocks, prefix, targets = plan or self.plan(model)
        report = PruneReport(method=self.config.method, pattern=str(self.pattern))
        start = time.perf_counter()
        device = torch.device(self.config.device) if self.config.device else _module_device(blocks[0])
        if device.type == "meta":  # accelerate-offloaded weights: run where accelerate executes them
            device = _execution_device(blocks[0])
        self.dist = DistributedContext.detect()
        checkpoint = self._checkpoint(model, batches, targeted_weights(blocks, targets, device))
        local_batches = self.dist.shard(batches)
        with PeakMemory(device, counter=self.memory_counter) as memory, calibration_context(model):
            self.memory = memory
            try:
                if self._data_free():
                    self._prune_without_data(blocks, targets, report, device)
                else:
                    self._prune_with_data(model, blocks, targets, local_batches, checkpoint, report, device)
            finally:
                self.memory = None
        report.seconds = time.perf_counter() - start
        report.peak_memory_bytes, report.peak_memory_kind = memory.peak_bytes, memory.kind
        report.memory_increase_bytes = memory.increase_bytes
        report.phase_memory_bytes = memory.phase_increases()
        return report

    def _prune_with_data(self, model, blocks, targets, batches, checkpoint, report, device) -> None:
        """Capture block-0 inputs, then per block: statistics -> solve -> propagate (and checkpoint)."""
        restore = _move_outside(model, blocks, device) if self.config.device else (lambda: None)
        try:
            with self._phase("inputs"):
                store = torch.device("cpu") if self.config.offload_activations else device
                captured = capture_block_inputs(model, blocks[0], batches, _input_device(model), store,
                                                self.adapter.forward_model)
                if store != device and torch.cuda.is_available():  # pinned: the copies to the device overlap
                    for batch in captured:
                        batch.hidden_states = batch.hidden_states.pin_memory()
            arguments = capture_block_arguments(model, blocks, batches, _input_device(model),
                                                self.adapter.forward_model)
        finally:
            restore()
        for batch, block_arguments in zip(captured, arguments or []):
            batch.block_arguments = block_arguments
        seq_len = captured[0].hidden_states.shape[1]
        update_solver, non_update_solver = solvers_for(self.config, seq_len)
        # the dense model's own activations, propagated beside the pruned ones (`reconstruction_reference="model"`)
        reference = ([b.hidden_states.clone() for b in captured] if self.config.block_reconstruction
                     and self.config.reconstruction_reference == "model" else None)
        first = self._resume(checkpoint, blocks, targets, captured, reference, report, device)
        if self.config.sparsity_allocation != "uniform":
            if not report.block_sparsity:  # a resumed run keeps the budgets measured on the dense model
                report.block_sparsity = self._budgets(owl_ratios=lambda: dense_outlier_ratios(
                    blocks, targets, captured, device, self.config.owl_m, self.dist.all_reduce_statistics),
                    blocks=blocks, targets=targets, device=device)
            self._set_patterns(blocks, targets, report.block_sparsity, device)
        progress = tqdm(range(first, len(blocks)), desc=f"{self.config.method} {self.pattern}", unit="block",
                        initial=first, total=len(blocks), disable=self.dist.rank > 0)
        for index in progress:
            check_hidden_states([b.hidden_states for b in captured], index)
            for batch in captured:
                batch.use_block(index)
            with onloaded(blocks[index], device):
                self._prune_block(index, blocks[index], targets[index], captured, seq_len, update_solver,
                                  non_update_solver, report, reference)
                with self._phase("propagate"):
                    _propagate(blocks[index], captured, device)
            if checkpoint is not None:
                checkpoint.save(index, targets[index], [b.hidden_states for b in captured], report,
                                write_weights=self.dist.rank == 0, reference_states=reference)
            block_layers = [r for r in report.layers if r.block == index]
            if block_layers:
                progress.set_postfix(err=f"{max(r.error for r in block_layers):.3g}")

    def _data_free(self) -> bool:
        """True when no solver needs calibration statistics (magnitude): no forward pass is needed at all."""
        return all(s.statistics == "none" for s in solvers_for(self.config, seq_len=1))

    def _prune_without_data(self, blocks: nn.ModuleList, targets: list[list[PruneTarget]], report: PruneReport,
                            device: torch.device) -> None:
        solver = solvers_for(self.config, seq_len=1)[0]
        if self.config.sparsity_allocation != "uniform":  # no activations: outliers of |W| alone
            report.block_sparsity = self._budgets(
                owl_ratios=lambda: weight_outlier_ratios(blocks, targets, device, self.config.owl_m),
                blocks=blocks, targets=targets, device=device)
            self._set_patterns(blocks, targets, report.block_sparsity, device)
        for index in tqdm(range(len(blocks)), desc=f"{self.config.method} {self.pattern}", unit="block"):
            with onloaded(blocks[index], device):
                for t in screen_targets(index, targets[index], {}, self.config.on_nonfinite, report):
                    tic = time.perf_counter()
                    out = solver.prune(t.weight(), None, self._pattern(t))
                    t.write(out.weight)
                    report.layers.append(LayerRecord(index, t.name, solver.name, False, tuple(t.weight().shape),
                                                     float((t.weight() == 0).float().mean()), out.error, None,
                                                     time.perf_counter() - tic))

    # ------------------------------------------------------------- budgets
    def _budgets(self, owl_ratios: Callable[[], list[float]], blocks: nn.ModuleList,
                 targets: list[list[PruneTarget]], device: torch.device) -> list[float]:
        """Per-block sparsity of the configured allocation (weighted mean exactly `sparsity`)."""
        sizes = [sum(n for n in _target_sizes(block, block_targets, device))
                 for block, block_targets in zip(blocks, targets)]
        ratios = owl_ratios()
        budgets = owl_sparsities(ratios, sizes, self.config.sparsity, self.config.owl_lambda)
        logger.info("OWL budgets (outlier ratio -> sparsity): %s", ", ".join(
            f"{i}: {r:.4f} -> {b:.4f}" for i, (r, b) in enumerate(zip(ratios, budgets))))
        return budgets

    def _set_patterns(self, blocks: nn.ModuleList, targets: list[list[PruneTarget]], budgets: list[float],
                      device: torch.device) -> None:
        """One pattern per target holding its exact zero count (`budget_zero_counts`); none when every budget is
        the target (OWL with λ = 0 or equal outlier ratios is the uniform allocation, bit for bit)."""
        if all(b == self.config.sparsity for b in budgets):
            self.patterns = {}
            return
        sizes = [_target_sizes(block, block_targets, device) for block, block_targets in zip(blocks, targets)]
        counts = budget_zero_counts(budgets, sizes, self.config.sparsity)
        self.patterns = {t.name: SparsityPattern(k / n if n else 0.0)
                         for block_targets, block_sizes, block_counts in zip(targets, sizes, counts)
                         for t, n, k in zip(block_targets, block_sizes, block_counts)}

    def _pattern(self, target: PruneTarget) -> SparsityPattern:
        return self.patterns.get(target.name, self.pattern)

    def _checkpoint(self, model: nn.Module, batches: list[dict[str, torch.Tensor]],
                    weights: Iterable[tuple[str, torch.Tensor]]) -> Optional[BlockCheckpoint]:
        if not self.config.checkpoint_dir:
            return None
        fingerprint = run_fingerprint({**self.config.to_dict(), "attention_update": self.attention_update}, model,
                                      batches, weights)
        return BlockCheckpoint(self.config.checkpoint_dir, fingerprint, self.dist.rank, self.dist.world_size)

    def _resume(self, checkpoint, blocks, targets, captured, reference, report, device) -> int:
        """Load the finished blocks of an interrupted run (and the dense model's activations after them, for a
        `reference` stream); return the first block still to prune."""
        state = checkpoint.load() if checkpoint is not None else None
        if state is None:
            return 0
        last = state["last_block"]
        for index in range(last + 1):
            with onloaded(blocks[index], device):
                checkpoint.restore_weights(index, targets[index])
        for batch, hidden in zip(captured, state["hidden_states"]):
            batch.hidden_states = hidden.to(device=batch.hidden_states.device, dtype=batch.hidden_states.dtype)
        if reference is not None:
            reference[:] = [hidden.to(device=kept.device, dtype=kept.dtype)
                            for kept, hidden in zip(reference, state["reference_states"])]
        restore_report(state, report)
        logger.info("Resuming from %s: blocks 0-%d are done.", checkpoint.directory, last)
        return last + 1

    def _awareness(self, targets: list[PruneTarget]) -> bool:
        if not self.config.uses_attention_awareness:
            return False
        if not _complete_attentions(targets):
            logger.warning("q/k/v are not all targeted in this block; attention awareness is skipped for it.")
            return False
        return True

    def _prune_block(
        self,
        index: int,
        block: nn.Module,
        targets: list[PruneTarget],
        captured: list[CapturedBatch],
        seq_len: int,
        update_solver: Solver,
        non_update_solver: Solver,
        report: PruneReport,
        reference: Optional[list[torch.Tensor]] = None,
    ) -> None:
        """Prune the targets of one block. `reference`: the dense model's activations entering the block, replaced
        by the dense block's outputs on them (the block reconstruction's target for the block's output)."""
        if reference is not None:
            with self._phase("propagate"):
                _propagate_reference(block, captured, reference, _module_device(block))
        if not targets:
            return
        aware = self._awareness(targets)
        reconstruct = self.config.block_reconstruction
        ordered = (_sequential_groups(block, targets, captured[0], _module_device(block))
                   if self.config.sequential or reconstruct else None)
        groups = ordered if self.config.sequential else [targets]
        dense = {t.name: t.weight().detach().clone() for t in targets} if reconstruct else {}
        outputs = output_projections(ordered) if reconstruct else []
        scope = reconstruction_groups(ordered, self.config.reconstruction_targets) if reconstruct else []
        self.block_admm = frozenset(t.name for group in scope for t in group if self.config.admm_steps)
        # one statistics pass over the whole dense block: record the reconstruction's targets there
        recorder = (DenseOutputRecorder(outputs, captured[0].hidden_states.device)
                    if outputs and len(groups) == 1 else None)
        try:
            for number, group in enumerate(groups):
                last = number == len(groups) - 1
                stop_after = None if last else group[-1].module
                group_aware = aware and _complete_attentions(group)
                self._prune_group(index, block, group, captured, seq_len, update_solver, non_update_solver, report,
                                  group_aware, stop_after, [recorder] if recorder is not None else [])
        finally:
            if recorder is not None:
                recorder.remove()
        if reconstruct:
            refit = [[t for t in group if t.name not in report.skipped and t.module_name not in report.skipped]
                     for group in scope]
            with self._phase("reconstruction"):
                report.reconstruction += reconstruct_block_outputs(
                    index, block, targets, [group for group in refit if group], dense, captured,
                    self.config.damp_percent,
                    self.config.resolve_refine_steps() or RECONSTRUCTION_STEPS, self.config.refine_tolerance,
                    self.dist.all_reduce_tensors, recorder, reference,
                    outputs[-1].name if outputs and outputs[-1].name in {t.name for t in ordered[-1]} else None,
                    report.reconstruction, self.config.admm_steps, self._pattern)

    def _prune_group(
        self,
        index: int,
        block: nn.Module,
        targets: list[PruneTarget],
        captured: list[CapturedBatch],
        seq_len: int,
        update_solver: Solver,
        non_update_solver: Solver,
        report: PruneReport,
        aware: bool,
        stop_after: Optional[nn.Module],
        observers: Sequence = (),
    ) -> None:
        """Collect statistics for `targets` (stopping the block's forward after `stop_after`), then prune them.

        `observers` (hooks with a per-batch `token_mask`, e.g. `DenseOutputRecorder`) see the statistics pass."""
        scored = aware and scores_attention(self.attention_update, self.config.kl_weight)
        level = max((update_solver.statistics, non_update_solver.statistics), key=_LEVEL_RANK.__getitem__)
        modules = {t.module_name: t.module for t in targets if t.expert is None}
        experts = {t.module_name: t.module for t in targets if t.expert is not None}
        stats = {}
        tokens: dict[tuple[str, int], int] = {}
        expert_collector: Optional[ExpertStatisticsCollector] = None
        captures: dict[int, AttentionInputCapture] = {}
        attentions: list = []
        attention_inputs: dict[int, list[AttentionInputs]] = {}
        if level != "none":
            collector = StatisticsCollector(modules, level, _module_device(block), seq_len)
            expert_collector = ExpertStatisticsCollector(experts, level, _module_device(block), seq_len,
                                                         all_experts=self.dist.active)
            attentions = self.adapter.attention_groups(block) if scored else []
            captures = {number: AttentionInputCapture(attentions[number][0], self.config.kl_num_samples)
                        for number in sorted({t.attention for t in targets if t.projection}) if scored}
            hooks = HookManager()
            if stop_after is not None:
                hooks.add(stop_after.register_forward_hook(_raise_stop))
            try:
                with self._phase("statistics"):
                    _run_for_statistics(block, captured, collector, expert_collector,
                                        [*captures.values(), *observers], _module_device(block))
            finally:
                hooks.remove()
                collector.remove()
                expert_collector.remove()
                for capture in [*captures.values(), *observers]:
                    capture.remove()
            stats = {**collector.stats, **expert_collector.stats}
            self.dist.all_reduce_statistics(stats)
            tokens = expert_collector.token_counts(experts)
            attention_inputs = {number: capture.inputs for number, capture in captures.items()}
        try:
            with self._phase("solve"):
                self._solve_group(index, targets, stats, tokens, expert_collector, update_solver, non_update_solver,
                                  report, aware, scored, attentions, attention_inputs, captures)
        finally:
            for s in stats.values():
                s.inputs.free()
            if expert_collector is not None:
                expert_collector.free()

    def _solve_group(self, index: int, targets: list[PruneTarget], stats: dict, tokens: dict[tuple[str, int], int],
                     expert_collector: Optional[ExpertStatisticsCollector], update_solver: Solver,
                     non_update_solver: Solver, report: PruneReport, aware: bool, scored: bool, attentions: list,
                     attention_inputs: dict[int, list[AttentionInputs]], captures: dict) -> None:
        """Screen the statistics, choose the q/k/v left without update, then solve every target of the group."""
        kept = screen_targets(index, targets, stats, self.config.on_nonfinite, report)
        if len(kept) < len(targets):  # a skipped q/k/v leaves nothing to choose between
            targets, aware = kept, False
        unupdated: set[tuple[int, str]] = set()  # (attention module, projection) left without update
        outputs: dict[tuple[str, bool], SolverOutput] = {}
        numbers = sorted({t.attention for t in targets if t.projection})
        for number in numbers:
            with self._phase("attention choice"):
                plan = self._plan_attention(index, number, targets, stats, update_solver, non_update_solver,
                                            aware, scored, attentions, attention_inputs)
            unupdated |= {(number, p) for p in plan.unupdated}
            outputs.update(plan.outputs)
            if plan.record is not None:
                if len(numbers) > 1:
                    plan.record.attention = number
                report.attention.append(plan.record)
        attention_inputs.clear()  # the KL term is computed: its captured sequences are no longer needed
        captures.clear()
        if expert_collector is not None and expert_collector.deferred:  # built on demand, one expert at a time
            stats = _ExpertStats(stats, expert_collector)
        last_use = _last_use(targets, stats)
        self._solve_targets(index, targets, stats, outputs, unupdated, last_use, tokens, update_solver,
                            non_update_solver, report)

    def _solve_targets(self, index: int, targets: list[PruneTarget], stats: dict,
                       outputs: dict[tuple[str, bool], SolverOutput], unupdated: set[tuple[int, str]],
                       last_use: dict[int, list], tokens: dict[tuple[str, int], int], update_solver: Solver,
                       non_update_solver: Solver, report: PruneReport) -> None:
        """Prune the targets in order (reusing the outputs computed for the q/k/v choice), freeing each input
        stream's statistics after its last reader."""
        for position, t in enumerate(targets):
            solver = non_update_solver if (t.attention, t.projection) in unupdated else update_solver
            if t.name in self.block_admm:  # the reconstruction re-selects its mask and refits it: the sweep only
                solver = solver.without_refinement()
            if t.expert is not None:
                solver = self._expert_solver(index, t, solver, tokens, report)
            tic = time.perf_counter()
            out = outputs.pop((t.name, solver.updates_weights), None)
            outputs.pop((t.name, not solver.updates_weights), None)
            if out is None:
                out = self._solve_once(position, t, solver, stats)
            else:
                t.write(out.weight)
            for inputs in last_use.pop(position, ()):  # its sum and factor are no longer needed
                inputs.free()
            zeros = int((t.weight() == 0).sum()) / t.weight().numel()  # no fp32 copy of the matrix
            report.layers.append(LayerRecord(index, t.name, solver.name, solver.updates_weights,
                                             tuple(t.weight().shape), zeros, out.error, out.flipped,
                                             time.perf_counter() - tic))
            logger.debug("block %d %s: %s sparsity %.4f error %.4g", index, t.name, solver.name, zeros, out.error)

    def _plan_attention(self, index: int, number: int, targets: list[PruneTarget], stats: dict,
                        update_solver: Solver, non_update_solver: Solver, aware: bool, scored: bool,
                        attentions: list, attention_inputs: dict[int, list[AttentionInputs]]):
        """The q/k/v plan of attention module `number` of the block (`attention.plan_attention_updates`)."""
        qkv = {t.projection: t for t in targets if t.projection and t.attention == number}
        return plan_attention_updates(
            self.attention_update if aware else "all", index, qkv,
            lambda t: _target_stats(stats, t), update_solver, non_update_solver,
            {p: self._pattern(t) for p, t in qkv.items()} if self.patterns else self.pattern,
            AttentionScorer(self.adapter, attentions[number][0] if scored else None,
                            attention_inputs.get(number, []), self.config.kl_weight,
                            self._reduce_floats(stats), self.config.kl_chunk_mib * 2**20,
                            self.config.kl_query_rows),
        )

    def _expert_solver(self, index: int, target: PruneTarget, solver: Solver, tokens: dict[tuple[str, int], int],
                       report: PruneReport) -> Solver:
        """The solver for one expert matrix (a fallback when its expert received too few tokens), reported."""
        count = tokens.get((target.module_name, target.expert))
        chosen = expert_solver(solver, count, self.config.min_expert_tokens)
        if target.param == expert_parameters(target.module)[0]:  # one record per expert
            report.experts.append(ExpertRecord(index, target.module_name, target.expert, count,
                                               chosen.name, chosen is not solver))
        return chosen

    def _solve_once(self, position: int, target: PruneTarget, solver: Solver, stats: dict) -> SolverOutput:
        """Solve on the owning rank (every rank when not distributed) and give the result to all ranks."""
        owner = self.dist.owner(position)
        out = None
        if self.dist.rank == owner:
            out = solver.prune(target.weight(), _target_stats(stats, target), self._pattern(target))
            target.write(out.weight)
        if not self.dist.active:
            return out
        weight = self.dist.broadcast(target.weight(), owner)
        meta = torch.tensor([out.error, -1 if out.flipped is None else out.flipped] if out else [0.0, 0.0],
                            dtype=torch.float64, device=weight.device)
        meta = self.dist.broadcast(meta, owner).tolist()
        if out is None:
            target.write(weight)
            out = SolverOutput(weight, weight == 0, meta[0], None if meta[1] < 0 else int(meta[1]))
        return out

    def _reduce_floats(self, stats: dict) -> Callable[[list[float]], list[float]]:
        device = next(iter(stats.values())).inputs.device if stats else torch.device("cpu")
        return lambda values: self.dist.all_reduce_floats(values, device)


def _target_sizes(block: nn.Module, targets: list[PruneTarget], device: torch.device) -> list[int]:
    """Entries of each target's matrix (the block is onloaded to read offloaded shapes)."""
    with onloaded(block, device):
        return [t.weight().numel() for t in targets]


def _complete_attentions(targets: list[PruneTarget]) -> bool:
    """Whether the targets hold q, k and v of every attention module they touch (and touch at least one)."""
    present: dict[int, set[str]] = {}
    for t in targets:
        if t.projection:
            present.setdefault(t.attention, set()).add(t.projection)
    return bool(present) and all(p == set(PROJECTIONS) for p in present.values())


def _run_for_statistics(block: nn.Module, captured: list[CapturedBatch], collector: StatisticsCollector,
                        expert_collector: ExpertStatisticsCollector, captures: Iterable[AttentionInputCapture],
                        device: torch.device) -> None:
    """One pass of the block over the calibration batches with the statistics hooks attached."""
    for batch in captured:
        collector.token_mask = expert_collector.token_mask = batch.token_mask
        for capture in captures:
            capture.token_mask = batch.token_mask
        try:
            block(batch.hidden_states.to(device, non_blocking=True), *batch.args, **batch.kwargs)
        except _StopForward:
            pass
        collector.end_batch()


def _raise_stop(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    raise _StopForward


def _sequential_groups(block: nn.Module, targets: list[PruneTarget], batch: CapturedBatch,
                       device: torch.device) -> list[list[PruneTarget]]:
    """Targets grouped in execution order, one group per input stream (q/k/v together, gate/up together).

    Found by one forward of the first calibration batch; each group is later calibrated on the outputs of the
    already-pruned groups before it ("true sequential").
    """
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []  # keep inputs alive so that their ids stay unique during the pass

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            alive.append(inputs[0])
            order.append((name, id(inputs[0])))

        return hook

    with HookManager() as hooks:
        for t in {t.module_name: t for t in targets}.values():
            hooks.add(t.module.register_forward_hook(make_hook(t.module_name)))
        block(batch.hidden_states.to(device), *batch.args, **batch.kwargs)
    by_module: dict[str, list[PruneTarget]] = {}
    for t in targets:
        by_module.setdefault(t.module_name, []).append(t)
    groups: list[list[PruneTarget]] = []
    last_input = None
    seen: set[str] = set()
    for name, input_id in order:
        if name in seen:
            continue
        seen.add(name)
        if input_id != last_input:
            groups.append([])
            last_input = input_id
        groups[-1].extend(by_module[name])
    unseen = [t for t in targets if t.module_name not in seen]
    if unseen:
        groups.append(unseen)
    return groups


class _ExpertStats(dict):
    """The block's statistics plus deferred per-expert ones, built when a target asks for them (`get`)."""

    def __init__(self, stats: dict, experts: ExpertStatisticsCollector) -> None:
        super().__init__(stats)
        self.experts = experts

    def target(self, target: "PruneTarget"):
        if target.expert is None:
            return self.get(target.stats_key)
        return self.experts.statistics(target.module_name, target.param, target.expert)


def _last_use(targets: list[PruneTarget], stats: dict) -> dict[int, list]:
    """For each target position, the input statistics no later target reads (freed once it is solved, so a block
    holds one Hessian factor at a time rather than one per input stream)."""
    last: dict[int, tuple[int, object]] = {}
    for position, t in enumerate(targets):
        s = stats.get(t.stats_key) if t.expert is None else None
        if s is not None:
            last[id(s.inputs)] = (position, s.inputs)
    by_position: dict[int, list] = {}
    for position, inputs in last.values():
        by_position.setdefault(position, []).append(inputs)
    return by_position


def _target_stats(stats: dict, target: PruneTarget):
    if isinstance(stats, _ExpertStats):
        s = stats.target(target)
        return None if s is None else s.rows(target.rows)
    s = stats.get(target.stats_key)
    return None if s is None else s.rows(target.rows)


def _block_output(block: nn.Module, hidden: torch.Tensor, batch: CapturedBatch, device: torch.device) -> torch.Tensor:
    """The block's output for `hidden` with `batch`'s other arguments, kept where `hidden` was stored (the CPU with
    `offload_activations`: one batch at a time on the device)."""
    out = block(hidden.to(device, non_blocking=True), *batch.args, **batch.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(hidden.device) if out.device != hidden.device else out


def _propagate(block: nn.Module, captured: list[CapturedBatch], device: torch.device) -> None:
    """Replace each batch's hidden states with the (pruned) block's output."""
    for batch in captured:
        batch.hidden_states = _block_output(block, batch.hidden_states, batch, device)


def _propagate_reference(block: nn.Module, captured: list[CapturedBatch], reference: list[torch.Tensor],
                         device: torch.device) -> None:
    """Advance the dense model's activations through the block, before it is pruned."""
    for number, batch in enumerate(captured):
        reference[number] = _block_output(block, reference[number], batch, device)


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's first layer (its input embeddings, if it has any) expects its inputs."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:  # dispatched by accelerate: inputs go where the first module executes
        first = next(iter(device_map.values()))
        if first not in ("disk", "meta"):
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    device = _module_device(embeddings if embeddings is not None else model)
    return _execution_device(embeddings) if device.type == "meta" else device


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    """Move every parameter and buffer outside the blocks to `device`; return a function that moves them back."""
    inside = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
    moved: list[tuple[nn.Module, str, bool, torch.device]] = []
    for module in model.modules():
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in store.items():
                if tensor is None or id(tensor) in inside or tensor.device == device:
                    continue
                moved.append((module, name, is_param, tensor.device))
                if is_param:
                    tensor.data = tensor.data.to(device)
                else:
                    store[name] = tensor.to(device)

    def restore() -> None:
        for module, name, is_param, home in moved:
            if is_param:
                module._parameters[name].data = module._parameters[name].data.to(home)
            else:
                module._buffers[name] = module._buffers[name].to(home)

    return restore
