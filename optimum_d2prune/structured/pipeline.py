"""`shrink(model, batches, config)`: the orchestration of a structured shrink, in place.

1. plan (refusals before any work: mode, ratio, what the config can express);
2. calibration: block inputs captured once, then block by block: the consumer's statistics on the inputs the
   already-shrunk blocks produce, the units chosen and cut, the consumer compensated, the block's outputs
   propagated (as the unstructured engine does); experts: routing statistics instead; blocks: one dense pass;
3. the config updated, so that `save_pretrained` writes a standard checkpoint of the smaller model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hooks import calibration_context
from ..errors import ConfigError, ModelStateError
from .blocks import blocks_to_remove, measure
from .calibration import (
    BlockInputs,
    as_batches,
    capture_inputs,
    collect_consumer,
    forward_block,
    model_device,
)
from .compensation import bias_shift, damping, least_squares_refit, output_error
from .config import StructuredConfig
from .experts import collect_usage
from .layout import UnitLayout, in_dim, matrix
from .plan import ShrinkPlan, block_config_changes, block_layout, blocks_of, check_expressible, plan_shrink
from .report import ShrinkReport, UnitRecord
from .saliency import DualTaylorTerms, d2prune_scores, flap_scores, group_sum, lowest, obs_select, wanda_scores
from .statistics import ConsumerStatistics
from .surgery import (
    add_zero_bias,
    apply_config_changes,
    remove_blocks,
    remove_units,
    set_parameter,
    update_expert_counts,
)

logger = logging.getLogger(__name__)

#: the OBS selection and the refit run in float64 up to this many inputs (exact and cheap), float32 above
FLOAT64_MAX_COLUMNS = 4096


def shrink(model: nn.Module, batches: Any, config: StructuredConfig) -> ShrinkReport:
    """Shrink `model` in place to a smaller dense model with a standard config, and report what was removed.

    Args:
        model: a transformers model (causal LM, image classifier, ...) whose blocks can be found.
        batches: calibration batches (`{"input_ids", "attention_mask"}` or `{"pixel_values"}` dicts, or tensors of
            token ids), e.g. `get_calibration_dataset(...)`; may be None for saliency='magnitude' without compensation.
        config: a `StructuredConfig`.

    Example:
    ```python
    >>> report = shrink(model, calib, StructuredConfig(mode="channels", ratio=0.2))
    >>> save_shrunk(model, "smollm2-channels-20", report, tokenizer=tokenizer)
    ```
    """
    if not isinstance(config, StructuredConfig):
        raise ConfigError(f"`config` must be a StructuredConfig, got {type(config).__name__}.")
    started = time.perf_counter()
    plan = plan_shrink(model, config)
    needs_data = not (config.saliency == "magnitude" and config.compensation == "none")
    data = as_batches(batches) if needs_data else None
    params_before = sum(p.numel() for p in model.parameters())
    report = ShrinkReport(config.mode, config.saliency, config.compensation, config.ratio, plan.achieved_ratio,
                          plan.block_params, 0, params_before, 0, config=config.to_dict())
    _, blocks = blocks_of(model)
    report.kept_blocks = list(range(len(blocks)))
    if config.mode == "blocks":
        _shrink_blocks(model, plan, data, config, report)
    else:
        _shrink_units(model, plan, data, config, report)
    report.config_changes = apply_config_changes(model, plan.config_changes)
    if config.mode == "experts":
        layout = plan.layouts[0]
        update_expert_counts(model, layout.units, layout.units - plan.remove)
    report.added_biases = list(plan.added_biases)
    report.block_params_after = sum(p.numel() for p in blocks_of(model)[1].parameters())
    report.params_after = sum(p.numel() for p in model.parameters())
    report.seconds = time.perf_counter() - started
    logger.info("%s (%.1f s)", report.describe(), report.seconds)
    return report


def _shrink_blocks(model: nn.Module, plan: ShrinkPlan, data: list, config: StructuredConfig,
                   report: ShrinkReport) -> None:
    _, blocks = blocks_of(model)
    similarity = measure(model, blocks, data, plan.remove)
    removed = blocks_to_remove(similarity, config.saliency)
    scores = similarity.angular if config.saliency == "angular" else similarity.influence()
    plan.config_changes = block_config_changes(model, removed)
    check_expressible(model, plan, removed)  # on the blocks actually chosen, before the model changes
    remove_blocks(model, plan.blocks_path, removed)
    report.removed_blocks = removed
    report.block_scores = [round(float(s), 6) for s in scores]
    report.kept_blocks = [i for i in range(plan.num_blocks) if i not in set(removed)]


@dataclass
class _UnitCut:
    """What removing units from one block needs: the model, the config, the plan's count per block, the calibration
    inputs of the block (None without data) and the device the statistics are computed on."""

    model: nn.Module
    config: StructuredConfig
    count: int
    inputs: Optional[BlockInputs]
    device: torch.device


def _shrink_units(model: nn.Module, plan: ShrinkPlan, data: Optional[list], config: StructuredConfig,
                  report: ShrinkReport) -> None:
    _, blocks = blocks_of(model)
    inputs = capture_inputs(model, blocks, data) if data is not None else None
    device = torch.device(config.device) if config.device else model_device(model)
    cut = _UnitCut(model, config, plan.remove, inputs, device)
    with calibration_context(model):
        for i, block in enumerate(tqdm(blocks, desc=f"shrink {config.mode}", unit="block")):
            try:
                _shrink_block(cut, plan, report, i)
            except Exception as err:
                if not report.units:
                    raise
                raise ModelStateError(f"Shrinking stopped at block {i} ({type(err).__name__}: {err}); blocks "
                                      f"0-{i - 1} are already cut while the config is not updated: reload the model "
                                      "before using it.") from err
            if inputs is not None and i < len(blocks) - 1:
                inputs.hidden = forward_block(block, inputs, i)


def _shrink_block(cut: _UnitCut, plan: ShrinkPlan, report: ShrinkReport, index: int) -> None:
    layout = next((layout for layout in plan.layouts if layout.block == index), None)
    if layout is None:
        return
    added = [n for n in plan.added_biases if n.startswith(f"{plan.blocks_path}.{index}.")]
    for name in added:
        add_zero_bias(cut.model, name)
    if added:  # the new biases are sliced with their units
        layout = block_layout(cut.model, cut.config.mode, index)
    block = blocks_of(cut.model)[1][index]
    remove = _remove_experts if layout.kind == "experts" else _remove_groups
    report.units.append(remove(cut, block, layout))


def _remove_experts(cut: _UnitCut, block: nn.Module, layout: UnitLayout) -> UnitRecord:
    model, count = cut.model, cut.count
    experts = model.get_submodule(layout.info["experts"])
    usage = collect_usage(block, experts, layout.units, cut.inputs, layout.block)
    removed = lowest(usage.scores(cut.config.saliency), count)
    remove_units(model, layout, removed)
    update_expert_counts(model.get_submodule(layout.module), layout.units, layout.units - count)
    return UnitRecord(layout.block, "experts", layout.units, removed.tolist())


def unit_square_norms(model: nn.Module, layout: UnitLayout) -> torch.Tensor:
    """Sum of squares of every weight a unit owns (all of its parameter slices)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    total = torch.zeros(layout.units, dtype=torch.float64)
    for s in layout.slices:
        p = params[s.name].detach().float().movedim(s.dim, 0)
        total += p[s.index.reshape(-1).to(p.device)].reshape(layout.units, -1).square().sum(1).double().cpu()
    return total


