"""Moving activations between blocks, and the devices they live on."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .capture import CapturedBatch
from .offload import execution_device


def block_output(block: nn.Module, hidden: torch.Tensor, batch: CapturedBatch, device: torch.device) -> torch.Tensor:
    """The block's output for `hidden` with `batch`'s other arguments, kept where `hidden` was stored (the CPU with
    `offload_activations`: one batch at a time on the device)."""
    out = block(hidden.to(device, non_blocking=True), *batch.args, **batch.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(hidden.device) if out.device != hidden.device else out


def propagate(block: nn.Module, batches: list[CapturedBatch], device: torch.device) -> None:
    """Replace each batch's hidden states with the (pruned) block's output."""
    for batch in batches:
        batch.hidden_states = block_output(block, batch.hidden_states, batch, device)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's first layer (its input embeddings, if it has any) expects its inputs."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:  # dispatched by accelerate: inputs go where the first module executes
        first = next(iter(device_map.values()))
        if first not in ("disk", "meta"):
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # vision and audio models without token embeddings
        embeddings = None
    device = module_device(embeddings if embeddings is not None else model)
    return execution_device(embeddings) if device.type == "meta" else device


def move_outside(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> Callable[[], None]:
    """Move every parameter and buffer outside `blocks` to `device`; return a function that moves them back."""
    inside = {id(t) for block in blocks for t in [*block.parameters(), *block.buffers()]}
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
