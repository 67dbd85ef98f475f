"""Checks of the model and the calibration batches that need both, run once before block 0 is touched.

`prepare_batches` (pruner.py) checks what a batch alone can tell (types, shapes, masks); these checks compare the
batches with the model (vocabulary, positions, padding id) and the config with the model (`targets` patterns,
weights that are really there and finite). A run that would fail in block 7 after hours fails here instead.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from .configuration import D2PruneConfig
from .finite import check_model_weights


def check_before_pruning(model: nn.Module, batches: list[dict[str, torch.Tensor]], config: D2PruneConfig,
                         plan: tuple[nn.ModuleList, str, list[list[Any]]]) -> None:
    """Raise `ValueError` on anything that would make the run fail or silently go wrong later."""
    _check_materialised(model)
    blocks, prefix, targets = plan
    _check_target_patterns(config, blocks, prefix)
    check_model_weights(model, {t.module_name for block in targets for t in block}, config.on_nonfinite)
    if "input_ids" in batches[0]:
        _check_tokens(model, batches)


def _check_materialised(model: nn.Module) -> None:
    """Weights on the `meta` device are only fine when accelerate loads them on demand (CPU/disk offload)."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta and not any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise ValueError(
            f"{len(meta)} parameter(s) of the model (e.g. `{meta[0]}`) are on the `meta` device: the model holds no "
            "weights to prune. Load it with real weights (`from_pretrained` without `device_map=\"meta\"`, or "
            "`load_checkpoint_and_dispatch` for offloading) before pruning."
        )


def _check_target_patterns(config: D2PruneConfig, blocks: nn.ModuleList, prefix: str) -> None:
    """Every `targets` regex must match a Linear of the blocks: a typo would silently leave layers dense."""
    if config.targets is None:
        return
    names = [f"{prefix}.{i}.{local}" for i, block in enumerate(blocks)
             for local, module in block.named_modules() if isinstance(module, nn.Linear)]
    for pattern in config.targets:
        if not any(re.search(pattern, name) for name in names):
            example = names[0] if names else "(none)"
            raise ValueError(f"`targets` pattern {pattern!r} matches no Linear layer of the blocks (names look like "
                             f"{example!r}): fix or remove it.")


def _embedding_size(model: nn.Module) -> Optional[int]:
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
            raise ValueError(f"Calibration batch {i} holds token id {bad}, outside the vocabulary [0, {vocab}) of the "
                             "model: was it tokenized with another model's tokenizer?")
        if max_positions is not None and ids.shape[1] > max_positions:
            raise ValueError(f"Calibration batch {i} has sequences of {ids.shape[1]} tokens, more than the model's "
                             f"`max_position_embeddings` ({max_positions}): use `seq_len` <= {max_positions}.")
        if pad is not None and "attention_mask" not in batch:
            real = (ids != pad).sum(1)
            if bool((real < 2).any()):
                row = int(torch.nonzero(real < 2)[0, 0])
                raise ValueError(f"Calibration batch {i}, sequence {row} is padding (token id {pad}) with fewer than "
                                 "2 other tokens: padding would be calibrated on as data. Drop it, or pass an "
                                 "`attention_mask`.")
