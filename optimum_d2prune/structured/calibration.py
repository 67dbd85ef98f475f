"""Calibration passes of a shrink: block inputs captured once, then propagated block by block through the shrunk
blocks, with hooks that read what a block's layers see.

Every block's own arguments (masks, position embeddings: they differ between sliding and full attention layers) are
recorded in one forward of the model with pre-hooks on the blocks; after that, only blocks run. Hooks are registered
through `HookManager` and removed in `finally`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..calibration.hooks import HookManager, calibration_context
from ..errors import InputError
from ..pipeline.capture import split_hidden_states

logger = logging.getLogger(__name__)

Batch = Union[dict[str, torch.Tensor], torch.Tensor]


class _Stop(Exception):
    """Raised by the last block's pre-hook once every block's arguments are recorded (never escapes)."""


@dataclass
class BlockInputs:
    """Per calibration batch: the current block's input hidden states, each block's other arguments, the token mask."""

    hidden: list[torch.Tensor]
    arguments: list[list[tuple[tuple, dict[str, Any]]]]
    token_masks: list[Optional[torch.Tensor]]

    @property
    def seq_len(self) -> int:
        return int(self.hidden[0].shape[1]) if self.hidden and self.hidden[0].dim() >= 3 else 1


def as_batches(batches: Any) -> list[dict[str, torch.Tensor]]:
    """Calibration batches as dicts (a bare tensor is `input_ids`); refused when empty or malformed."""
    if batches is None or len(batches) == 0:
        raise InputError("This shrink needs calibration batches (a list of `{'input_ids': ...}` dicts, e.g. from "
                         "`get_calibration_dataset`); only saliency='magnitude' works without data.")
    out = []
    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, dict) or not batch:
            raise InputError(f"Calibration batch {i} must be a dict of tensors (e.g. `input_ids`, `attention_mask`) "
                             f"or a tensor of token ids, got {type(batch).__name__}.")
        out.append(batch)
    return out


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]]) -> BlockInputs:
    """Block 0's hidden states and every block's other arguments, for each batch (one forward of the model)."""
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    hidden: list[torch.Tensor] = []
    arguments: list[list[tuple[tuple, dict[str, Any]]]] = []
    masks: list[Optional[torch.Tensor]] = []
    current: list[tuple[tuple, dict[str, Any]]] = []
    last = len(blocks) - 1

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            h, rest, rest_kwargs = split_hidden_states(args, kwargs)
            if index == 0:
                hidden.append(h.detach())
            current.append((rest, rest_kwargs))
            if index == last:
                raise _Stop

        return hook

    with calibration_context(model), HookManager() as hooks:
        for i, block in enumerate(blocks):
            hooks.add(block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        for batch in batches:
            current = []
            mask = batch.get("attention_mask")
            masks.append(None if mask is None or bool(mask.bool().all()) else mask.bool().to(device))
            try:
                model(**_to(batch, device, dtype))
            except _Stop:
                pass
            if len(current) != len(blocks):
                raise RuntimeError(f"The model's forward called {len(current)} of its {len(blocks)} blocks: "
                                   "structured shrinking needs every block to run once per forward.")
            arguments.append(current)
    return BlockInputs(hidden, arguments, masks)


def block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def run_block(block: nn.Module, inputs: BlockInputs, index: int, batch: int) -> torch.Tensor:
    args, kwargs = inputs.arguments[batch][index]
    return block_output(block(inputs.hidden[batch], *args, **kwargs))


def forward_block(block: nn.Module, inputs: BlockInputs, index: int,
                  on_batch: Optional[Callable[[int], None]] = None) -> list[torch.Tensor]:
    """Run every batch through block `index`; returns the outputs (`on_batch(b)` is called before batch b)."""
    outputs = []
    with torch.no_grad():
        for b in range(len(inputs.hidden)):
            if on_batch is not None:
                on_batch(b)
            outputs.append(run_block(block, inputs, index, b))
    return outputs


def tokens(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """`[..., features]` as `[tokens, features]`, padding (mask False) left out."""
    flat = t.reshape(-1, t.shape[-1])
    if mask is None:
        return flat
    if mask.numel() != flat.shape[0]:
        raise RuntimeError(f"The token mask has {mask.numel()} entries but the layer saw {flat.shape[0]} tokens.")
    return flat[mask.reshape(-1).to(flat.device)]


def collect_consumer(block: nn.Module, consumer: nn.Module, inputs: BlockInputs, index: int,
                     add: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """Run block `index` over the batches and hand the consumer's `(inputs, outputs)` tokens to `add`."""
    state: dict[str, Optional[torch.Tensor]] = {"mask": None}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        add(tokens(args[0].detach(), state["mask"]), tokens(output.detach(), state["mask"]))

    def on_batch(b: int) -> None:
        state["mask"] = inputs.token_masks[b]

    with HookManager() as hooks:
        hooks.add(consumer.register_forward_hook(hook))
        forward_block(block, inputs, index, on_batch)
