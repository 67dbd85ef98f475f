"""Block inputs: run the model up to a stack's first block and keep what it receives, and the arguments (masks,
position embeddings) each block of the stack receives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..calibration.hooks import HookManager, StopForward

logger = logging.getLogger(__name__)


@dataclass
class CapturedBatch:
    """Inputs of a block for one calibration batch: the hidden states plus every other argument it received."""

    hidden_states: torch.Tensor
    args: tuple  # positional arguments after hidden_states
    kwargs: dict[str, Any]
    token_mask: Optional[torch.Tensor]  # [B, T] bool (False on padding) or None
    #: per block `(args, kwargs)` when blocks receive different arguments (see `capture_block_arguments`)
    block_arguments: Optional[list[tuple[tuple, dict[str, Any]]]] = None

    def use_block(self, index: int) -> None:
        """Make `args`/`kwargs` the arguments block `index` receives (no-op when all blocks get block 0's)."""
        if self.block_arguments is not None:
            self.args, self.kwargs = self.block_arguments[index]


def split_hidden_states(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """Separate a block's hidden-state input from its other arguments (positional or `hidden_states=`)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    for key in ("hidden_states", "x", "hidden_state"):
        if key in kwargs:
            return kwargs.pop(key), (), kwargs
    raise RuntimeError("Could not find the hidden states among the block-0 inputs.")


@dataclass
class CaptureOptions:
    """How to run the model for a capture: where its inputs go, where the captured activations are kept, how the
    model is called (`forward(model, inputs)`; timm models take the pixels positionally), and which batch keys hold
    the token mask of the stack (an encoder-decoder's decoder has its own)."""

    input_device: torch.device
    store_device: torch.device
    forward: Optional[Callable[[nn.Module, dict[str, torch.Tensor]], Any]] = None
    mask_keys: tuple[str, ...] = ("attention_mask",)


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict[str, torch.Tensor]],
                         options: CaptureOptions) -> list[CapturedBatch]:
    """Run the model up to `first_block` for every batch and keep what the block would have received. The token mask
    of a batch is its first entry of `options.mask_keys` shaped like the block's tokens `[B, T]`; without one every
    token counts."""
    input_device, store_device, forward, mask_keys = (options.input_device, options.store_device, options.forward,
                                                      options.mask_keys)
    captured: list[CapturedBatch] = []
    current_mask: list[Optional[torch.Tensor]] = [None]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden, rest_args, rest_kwargs = split_hidden_states(args, kwargs)
        mask = current_mask[0]
        if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
            mask = None
        captured.append(CapturedBatch(hidden.to(store_device), rest_args, rest_kwargs, mask))
        raise StopForward

    with HookManager() as hooks:
        hooks.add(first_block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for batch in batches:
            mask = next((batch[key] for key in mask_keys if batch.get(key) is not None), None)
            current_mask[0] = mask.to(store_device).bool() if mask is not None else None
            try:  # float inputs (pixels) in the model's dtype: timm does not cast them itself
                inputs = {key: _to_model(value, input_device, dtype) for key, value in batch.items()}
                model(**inputs) if forward is None else forward(model, inputs)
            except StopForward:
                pass
            else:
                raise RuntimeError("The model's forward never reached its first block; check the adapter's blocks.")
    return captured


def _to_model(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)


def capture_block_arguments(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[dict[str, torch.Tensor]],
    input_device: torch.device,
    forward: Optional[Callable[[nn.Module, dict[str, torch.Tensor]], Any]] = None,
) -> Optional[list[list[tuple[tuple, dict[str, Any]]]]]:
    """Per batch and per block, the arguments (besides the hidden states) each block receives, or None when every
    block receives block 0's.

    Models that mix layer types (sliding-window and full attention, local and global rotary embeddings) hand each
    block its own mask or position embeddings, which a block-0 capture alone would miss. The blocks' forwards are
    replaced by pass-throughs that only record their arguments, so this costs the embeddings, not the blocks.
    """
    recorded: list[tuple[tuple, dict[str, Any]]] = []
    last = len(blocks) - 1
    form = [0]  # index into _PASS_THROUGH_FORMS: what a pass-through block returns

    def make_recorder(index: int) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            hidden, rest_args, rest_kwargs = split_hidden_states(args, kwargs)
            recorded.append((rest_args, rest_kwargs))
            if index == last:
                raise StopForward
            return _PASS_THROUGH_FORMS[form[0]](hidden)

        return record

    def record_batch(batch: dict[str, torch.Tensor]) -> list[tuple[tuple, dict[str, Any]]]:
        recorded.clear()
        try:
            inputs = {key: value.to(input_device) for key, value in batch.items()}
            model(**inputs) if forward is None else forward(model, inputs)
        except StopForward:
            pass
        return list(recorded)

    saved = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's offloading wrapper
    saved_hooks = [{name: getattr(block, name) for name in _BLOCK_HOOK_DICTS} for block in blocks]
    per_batch: list[list[tuple[tuple, dict[str, Any]]]] = []
    try:
        for index, block in enumerate(blocks):
            block.forward = make_recorder(index)
            for name in _BLOCK_HOOK_DICTS:  # no block code runs in this pass, not even the blocks' own hooks
                setattr(block, name, type(getattr(block, name))())
        # the glue between blocks unpacks their output: find the output form it accepts on the first batch
        for form[0] in range(len(_PASS_THROUGH_FORMS)):
            try:
                first = record_batch(batches[0])
            except Exception as err:  # noqa: BLE001 - the glue rejected this form; try the next one
                logger.debug("Pass-through form %d rejected: %s", form[0], err)
                continue
            if len(first) == len(blocks):
                break
        else:
            logger.debug("Per-block arguments not captured; every block gets block 0's.")
            return None
        per_batch.append(first)
        for batch in batches[1:]:
            per_batch.append(record_batch(batch))
            if len(per_batch[-1]) != len(blocks):
                return None
    finally:
        for block, original, hooks in zip(blocks, saved, saved_hooks):
            if original is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = original
            for name, value in hooks.items():
                setattr(block, name, value)
    if all(_same(arguments[0], other) for arguments in per_batch for other in arguments[1:]):
        return None
    logger.info("Blocks receive different arguments (e.g. sliding-window and full-attention masks): kept per block.")
    return per_batch


#: what a pass-through block may return, tried in order: the hidden states, or a tuple led by them (the glue of
#: some models unpacks `hidden, *rest = block(...)`, e.g. Swin stages return three values)
_PASS_THROUGH_FORMS: tuple[Callable[[torch.Tensor], Any], ...] = (
    lambda h: h, lambda h: (h,), lambda h: (h, None), lambda h: (h, None, None))

#: the hook registries of an `nn.Module` that `__call__` runs around `forward`
_BLOCK_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _same(a: Any, b: Any) -> bool:
    """Whether two captured arguments are the same objects (tensors) or equal values (everything else)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return a is b