def _remove_groups(cut: _UnitCut, block: nn.Module, layout: UnitLayout) -> UnitRecord:
    """Choose, compensate and cut `cut.count` channels / key-value groups of one block."""
    model, config, inputs, count, device = cut.model, cut.config, cut.inputs, cut.count, cut.device
    consumer = model.get_submodule(layout.consumer)
    record = UnitRecord(layout.block, layout.kind, layout.units, [])
    if inputs is None:  # magnitude, no compensation: no data
        removed = lowest(unit_square_norms(model, layout), count)
        remove_units(model, layout, removed)
        record.removed = removed.tolist()
        return record
    w = matrix(consumer).detach().to(device=device, dtype=torch.float32)
    cols = w.shape[1]
    stats = ConsumerStatistics(cols, device, inputs.seq_len)
    collect_consumer(block, consumer, inputs, layout.block, stats.add)
    bias = getattr(consumer, "bias", None)
    dtype = torch.float64 if cols <= FLOAT64_MAX_COLUMNS else torch.float32
    used = w if bias is None else torch.cat([w, bias.detach().to(device, torch.float32).unsqueeze(1)], dim=1)
    used = used.to(dtype)
    gram = (stats.gram if bias is None else stats.augmented_gram()).to(dtype)
    groups = layout.columns.to(device)
    removed = _select(cut, layout, _Consumer(used, gram, stats, groups))
    removed_cols = groups[removed].reshape(-1)
    keep = torch.ones(used.shape[1], dtype=torch.bool, device=device)
    keep[removed_cols] = False
    keep_idx = keep.nonzero().squeeze(1)
    if config.compensation == "least_squares":
        new = least_squares_refit(used, gram, keep_idx, config.damp_percent, features=cols)
    else:
        new = used[:, keep_idx].clone()
        if config.compensation == "bias":
            new[:, -1] += bias_shift(w, stats.mean(), removed_cols).to(dtype)
    full = torch.zeros_like(used)
    full[:, keep_idx] = new
    masked = used.clone()
    masked[:, removed_cols] = 0
    reference = max(output_error(used, gram), 1e-30)
    record.error_masked = output_error(used - masked, gram) / reference
    record.error = output_error(used - full, gram) / reference
    remove_units(model, layout, removed)
    _write_consumer(model, layout.consumer, new, bias is not None)
    record.removed = removed.tolist()
    return record


