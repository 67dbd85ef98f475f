"""Block-level reconstruction (`reconstruction=True`): after a block is pruned, refit the surviving weights of
its output projections against the dense block.

Layer-wise pruning fits each linear to its *own* dense output on the pruned block's inputs, so the errors of q/k/v
(or gate/up) reach the residual stream uncorrected. For an output projection W (the attention output and the last
MLP linear: the linears whose outputs are added to the residual stream), with X_p its input in the pruned block and
X_d its input in the dense block on the same block inputs, this pass solves, per row and over the surviving entries,

    min_W' ‖W_d X_d − W' X_p‖² + δ‖W' − W_d‖²      (normal equations: W' (G + δI) = W_d (C + δI))

with `G = X_p X_pᵀ`, `C = X_d X_pᵀ` and δ the usual dampening (`damp_percent · mean diag G`). It is the refit of
`methods/solvers/obs.py` with another right-hand side, solved by the same preconditioned conjugate gradients; rows whose
error would not go down keep their weights. With `admm_steps` the projection's mask is first re-selected by ADMM on
this objective (`methods/solvers/admm.py` with `target = W_d C + δW_d`; the layer solve then stops after its sweep), and
the whole matrix keeps its old weights if the error would not go down (its zeros may move between rows). Output
projections are found from structure only: the single linear of the group that follows the q/k/v group, and the
single linear of the block's last group (`output_projections`).

Only `Y_d = W_d X_d` enters the sums (`W_d C = Σ y_d x_pᵀ`), so `DenseOutputRecorder` keeps it from the dense
statistics pass the engine runs anyway (the size of the block's captured hidden states per projection): the pass
after pruning then runs the pruned block only, half the forwards of swapping the dense weights back in per batch.
Without a recording (sequential calibration: no pass runs the whole dense block) the dense weights are
swapped in.

`reference="model"` (`ReconstructionOptions`) changes the target of the block's last output projection (down_proj, fc2):
with `h_d` the dense *model*'s block output (the engine propagates the dense model's activations beside the pruned
ones) and `r_p` the pruned block's residual stream before that projection adds to it, the projection is refit to
`h_d − r_p`, so it also takes out the error of the pruned attention and of the blocks before (the residual stream is
read as the block output less the projection's output; blocks where shifting the projection's output does not shift
the block output the same, post-norm ones, keep the dense-block target). Fitting every output projection to the
dense model's own projection outputs instead was measured much worse (benchmarks/results/high_sparsity_candidates.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..calibration.hooks import HookManager, StopForward
from ..configuration import ReconstructionOptions
from ..methods.solvers.admm import admm_support
from ..methods.solvers.base import LayerProblem
from ..methods.solvers.obs import refit_surviving_weights
from ..pipeline.capture import CapturedBatch
from ..pipeline.context import BlockRun, RunServices
from ..pipeline.propagate import block_output, module_device
from ..report import ReconstructionRecord

logger = logging.getLogger(__name__)


def output_projections(groups: list[list]) -> list:
    """The targets whose outputs feed the residual stream, from the block's sequential groups (execution order,
    one group per input stream): the lone linear of the group right after the one holding q/k/v, and the lone
    linear of the last group. Row blocks of fused matrices and expert matrices are never chosen."""

    def lone(group: list):
        plain = len(group) == 1 and group[0].rows is None and group[0].expert is None
        return group[0] if plain and not group[0].projection else None

    chosen = []
    attention = next((i for i, g in enumerate(groups) if any(t.projection for t in g)), None)
    if attention is not None and attention + 1 < len(groups) - 1:
        chosen.append(lone(groups[attention + 1]))
    if groups and (attention is None or len(groups) - 1 > attention):
        chosen.append(lone(groups[-1]))
    return [t for t in chosen if t is not None]


def reconstruction_groups(groups: list[list], scope: str) -> list[list]:
    """The targets to refit, one list per shared input stream, in execution order. "outputs": the output
    projections (`output_projections`); "all": also every other plain linear whose input the block's pruning
    changes, i.e. of every group after the q/k/v one (gate/up, fc1). Row blocks and expert matrices never."""
    if scope == "outputs":
        return [[t] for t in output_projections(groups)]
    attention = next((i for i, g in enumerate(groups) if any(t.projection for t in g)), 0)
    chosen = [[t for t in group if t.rows is None and t.expert is None and not t.projection]
              for group in groups[attention + 1:]]
    return [group for group in chosen if group]


class DenseOutputRecorder:
    """Keeps what each output projection adds to the residual stream (its output less its bias) on the calibration
    tokens while the dense block runs its statistics pass: the target of the reconstruction, recorded once.

    Attach it to the pass like an attention capture (`token_mask` set per batch, `remove()` after); one entry per
    batch and projection, in the output's dtype, on `store_device` (where the calibration activations are kept).
    """

    def __init__(self, targets: list, store_device: torch.device) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
        self.token_mask: Optional[torch.Tensor] = None
        self.store_device = store_device
        self._handles = [t.module.register_forward_hook(self._hook_for(t.name)) for t in targets]

    def _hook_for(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            flat = _flat_tokens(output, self.token_mask)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                flat = flat - bias.detach().float()
            self.outputs[name].append(flat.to(self.store_device, output.dtype))

        return hook

    def complete(self, name: str, batches: int) -> Optional[list[torch.Tensor]]:
        """The recording of `name` if the pass saw every one of the `batches` (None: swap the dense weights in)."""
        recorded = self.outputs.get(name, [])
        return recorded if len(recorded) == batches else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class _Sums:
    gram: torch.Tensor  # Σ x_p x_pᵀ (shared by the targets of one input stream)
    cross: dict[str, torch.Tensor]  # per target Σ y_d x_pᵀ = W_d Σ x_d x_pᵀ ([rows, cols]: the right-hand side)
    energy: dict[str, torch.Tensor]  # per target and row Σ y_d² (the constant of the error, for the report)


def _flat_tokens(x: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if token_mask is not None and not bool(token_mask.all()):
        flat = flat[token_mask.reshape(-1).to(flat.device)]
    return flat


def _block_pass(block: nn.Module, module: nn.Module, batch: CapturedBatch, stop: bool = False,
                shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`module`'s input and output and the block's output when `batch` runs through `block`: with `stop` the
    forward ends right after `module` (no block output), `shift` is added to the module's output."""
    seen: list[torch.Tensor] = []

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor):
        seen[:] = [inputs[0], output]
        if stop:
            raise StopForward
        return output + shift if shift else None

    out = None
    with HookManager() as hooks:
        hooks.add(module.register_forward_hook(hook))
        try:
            device = next(block.parameters()).device  # activations may be offloaded to the CPU
            out = block(batch.hidden_states.to(device), *batch.args, **batch.kwargs)
        except StopForward:
            pass
    if not seen:
        raise RuntimeError("The output projection did not run during the block's forward.")
    return seen[0], seen[1], out[0] if isinstance(out, (tuple, list)) else out


