"""Hooks: tracked handles, the calibration context, and the statistics collection of a block's linears."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .statistics import InputStatistics, LinearStatistics

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed was seen (caught by whoever attached the hook:
    never escapes this library)."""


class HookManager:
    """Registers hooks and removes every one of them on `remove()` (also used as a context manager)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@contextlib.contextmanager
def calibration_context(model: nn.Module) -> Iterator[None]:
    """No grad, eval mode, KV cache off; the model's `training` flag and `config.use_cache` are restored on exit."""
    config = getattr(model, "config", None)
    had_use_cache = config is not None and hasattr(config, "use_cache")
    use_cache = config.use_cache if had_use_cache else None
    was_training = model.training
    try:
        if had_use_cache:
            config.use_cache = False
        model.eval()
        with torch.no_grad():
            yield
    finally:
        if had_use_cache:
            config.use_cache = use_cache
        model.train(was_training)


class StatisticsCollector:
    """Forward hooks that accumulate `LinearStatistics` for the targeted Linears of one block.

    Linears that read the very same input tensor (q/k/v, gate/up) share one `InputStatistics`, so X Xᵀ is
    accumulated once per input stream. Inputs seen during one forward are kept alive until `end_batch()`, so a
    freed tensor's memory cannot be reused by another input and be mistaken for it.
    """

    def __init__(self, modules: dict[str, nn.Linear], level: str, device: torch.device, seq_len: int) -> None:
        self.level = level
        self.device = device
        self.seq_len = seq_len
        self.stats: dict[str, LinearStatistics] = {}
        self.token_mask: Optional[torch.Tensor] = None
        self._seen: dict[int, tuple[torch.Tensor, InputStatistics]] = {}
        self._hooks = HookManager()
        for name, module in modules.items():
            self._hooks.add(module.register_forward_hook(self._make_hook(name)))

    def _tokens(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        mask = self.token_mask
        if mask is not None and mask.numel() != flat.shape[0]:  # ignoring it would calibrate on padding
            raise ValueError(f"The token mask has {mask.numel()} entries but the layer input has {flat.shape[0]} "
                             "tokens: the block changes the sequence length, which the adapter must handle.")
        if mask is not None and not bool(mask.all()):
            flat = flat[mask.reshape(-1).to(flat.device)]
        return flat

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(output, (tuple, list)):  # a linear subclass returning (output, extras...)
                output = output[0]
            entry = self._seen.get(id(x))
            if entry is None:
                existing = self.stats.get(name)
                shared = existing.inputs if existing is not None else None
                if shared is None:
                    shared = InputStatistics(x.shape[-1], self.level, self.device)
                shared.add(self._tokens(x.detach()))
                self._seen[id(x)] = (x, shared)
            else:
                shared = entry[1]
            if name not in self.stats:
                self.stats[name] = LinearStatistics(shared, self.seq_len, name=name)
            elif self.stats[name].inputs is not shared:
                raise RuntimeError(f"Input sharing of {name} changed between calibration batches.")
            self.stats[name].add_output(self._tokens(output.detach()))

        return hook

    def end_batch(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        self._hooks.remove()
        self._seen.clear()

    def free(self) -> None:
        for stat in self.stats.values():
            stat.inputs.free()
            stat.y_sq = None
        self.stats.clear()