@dataclass
class _Consumer:
    """The consuming layer's problem: its weights (bias as the last column, if any), the Gram matrix of its inputs,
    their statistics, and the columns of each unit."""

    used: torch.Tensor
    gram: torch.Tensor
    stats: ConsumerStatistics
    groups: torch.Tensor


def _select(cut: _UnitCut, layout: UnitLayout, consumer: _Consumer) -> torch.Tensor:
    """The `cut.count` units to remove, by the configured saliency."""
    model, config, count = cut.model, cut.config, cut.count
    used, gram, stats, groups = consumer.used, consumer.gram, consumer.stats, consumer.groups
    cols = stats.columns
    w = used[:, :cols]
    if config.saliency == "magnitude":
        return lowest(unit_square_norms(model, layout), count)
    if config.saliency == "wanda":
        return lowest(wanda_scores(w, stats, groups), count)
    if config.saliency == "flap":
        return lowest(flap_scores(w, stats, groups), count)
    dual = DualTaylorTerms.of(stats, config.lambda1, config.lambda2,
                              config.resolve_activation_scale(stats.seq_len))
    if config.compensation != "least_squares":
        return lowest(d2prune_scores(w, stats, groups, dual), count)
    hessian = gram * (2.0 / max(stats.tokens, 1))
    hessian = hessian + torch.diag(damping(hessian, config.damp_percent, features=cols))
    extra = (lambda current: group_sum(dual.per_column(current).to(current.dtype), groups)) if dual.active else None
    return obs_select(used, hessian, groups, count, config.selection_rounds, extra).to(groups.device)


def _write_consumer(model: nn.Module, name: str, new: torch.Tensor, has_bias: bool) -> None:
    """Write the compensated `[rows, kept (+ bias)]` weights into the (already cut) consumer."""
    consumer = model.get_submodule(name)
    weight = new[:, :-1] if has_bias else new
    set_parameter(model, f"{name}.weight", weight if in_dim(consumer) == 1 else weight.t())
    if has_bias:
        set_parameter(model, f"{name}.bias", new[:, -1])
