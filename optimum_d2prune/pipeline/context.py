"""What the parts of one run share: `RunServices` (adapter, runtime options, process group, report, memory phases),
`PatternBook` (each target's sparsity pattern), and the per-group context `GroupWork` handed to a method."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from ..architectures import ArchitectureAdapter
from ..configuration import RuntimeOptions
from ..patterns import SparsityPattern
from ..report import PruneReport
from .distributed import DistributedContext

if TYPE_CHECKING:
    from ..memory.measure import PeakMemory
    from .statistics import BlockStatistics
    from .targets import PruneTarget

logger = logging.getLogger(__name__)


@dataclass
class RunServices:
    """Shared by every step of one run."""

    adapter: ArchitectureAdapter
    runtime: RuntimeOptions
    dist: DistributedContext
    report: PruneReport
    memory: Optional["PeakMemory"] = None
    said: set[str] = field(default_factory=set)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Attribute the memory peak of a region to a phase of the running measurement (none outside a run)."""
        return self.memory.phase(name) if self.memory is not None else contextlib.nullcontext()

    def once(self, key: str, message: str, level: int = logging.WARNING) -> None:
        """Log `message` the first time `key` comes up in this run (a condition of many blocks is said once)."""
        if key not in self.said:
            self.said.add(key)
            logger.log(level, message)

    def reduce_floats(self, device: torch.device) -> Callable[[list[float]], list[float]]:
        """Sum a list of floats over the data-parallel ranks (identity when not distributed)."""
        return lambda values: self.dist.all_reduce_floats(values, device)


@dataclass
class PatternBook:
    """The sparsity pattern of each target: the configured one, or the exact per-target pattern an allocation rule
    gave it."""

    default: SparsityPattern
    overrides: dict[str, SparsityPattern] = field(default_factory=dict)

    def __call__(self, target: "PruneTarget") -> SparsityPattern:
        return self.overrides.get(target.name, self.default)


@dataclass
class GroupWork:
    """One group of targets of one block (the whole block, or one input stream of it with `sequential`), as a
    method sees it when it plans."""

    index: int  # the block's index among all blocks of the model
    block: nn.Module
    targets: list["PruneTarget"]
    block_targets: list["PruneTarget"]  # every target of the block
    stats: "BlockStatistics"
    pattern_of: PatternBook
    services: RunServices
    observed: dict[str, Any] = field(default_factory=dict)  # what the method's observers keep until `plan`
    screened: bool = False  # some targets of the group were left out for non-finite values


@dataclass
class BlockRun:
    """One block being pruned: its targets, the calibration batches entering it, and its targets in execution
    order (one group per input stream) when sequential calibration or a refiner needs them."""

    index: int  # among all blocks of the model
    block: nn.Module
    targets: list["PruneTarget"]
    batches: list[Any]  # `CapturedBatch`es, positioned at this block
    pattern_of: PatternBook
    services: RunServices
    groups: Optional[list[list["PruneTarget"]]] = None
