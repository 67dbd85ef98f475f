"""A memory counter for tests: live bytes of the tensors created by torch operations inside a region.

CPU has no allocator statistics (CUDA's `max_memory_allocated`), and the process RSS is too coarse for tiny models.
This dispatch mode sees every tensor an operation returns, counts its storage once while any tensor seen on that
storage is alive, and records the peak. Tensors created before the region count as 0.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """`with LiveTensorBytes() as counter: ...` then `counter.peak` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owners: dict[int, set[int]] = {}  # storage pointer -> ids of the tensors seen on it
        self._sizes: dict[int, int] = {}

    def _release(self, pointer: int, owner: int) -> None:
        owners = self._owners.get(pointer)
        if owners is None:
            return
        owners.discard(owner)
        if not owners:
            del self._owners[pointer]
            self.live -= self._sizes.pop(pointer)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer == 0:
            return
        if pointer not in self._owners:
            self._owners[pointer] = set()
            self._sizes[pointer] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        if id(tensor) not in self._owners[pointer]:
            self._owners[pointer].add(id(tensor))
            weakref.finalize(tensor, self._release, pointer, id(tensor))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # in-place ops, `out=` and views return storage an input already had: new memory only if already counted
        inputs = {v.untyped_storage().data_ptr() for v in tree_flatten((args, kwargs))[0]
                  if isinstance(v, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                pointer = value.untyped_storage().data_ptr()
                if pointer not in inputs or pointer in self._owners:
                    self._track(value)
        return out
