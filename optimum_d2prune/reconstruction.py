"""Block-level reconstruction (`block_reconstruction=True`): after a block is pruned, refit the surviving weights of
its output projections against the dense block.

Layer-wise pruning fits each linear to its *own* dense output on the pruned block's inputs, so the errors of q/k/v
(or gate/up) reach the residual stream uncorrected. For an output projection W (the attention output and the last
MLP linear: the linears whose outputs are added to the residual stream), with X_p its input in the pruned block and
X_d its input in the dense block on the same block inputs, this pass solves, per row and over the surviving entries,

    min_W' ‖W_d X_d − W' X_p‖² + δ‖W' − W_d‖²      (normal equations: W' (G + δI) = W_d (C + δI))

with `G = X_p X_pᵀ`, `C = X_d X_pᵀ` and δ the usual dampening (`damp_percent · mean diag G`). It is the refit of
`solvers/obs.py` with another right-hand side, solved by the same preconditioned conjugate gradients; rows whose
error would not go down keep their weights. Output projections are found from structure only: the single linear
of the group that follows the q/k/v group, and the single linear of the block's last group (`output_projections`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .hooks import CapturedBatch, HookManager, _StopForward
from .report import ReconstructionRecord
from .solvers.obs import refit_surviving_weights

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


@dataclass
class _Sums:
    gram: torch.Tensor  # Σ x_p x_pᵀ
    cross: torch.Tensor  # Σ x_d x_pᵀ (as [cols_d, cols_p])
    energy: torch.Tensor  # per row Σ (w_d x_d)² (dense output energy: the constant of the error, for the report)


def _flat_tokens(x: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if token_mask is not None and not bool(token_mask.all()):
        flat = flat[token_mask.reshape(-1).to(flat.device)]
    return flat


def _input_of(block: nn.Module, module: nn.Module, batch: CapturedBatch) -> torch.Tensor:
    """The input `module` receives when `batch` runs through `block` (the forward stops right after it)."""
    seen: list[torch.Tensor] = []

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.append(inputs[0])
        raise _StopForward

    with HookManager() as hooks:
        hooks.add(module.register_forward_hook(hook))
        try:
            device = next(block.parameters()).device  # activations may be offloaded to the CPU
            block(batch.hidden_states.to(device), *batch.args, **batch.kwargs)
        except _StopForward:
            pass
    if not seen:
        raise RuntimeError("The output projection did not run during the block's forward.")
    return seen[0]


def _accumulate(block: nn.Module, target, block_targets: list, dense: dict[str, torch.Tensor],
                captured: list[CapturedBatch]) -> _Sums:
    """Sums over the calibration batches, swapping the block between its dense and pruned weights per batch."""
    pruned = {t.name: t.weight().detach().clone() for t in block_targets}
    cols = target.in_features
    device = pruned[target.name].device
    w_d = dense[target.name].to(device, torch.float32)
    sums = _Sums(*(torch.zeros(cols, cols, dtype=torch.float32, device=device) for _ in range(2)),
                 torch.zeros(w_d.shape[0], dtype=torch.float64, device=device))
    try:
        for batch in captured:
            for t in block_targets:
                t.write(dense[t.name])
            x_d = _flat_tokens(_input_of(block, target.module, batch), batch.token_mask).to(device)
            for t in block_targets:
                t.write(pruned[t.name])
            x_p = _flat_tokens(_input_of(block, target.module, batch), batch.token_mask).to(device)
            sums.gram.addmm_(x_p.t(), x_p)
            sums.cross.addmm_(x_d.t(), x_p)
            sums.energy.add_((x_d @ w_d.t()).square().sum(0))
    finally:
        for t in block_targets:
            t.write(pruned[t.name])
    return sums


def _row_errors(w: torch.Tensor, w_d: torch.Tensor, sums: _Sums) -> torch.Tensor:
    """Per row `‖w_d X_d − w X_p‖²` from the sums."""
    return sums.energy - (2 * ((w_d @ sums.cross) * w).sum(1) - ((w @ sums.gram) * w).sum(1)).double()


def reconstruct_block_outputs(
    index: int,
    block: nn.Module,
    block_targets: list,
    outputs: list,
    dense: dict[str, torch.Tensor],
    captured: list[CapturedBatch],
    damp_percent: float,
    steps: int,
    tolerance: float = 0.0,
    reduce: Callable[[list[torch.Tensor]], None] = lambda tensors: None,
) -> list[ReconstructionRecord]:
    """Refit each of `outputs` (in execution order, so the later ones see the earlier refits) against the dense
    block; `dense` maps every target name of the block to its weight before pruning. Returns one record each.

    `reduce` sums the accumulated tensors over data-parallel ranks (identity when not distributed).
    """
    records = []
    for target in outputs:
        sums = _accumulate(block, target, block_targets, dense, captured)
        reduce([sums.gram, sums.cross, sums.energy])
        w_d = dense[target.name].to(sums.gram.device, torch.float32)
        w = target.weight().detach().to(sums.gram.device, torch.float32)
        pruned = w == 0
        diag = torch.diagonal(sums.gram)
        damp = damp_percent * float(diag.mean()) if float(diag.mean()) > 0 else 1.0
        hessian = sums.gram + damp * torch.eye(len(diag), device=diag.device)
        rhs = w_d @ sums.cross + damp * w_d
        refit = refit_surviving_weights(w_d, w, pruned, hessian, steps, tolerance=tolerance, target=rhs)
        before, after = _row_errors(w, w_d, sums), _row_errors(refit, w_d, sums)
        refit = torch.where((after < before).unsqueeze(1), refit, w)  # a row never gets worse
        after = torch.minimum(after, before)
        target.write(refit)
        energy = float(sums.energy.sum())
        scale = 1.0 / energy if energy > 0 else 0.0
        record = ReconstructionRecord(index, target.name, float(before.sum()) * scale, float(after.sum()) * scale)
        logger.debug("block %d %s: block-level refit error %.4g -> %.4g", index, target.name, record.error_before,
                     record.error_after)
        records.append(record)
    return records
