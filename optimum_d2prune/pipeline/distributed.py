"""Data-parallel calibration over `torch.distributed` (torchrun / accelerate launch), with no change to user code.

Every rank calls `D2Pruner(config).prune(model, calib_loader)` with the same loader. Each rank runs its share of
the batches (`batches[rank::world_size]`) through the blocks; the statistics (X Xᵀ, output energies, token
counts) and the KL sums of the attention choice are all-reduced, so every rank holds the statistics of the whole
calibration set. The linears of a block are spread over the ranks (round robin), each solved once by its owner
and broadcast, so every rank ends with the identical pruned model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ..calibration.statistics import LinearStatistics

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def detect(cls) -> "DistributedContext":
        """Use the initialised process group, or initialise one from the torchrun environment variables."""
        if not dist.is_available():
            return cls()
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
                return cls()
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            logger.info("Initialised a %s process group from the torchrun environment.", backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of the calibration batches."""
        if not self.active:
            return items
        if len(items) < self.world_size:
            raise ValueError(f"{len(items)} calibration batches cannot be shared by {self.world_size} ranks: give "
                             "at least one batch per rank.")
        return items[self.rank :: self.world_size]

    def owner(self, position: int) -> int:
        return position % self.world_size

    def all_reduce_statistics(self, stats: dict[str, LinearStatistics]) -> None:
        """Sum every accumulator over the ranks (in a fixed order, so all ranks agree)."""
        if not self.active:
            return
        seen: set[int] = set()
        for name in sorted(stats):
            s = stats[name]
            inputs = s.inputs
            if id(inputs) not in seen:
                seen.add(id(inputs))
                for tensor in (inputs.gram() if inputs.has_hessian else None, inputs.x_sq):
                    if tensor is not None:
                        dist.all_reduce(tensor)
                count = torch.tensor([inputs.num_tokens], dtype=torch.float64, device=_device(inputs.device))
                dist.all_reduce(count)
                inputs.num_tokens = int(count.item())
            if s.y_sq is not None:
                dist.all_reduce(s.y_sq)

    def all_reduce_floats(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_device(device))
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks in place (in list order, so all ranks agree)."""
        if not self.active:
            return
        for t in tensors:
            dist.all_reduce(t)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` from rank `src` (returns a new contiguous tensor on every rank)."""
        buf = tensor.detach().contiguous().clone()
        dist.broadcast(buf, src)
        return buf


    def share_weights(self, stores: Iterable[dict], device: torch.device) -> None:
        """Give every rank rank 0's values of the tensors in `stores` (parameter and buffer dictionaries of modules;
        ranks other than 0 hold them on the meta device: `weights_from_rank0`), in their order, each tensor once (tied
        weights stay tied); on those ranks the values land on `device`."""
        if not self.active:
            return
        received: dict[int, torch.Tensor] = {}
        for store in stores:
            for name in list(store):
                tensor = store[name]
                if tensor is None:
                    continue
                if id(tensor) not in received:
                    if self.rank == 0:
                        value = self.broadcast(tensor.detach().to(_device(device)), 0)
                    else:
                        value = torch.empty(tensor.shape, dtype=tensor.dtype, device=_device(device))
                        dist.broadcast(value, 0)
                    received[id(tensor)] = _like(tensor, value.to(device))
                if self.rank != 0:
                    store[name] = received[id(tensor)]

    @contextlib.contextmanager
    def received(self, block: torch.nn.Module, device: torch.device, enabled: bool) -> Iterator[None]:
        """With `enabled` (`weights_from_rank0`): the block's weights from rank 0 for the time it is pruned; ranks
        other than 0 drop them afterwards (back to the meta device)."""
        if not enabled or not self.active:
            yield
            return
        self.share_weights(module_stores([block]), device)
        try:
            yield
        finally:
            if self.rank != 0:
                block.to_empty(device="meta")

    def fingerprint(self, compute) -> str:
        """`compute()` on rank 0, the same string on every rank (ranks without weights cannot hash them)."""
        if not self.active:
            return compute()
        value = compute() if self.rank == 0 else "0" * 64
        data = torch.tensor(list(bytes.fromhex(value)), dtype=torch.uint8, device=_device(torch.device("cpu")))
        return bytes(self.broadcast(data, 0).tolist()).hex()


def module_stores(modules: Iterable[torch.nn.Module], outside: Iterable[torch.nn.Module] = ()) -> Iterator[dict]:
    """The parameter and buffer dictionaries of every submodule of `modules`, leaving out those of `outside`."""
    skip = {id(m) for block in outside for m in block.modules()}
    for module in modules:
        for m in module.modules():
            if id(m) not in skip:
                yield m._parameters
                yield m._buffers


def _like(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` as the same kind of tensor as `old` (a parameter stays a parameter)."""
    return torch.nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else value


@contextlib.contextmanager
def process_group(device: str, world_size: int) -> Iterator[None]:
    """The process group of a `torchrun` job (nothing for one process), on `device`, destroyed on exit."""
    if world_size <= 1:
        yield
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    DistributedContext.detect()
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast_object(value: T) -> T:
    """Rank 0's `value` on every rank (small Python objects such as the calibration batches)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def distributed_session() -> Iterator[None]:
    """Initialise the process group from the torchrun environment for the duration of a run, if no one else
    has, and destroy it afterwards (also on error): a library call leaves no process group behind it."""
    owned = False
    if (dist.is_available() and not dist.is_initialized() and "RANK" in os.environ
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        DistributedContext.detect()
        owned = True
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
            logger.info("Destroyed the process group initialised for this run.")


def _device(device: torch.device) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo works with CPU tensors
    if dist.is_initialized() and dist.get_backend() == "nccl" and torch.device(device).type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)
