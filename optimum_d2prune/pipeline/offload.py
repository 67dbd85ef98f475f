"""One block at a time on the processing device, for plain CPU weights and for accelerate-offloaded models.

`onloaded(block, device)` puts a block's weights on `device` for the time it is pruned:
- plain modules are moved there and back (`block.to`);
- modules dispatched by accelerate with CPU or disk offload (`AlignDevicesHook(offload=True)`, weights on the
  meta device) get their weights loaded once, the hook's per-forward re-loading is paused, and on exit the
  pruned Linear weights are written back to the offload storage (the CPU state dict in place, or a new `.dat`
  file in the offload folder for disk offload; a user's original checkpoint files are never written) before the
  weights go back to the meta device.
Peak device memory is therefore one block plus its statistics and the calibration activations.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _align_hooks(module: nn.Module) -> list:
    """The accelerate `AlignDevicesHook`s attached to a module (inside a `SequentialHook` too)."""
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # accelerate is a dependency, but keep the plain path importable without it
        return []
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _offload_hooks(block: nn.Module) -> list[tuple[nn.Module, object]]:
    return [(m, h) for m in block.modules() for h in _align_hooks(m) if h.offload]


def execution_device(block: nn.Module) -> torch.device:
    """Where accelerate runs an offloaded block (CPU when it says nothing)."""
    for m in block.modules():
        for h in _align_hooks(m):
            if h.execution_device is not None:
                device = h.execution_device
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu")


def _persist(hook, name: str, value: torch.Tensor) -> None:
    """Write `value` to the offload storage behind `hook.weights_map[name]`."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    storage, key = hook.weights_map, name
    if isinstance(storage, PrefixedDataset):
        storage, key = storage.dataset, storage.prefix + name
    value = value.detach().to("cpu")
    if isinstance(storage, OffloadedWeightsLoader):
        if key in storage.state_dict:
            storage.state_dict[key].copy_(value)
        elif storage.save_folder is not None:
            offload_weight(value, key, storage.save_folder, index=storage.index)
        else:
            storage.state_dict[key] = value.clone()
    elif isinstance(storage, dict) and isinstance(storage.get(key), torch.Tensor):
        storage[key].copy_(value)
    else:
        storage[key] = value.clone()


@contextlib.contextmanager
def onloaded(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Keep `block`'s weights on `device` inside the context (see the module docstring)."""
    offloaded = _offload_hooks(block)
    if offloaded:
        saved = []
        for module, hook in offloaded:
            saved.append(hook.execution_device)
            hook.execution_device = device
            hook.pre_forward(module)  # loads the weights from the offload storage onto `device`
            hook.offload = False  # forwards inside the block must not reload (and undo) pruned weights
        try:
            yield
        finally:
            for (module, hook), original in zip(offloaded, saved):
                if isinstance(module, nn.Linear):
                    _persist(hook, "weight", module.weight)
                hook.offload = True
                hook.post_forward(module, None)  # back to the meta device
                hook.execution_device = original
        return
    home = next((p.device for p in block.parameters()), device)
    if home == device:
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(home)
