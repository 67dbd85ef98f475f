"""The method and allocation registries: the built-ins are entries, and a new method (with its own plan) or a new
allocation rule is one class registered from user code, with no library file changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from tinymodels import calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import get_adapter
from optimum_d2prune.errors import ConfigError
from optimum_d2prune.methods.base import GroupPlan, PruningMethod
from optimum_d2prune.methods.registry import METHOD_REGISTRY, get_method, register_method, registered_methods
from optimum_d2prune.methods.solvers import MagnitudeSolver, OBSSolver, WandaSolver
from optimum_d2prune.pipeline.engine import PruningEngine
from optimum_d2prune.refine.allocation import ALLOCATION_RULES, AllocationRule, register_allocation
from optimum_d2prune.refine.options import ALLOCATION_OPTIONS
from optimum_d2prune.validation import OptionGroup, as_float

#: method -> (class of its solver, class of its second solver or None, their report names)
BUILT_INS = {
    "d2prune": (OBSSolver, WandaSolver, ("d2-sparsegpt+refit", "d2-wanda")),
    "sparsegpt": (OBSSolver, None, ("sparsegpt",)),
    "wanda": (WandaSolver, None, ("wanda",)),
    "magnitude": (MagnitudeSolver, None, ("magnitude",)),
}
#: the built-in that replaces the block loop (`prune_model`): tests/test_structured.py runs it through the pruner
WHOLE_MODEL = ("shrink",)


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_built_in_methods_are_registry_entries(name):
    assert sorted(registered_methods()) == sorted([*BUILT_INS, *WHOLE_MODEL])
    config = D2PruneConfig(method=name)
    method = get_method(name)(config.method_options, config.pattern)
    method.setup(16)
    first, second, names = BUILT_INS[name]
    solvers = method.solvers()
    assert [type(s) for s in solvers] == [first] + ([second] if second else [])
    assert tuple(s.name for s in solvers) == names
    assert {"uniform", "owl"} <= set(ALLOCATION_RULES)


# ------------------------------------------------------------------ a method and a rule from user code
class AlternatingMethod(PruningMethod):
    """Prunes the targets of each block alternately with magnitude (even positions) and Wanda (odd)."""

    name = "test-alternating"

    def setup(self, seq_len: int) -> None:
        self.magnitude, self.wanda = MagnitudeSolver(), WandaSolver()

    def solvers(self) -> list:
        return [self.magnitude, self.wanda]

    def plan(self, work) -> GroupPlan:
        position = {t.name: i for i, t in enumerate(work.block_targets)}
        return GroupPlan({t.name: self.wanda if position[t.name] % 2 else self.magnitude for t in work.targets})


@dataclass
class LinearOptions(OptionGroup):
    group_name: ClassVar[str] = '`allocation_options` of "test-linear"'

    step: float = field(default=0.0625)

    def __post_init__(self) -> None:
        self.step = as_float("step", self.step, 0.0, 0.5)


class LinearAllocation(AllocationRule):
    """Budgets rising by `step` from block to block, centred on the target (equal blocks: the mean is the target)."""

    name = "test-linear"
    options_class = LinearOptions

    def budgets(self, job) -> list[float]:
        centre = (len(job.blocks) - 1) / 2
        return [job.sparsity + self.options.step * (i - centre) for i in range(len(job.blocks))]


@pytest.fixture
def registered():
    """The toy method and rule registered for one test, as user code would (the decorators), then removed."""
    register_method(AlternatingMethod)
    register_allocation(LinearAllocation)
    yield
    METHOD_REGISTRY.pop(AlternatingMethod.name, None)
    ALLOCATION_RULES.pop(LinearAllocation.name, None)
    ALLOCATION_OPTIONS.pop(LinearAllocation.name, None)


def test_a_method_with_its_own_plan_and_an_allocation_rule_from_user_code(registered):
    model = make_tiny("llama4")
    config = D2PruneConfig(sparsity=0.5, method="test-alternating", allocation="test-linear",
                           allocation_options={"step": 0.125})
    budgets = [0.3125, 0.4375, 0.5625, 0.6875]  # 0.5 + 0.125 * (i - 1.5): every budget x target size is an integer
    plan = PruningEngine(config, get_adapter(model)).plan(model)
    expected_zeros, expected_solver = {}, {}
    for budget, block in zip(budgets, (t for stack in plan.stacks for t in stack.targets)):
        for position, target in enumerate(block):
            expected_zeros[target.name] = int(budget * target.weight().numel())
            expected_solver[target.name] = "wanda" if position % 2 else "magnitude"

    pruner = D2Pruner(config)
    pruner.prune(model, calib_batches())
    report = pruner.report
    modules = dict(model.named_modules())
    zeros = {name: int((modules[name].weight == 0).sum()) for name in expected_zeros}
    assert zeros == expected_zeros
    assert {r.name: r.solver for r in report.layers} == expected_solver
    assert report.block_sparsity == pytest.approx(budgets)
    assert report.method == "test-alternating"
    assert report.total_sparsity == pytest.approx(0.5, abs=1e-12)


def test_registration_is_checked_and_undone(registered):
    with pytest.raises(ConfigError, match="registered twice"):
        register_method(type("Other", (AlternatingMethod,), {}))
    with pytest.raises(ConfigError, match="registered twice"):
        register_allocation(type("Other", (LinearAllocation,), {}))
    with pytest.raises(ConfigError, match="needs a class attribute `name`"):
        register_method(type("Nameless", (PruningMethod,), {}))
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['slope'\]"):
        D2PruneConfig(allocation="test-linear", allocation_options={"slope": 1})
    METHOD_REGISTRY.pop(AlternatingMethod.name)
    ALLOCATION_RULES.pop(LinearAllocation.name)
    ALLOCATION_OPTIONS.pop(LinearAllocation.name)
    with pytest.raises(ConfigError, match="`method` must be one of"):
        D2PruneConfig(method="test-alternating")
    with pytest.raises(ConfigError, match="`allocation` must be one of"):
        D2PruneConfig(allocation="test-linear")