def _input_of(block: nn.Module, module: nn.Module, batch: CapturedBatch) -> torch.Tensor:
    """The input `module` receives when `batch` runs through `block` (the forward stops right after it)."""
    return _block_pass(block, module, batch, stop=True)[0]


@dataclass
class _Block:
    """The block being refit: its module, every target, their weights before pruning, the calibration batches."""

    module: nn.Module
    targets: list
    dense: dict[str, torch.Tensor]
    batches: list[CapturedBatch]


def _accumulate(state: _Block, group: list, recorded: Optional[dict[str, list[torch.Tensor]]]) -> _Sums:
    """Sums over the calibration batches for targets sharing one input. The dense outputs come from `recorded` or,
    without it, from swapping the block between its dense and pruned weights per batch."""
    block, block_targets, dense, captured = state.module, state.targets, state.dense, state.batches
    swap = recorded is None
    pruned = {t.name: t.weight().detach().clone() for t in block_targets} if swap else {}
    cols = group[0].weight().shape[1]
    device = group[0].weight().device
    w_d = {t.name: dense[t.name].to(device, torch.float32) for t in group}
    sums = _Sums(torch.zeros(cols, cols, dtype=torch.float32, device=device),
                 {name: torch.zeros_like(w) for name, w in w_d.items()},
                 {name: torch.zeros(w.shape[0], dtype=torch.float64, device=device) for name, w in w_d.items()})
    try:
        for number, batch in enumerate(captured):
            if swap:
                for t in block_targets:
                    t.write(dense[t.name])
                x_d = _flat_tokens(_input_of(block, group[0].module, batch), batch.token_mask).to(device)
                for t in block_targets:
                    t.write(pruned[t.name])
            x_p = _flat_tokens(_input_of(block, group[0].module, batch), batch.token_mask).to(device)
            sums.gram.addmm_(x_p.t(), x_p)
            for name, w in w_d.items():
                y_d = x_d @ w.t() if swap else recorded[name][number].to(device, torch.float32)
                sums.cross[name].addmm_(y_d.t(), x_p)
                sums.energy[name].add_(y_d.square().sum(0))
    finally:
        if swap:
            for t in block_targets:
                t.write(pruned[t.name])
    return sums


