"""The method interface: what the engine asks of a pruning method.

A method owns its options (`options_class`), its solvers (built by `setup` once the calibration length is known)
and its plan for each group of targets of a block (`plan`: which solver prunes which matrix, plus any solution it
already computed while deciding). Methods that need to see the block's forward pass (D²Prune's attention inputs)
return hooks from `observers`; a method that decides at the level of the whole run (D²Prune's global search) wraps
the engine in `prune_model`. The engine names no method: it calls these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..patterns import SparsityPattern
from .options import MethodOptions

if TYPE_CHECKING:
    from torch import nn

    from ..architectures import ArchitectureAdapter
    from ..pipeline.context import GroupWork
    from ..pipeline.targets import ModelPlan
    from ..report import PruneReport
    from .solvers import Solver, SolverOutput

_LEVEL_RANK = {"none": 0, "diag": 1, "hessian": 2}


@dataclass
class GroupPlan:
    """How one group of targets is pruned: a solver per target name, and solutions already computed while planning
    (the engine writes them instead of solving again)."""

    solvers: dict[str, "Solver"]
    outputs: dict[str, "SolverOutput"] = field(default_factory=dict)


@dataclass
class ModelRun:
    """What a whole-run decision (`PruningMethod.prune_model`) needs: the model, its plan, the calibration batches,
    and `run(method, batches, checkpoint)`, which prunes the model once with a method and returns the report."""

    model: "nn.Module"
    plan: "ModelPlan"
    adapter: "ArchitectureAdapter"
    batches: list[dict[str, Any]]
    run: Callable[..., "PruneReport"]


class PruningMethod:
    """Base class of the registered methods. Subclasses set `name` (and `options_class`) and build their solvers in
    `setup`; the default plan prunes every target with `self.solver`."""

    name: ClassVar[str]
    options_class: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions, pattern: SparsityPattern) -> None:
        self.options = options
        self.pattern = pattern
        self.solver: "Solver" = None  # type: ignore[assignment]  # set by `setup`

    def setup(self, seq_len: int) -> None:
        """Build the solvers for calibration sequences of `seq_len` tokens (1 when the method needs no data)."""
        raise NotImplementedError

    def solvers(self) -> list["Solver"]:
        """Every solver the method may use (the engine collects the statistics the most demanding one needs)."""
        return [self.solver]

    @property
    def statistics(self) -> str:
        """"hessian", "diag" or "none": what the statistics pass must collect (set up first)."""
        return max((s.statistics for s in self.solvers()), key=_LEVEL_RANK.__getitem__)

    def check(self, plan: "ModelPlan", adapter: "ArchitectureAdapter") -> None:
        """Refuse, before any work, a model this method cannot prune as configured."""

    def observers(self, work: "GroupWork") -> list[Any]:
        """Hooks to attach during a group's statistics pass (each with a settable `token_mask` and a `remove()`);
        what they saw is in `work.observed` when `plan` runs."""
        return []

    def plan(self, work: "GroupWork") -> GroupPlan:
        return GroupPlan({t.name: self.solver for t in work.targets})

    def prune_model(self, job: ModelRun) -> "PruneReport":
        """Prune the whole model; the default runs the engine once."""
        return job.run(self, job.batches)
