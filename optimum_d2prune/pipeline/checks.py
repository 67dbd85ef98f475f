"""Checks of the model, the runtime and the calibration batches, run once before block 0 is touched.

`calibration.batches.prepare_batches` checks what a batch alone can tell (types, shapes, masks); these checks compare
the batches with the model (vocabulary, positions, padding id, every block stack reached), the config with the
model (`targets` patterns, weights that are really there and finite), and the runtime with the machine (the device
exists, the checkpoint folder is writable). A run that would fail in block 7 after hours fails here instead.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..architectures import ArchitectureAdapter
from ..calibration.hooks import HookManager, StopForward, calibration_context
from ..configuration import D2PruneConfig
from ..errors import ConfigError, InputError, OutputPathError, UnsupportedModelError
from ..io.atomic import check_writable
from .finite import check_model_weights
from .propagate import input_device
from .targets import ModelPlan

logger = logging.getLogger(__name__)


def check_before_pruning(model: nn.Module, batches: list[dict[str, torch.Tensor]], config: D2PruneConfig,
                         plan: ModelPlan, adapter: ArchitectureAdapter) -> ModelPlan:
    """Raise a `D2PruneError` on anything that would make the run fail or silently go wrong later; return the plan
    with its stacks in execution order."""
    if not (config.runtime.weights_from_rank0 and int(os.environ.get("RANK", "0")) > 0):
        _check_materialised(model)  # a rank without weights receives them from rank 0
    check_device(config.runtime.device)
    check_checkpoint_dir(config.runtime.checkpoint_dir)
    _check_target_patterns(config, plan)
    check_model_weights(model, {t.module_name for t in plan.targets()}, config.runtime.on_nonfinite)
    if "input_ids" in batches[0]:
        _check_tokens(model, batches)
    plan = order_stacks(model, plan, batches[0], adapter)
    _warn_if_sparse(plan, config)
    return plan


def check_device(device: str | None) -> None:
    """A device that exists on this machine (checked before anything loads or moves)."""
    if device is None:
        return
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"`device` {device!r}: CUDA is not available on this machine (no GPU, or a CPU-only "
                              "torch). Use device='cpu', or install a CUDA build of torch.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"`device` {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(0 to {torch.cuda.device_count() - 1}).")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"`device` {device!r}: MPS is not available on this machine; use device='cpu'.")


def check_checkpoint_dir(directory: str | None) -> None:
    """A checkpoint folder that can be created and written (probed with a temporary folder), before any work."""
    if directory is None:
        return
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"`checkpoint_dir` {directory} exists and is not a folder: choose a folder.")
    check_writable(path, "`checkpoint_dir`")


def order_stacks(model: nn.Module, plan: ModelPlan, batch: dict[str, torch.Tensor],
                 adapter: ArchitectureAdapter) -> ModelPlan:
    """With several block stacks, one forward of the first batch finds the order in which the model runs them; a
    stack the calibration inputs do not reach is refused with the stacks named and the remedy."""
    if len(plan.stacks) < 2:
        return plan
    order: list[int] = []

    def reached(number: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if number not in order:
                order.append(number)
            if len(order) == len(plan.stacks):
                raise StopForward

        return hook

    device = input_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    error = None
    with HookManager() as hooks, calibration_context(model):
        for number, stack in enumerate(plan.stacks):
            hooks.add(stack.blocks[0].register_forward_pre_hook(reached(number), with_kwargs=True))
        try:
            adapter.forward_model(model, inputs)
        except StopForward:
            pass
        except Exception as err:  # noqa: BLE001 - reported below with the stacks and the remedy
            error = err
    if len(order) == len(plan.stacks):
        return ModelPlan([plan.stacks[i] for i in order])
    names = ", ".join(f"{s.path} ({len(s.blocks)} blocks)" for s in plan.stacks)
    missing = [plan.stacks[i].path for i in range(len(plan.stacks)) if i not in order]
    why = f"the model's forward failed on it ({type(error).__name__}: {error})" if error else "they never reach it"
    example = plan.stacks[order[0]].path if order else plan.stacks[0].path
    raise UnsupportedModelError(
        f"{type(model).__name__} has {len(plan.stacks)} block stacks: {names}. The calibration batches do not reach "
        f"{', '.join(missing)}: {why}. Give inputs that reach every stack (e.g. `decoder_input_ids` or `labels` for "
        f"an encoder-decoder's decoder), or prune the stacks they reach with `targets`, e.g. "
        f"targets=[r'^{re.escape(example)}\\.'].")


def _warn_if_sparse(plan: ModelPlan, config: D2PruneConfig) -> None:
    """Pruning an already sparse model is allowed (e.g. raising 50 % to 70 %) but should not go unnoticed."""
    weights = [t.weight() for t in plan.targets()]
    weights = [w for w in weights if not w.is_meta]
    total = sum(w.numel() for w in weights)
    if not total:
        return
    zeros = sum(int((w == 0).sum()) for w in weights)
    if zeros / total > 0.01:
        logger.warning("The targeted weights are already %.2f%% zeros (the run prunes to %.2f%%)%s.",
                       100 * zeros / total, 100 * config.sparsity,
                       ": the result keeps at least the existing zeros" if zeros / total > config.sparsity else "")


def _check_materialised(model: nn.Module) -> None:
    """Weights on the `meta` device are only fine when accelerate loads them on demand (CPU/disk offload)."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta and not any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise InputError(
            f"{len(meta)} parameter(s) of the model (e.g. `{meta[0]}`) are on the `meta` device: the model holds no "
            "weights to prune. Load it with real weights (`from_pretrained` without `device_map=\"meta\"`, or "
            "`load_checkpoint_and_dispatch` for offloading) before pruning."
        )


def _check_target_patterns(config: D2PruneConfig, plan: ModelPlan) -> None:
    """Every `targets` regex must match a prunable layer of the blocks: a typo would silently leave layers dense."""
    if config.targets is None:
        return
    names = [t.name for t in plan.targets()]
    for pattern in config.targets:
        if not any(re.search(pattern, name) for name in names):
            example = names[0] if names else "(none)"
            raise InputError(f"`targets` pattern {pattern!r} matches no Linear layer of the blocks (names look like "
                             f"{example!r}): fix or remove it.")


def _embedding_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    size = getattr(embeddings, "num_embeddings", None)
    return size if size is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def _check_tokens(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    config = getattr(model, "config", None)
    vocab = _embedding_size(model)
    max_positions = getattr(config, "max_position_embeddings", None)
    pad = getattr(config, "pad_token_id", None)
    for i, batch in enumerate(batches):
        ids = batch["input_ids"]
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            bad = low if low < 0 else high
            raise InputError(f"Calibration batch {i} holds token id {bad}, outside the vocabulary [0, {vocab}) of the "
                             "model: was it tokenized with another model's tokenizer?")
        if max_positions is not None and ids.shape[1] > max_positions:
            raise InputError(f"Calibration batch {i} has sequences of {ids.shape[1]} tokens, more than the model's "
                             f"`max_position_embeddings` ({max_positions}): use `seq_len` <= {max_positions}.")
        if pad is not None and "attention_mask" not in batch:
            real = (ids != pad).sum(1)
            if bool((real < 2).any()):
                row = int(torch.nonzero(real < 2)[0, 0])
                raise InputError(f"Calibration batch {i}, sequence {row} is padding (token id {pad}) with fewer than "
                                 "2 other tokens: padding would be calibrated on as data. Drop it, or pass an "
                                 "`attention_mask`.")