def _accumulate_to_model_output(state: _Block, target, model_outputs: list[torch.Tensor]) -> Optional[_Sums]:
    """The sums for the block's last projection with the dense model's block outputs as the target: what it must
    add to the pruned block's residual stream (the block output less the projection's output) to give them, less
    its bias (the sums hold outputs less bias). None when the block output is not that residual stream plus the
    projection's output (post-norm blocks such as OPT-350m's, Gemma's normed MLP output): shifting the
    projection's output by 1 on the first batch must shift the block's by 1 (the median entry: half-precision
    rounding of large activations moves single entries)."""
    block, dense, captured = state.module, state.dense, state.batches
    device = target.weight().device
    w_d = dense[target.name].to(device, torch.float32)
    cols = w_d.shape[1]
    sums = _Sums(torch.zeros(cols, cols, dtype=torch.float32, device=device), {target.name: torch.zeros_like(w_d)},
                 {target.name: torch.zeros(w_d.shape[0], dtype=torch.float64, device=device)})
    bias = getattr(target.module, "bias", None)
    for number, batch in enumerate(captured):
        x_p, y_p, out = _block_pass(block, target.module, batch)
        if number == 0:
            shifted = _block_pass(block, target.module, batch, shift=1.0)[2]
            if float((shifted.float() - out.float() - 1).abs().median()) >= 0.1:
                return None
        x_p = _flat_tokens(x_p, batch.token_mask).to(device)
        residual = _flat_tokens(out, batch.token_mask) - _flat_tokens(y_p, batch.token_mask)
        y_t = _flat_tokens(model_outputs[number], batch.token_mask).to(device) - residual.to(device)
        if isinstance(bias, torch.Tensor):
            y_t = y_t - bias.detach().float()
        sums.gram.addmm_(x_p.t(), x_p)
        sums.cross[target.name].addmm_(y_t.t(), x_p)
        sums.energy[target.name].add_(y_t.square().sum(0))
    return sums


def _row_errors(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Per row `‖w_d X_d − w X_p‖²` from the sums."""
    return energy - (2 * (cross * w).sum(1) - ((w @ gram) * w).sum(1)).double()




class BlockReconstruction:
    """The block refiner: before a block's statistics pass it keeps the dense weights and finds the projections to
    refit (those it takes over stop their layer solve after the sweep: `replaces`); after the block's layer solves
    it refits them (`finish_block`). With `reference="model"` it also carries the dense model's activations
    (`streams`, checkpointed with the run)."""

    def __init__(self, options: ReconstructionOptions, admm_steps: int, services: RunServices) -> None:
        self.options = options
        self.admm_steps = admm_steps
        self.services = services
        self.streams: Optional[list[torch.Tensor]] = None  # the dense model's activations entering the block
        self._block: Optional[_Block] = None
        self._outputs: list = []
        self._scope: list[list] = []
        self._replaced: frozenset[str] = frozenset()
        self._recorder: Optional[DenseOutputRecorder] = None

    def start_stack(self, batches: list[CapturedBatch]) -> None:
        """A new stack's block-0 inputs: the dense model's stream starts from them."""
        self.streams = [b.hidden_states.clone() for b in batches] if self.options.reference == "model" else None

    def advance(self, run: BlockRun) -> None:
        """Advance the dense model's stream through the dense block (before it is pruned)."""
        if self.streams is not None:
            with self.services.phase("propagate"):
                device = module_device(run.block)
                for number, batch in enumerate(run.batches):
                    self.streams[number] = block_output(run.block, self.streams[number], batch, device)

    def start_block(self, run: BlockRun) -> None:
        """Keep the dense weights and choose what to refit (`run.groups`: the targets in execution order)."""
        self._block = _Block(run.block, run.targets, {t.name: t.weight().detach().clone() for t in run.targets},
                             run.batches)
        self._outputs = output_projections(run.groups or [])
        self._scope = reconstruction_groups(run.groups or [], self.options.targets)
        self._replaced = frozenset(t.name for group in self._scope for t in group if self.admm_steps)

    def replaces(self, target) -> bool:
        return target.name in self._replaced

    def observers(self, passes: int) -> list:
        """The recorder of the dense output projections' outputs, when one statistics pass runs the whole dense
        block (`passes == 1`: no sequential calibration)."""
        if self._outputs and passes == 1:
            self._recorder = DenseOutputRecorder(self._outputs, self._block.batches[0].hidden_states.device)
            return [self._recorder]
        return []

    def finish_block(self, run: BlockRun) -> None:
        skipped = self.services.report.skipped
        groups = [[t for t in group if t.name not in skipped and t.module_name not in skipped] for group in self._scope]
        groups = [group for group in groups if group]
        last = self._outputs[-1].name if self._outputs and run.groups and self._outputs[-1].name in {
            t.name for t in run.groups[-1]} else None
        try:
            with self.services.phase("reconstruction"):
                for group in groups:
                    self._refit_group(run, group, last)
        finally:
            if self._recorder is not None:
                self._recorder.remove()
            self._recorder = None
            self._block = None

    def _sums(self, run: BlockRun, group: list, last: Optional[str]) -> tuple[_Sums, bool]:
        """The accumulated sums of one input stream, and whether the model-output target fell back to the block's."""
        recorder = self._recorder
        recorded = ({t.name: recorder.complete(t.name, len(run.batches)) for t in group}
                    if recorder is not None else {})
        complete = bool(recorded) and all(r is not None for r in recorded.values())
        if self.streams is not None and [t.name for t in group] == [last]:
            sums = _accumulate_to_model_output(self._block, group[0], self.streams)
            if sums is not None:
                return sums, False
            if not any(r.reference_fallback for r in self.services.report.reconstruction):
                logger.warning("Block %d: its output is not its residual stream plus %s's output (post-norm "
                               "block?); that projection is refit to the dense block's output instead of the dense "
                               "model's, here and in every later block where this holds (the report's "
                               "`reconstruction` records say which).", run.index, group[0].name)
            return _accumulate(self._block, group, recorded if complete else None), True
        return _accumulate(self._block, group, recorded if complete else None), False

    def _refit_group(self, run: BlockRun, group: list, last: Optional[str]) -> None:
        """Refit the targets of one input stream against the dense block (or the dense model's output)."""
        sums, fallback = self._sums(run, group, last)
        self.services.dist.all_reduce_tensors([sums.gram, *sums.cross.values(), *sums.energy.values()])
        diag = torch.diagonal(sums.gram)
        damp = self.options.damp_percent * float(diag.mean()) if float(diag.mean()) > 0 else 1.0
        hessian = sums.gram + damp * torch.eye(len(diag), device=diag.device)
        dead = diag == 0
        for target in group:
            w_d = self._block.dense[target.name].to(sums.gram.device, torch.float32)
            w = target.weight().detach().to(sums.gram.device, torch.float32)
            cross, energy = sums.cross[target.name], sums.energy[target.name]
            rhs = cross + damp * w_d
            start, mask = w, w == 0
            pattern = run.pattern_of(target) if self.admm_steps else None
            if pattern is not None:
                start, mask = admm_support(LayerProblem(w_d, hessian, rhs, dead), w, mask, pattern, self.admm_steps)
            refit = refit_surviving_weights(LayerProblem(w_d, hessian, rhs), start, mask, self.options.refit_steps,
                                            self.options.refit_tolerance)
            before = _row_errors(w, sums.gram, cross, energy)
            after = _row_errors(refit, sums.gram, cross, energy)
            if pattern is not None and not pattern.is_nm:  # zeros moved between rows: the whole matrix or nothing
                better = (after.sum() < before.sum()).expand_as(after)
            else:
                better = after < before  # a row never gets worse
            refit = torch.where(better.unsqueeze(1), refit, w)
            after = torch.where(better, after, before)
            target.write(refit)
            total = float(energy.sum())
            scale = 1.0 / total if total > 0 else 0.0
            record = ReconstructionRecord(run.index, target.name, float(before.sum()) * scale,
                                          float(after.sum()) * scale, reference_fallback=fallback)
            logger.debug("block %d %s: block-level refit error %.4g -> %.4g", run.index, target.name,
                         record.error_before, record.error_after)
            self.services.report.reconstruction.append(record)
