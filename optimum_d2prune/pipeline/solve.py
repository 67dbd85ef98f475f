"""The solve step of a group: each target pruned by the solver its method's plan names, in order, on the rank that
owns it (data-parallel ranks share the solves and broadcast the results); an input stream's statistics are freed
after their last reader."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from ..methods.base import GroupPlan
from ..methods.solvers import MagnitudeSolver, Solver, SolverOutput, WandaSolver
from ..report import ExpertRecord, LayerRecord
from .context import GroupWork
from .targets import PruneTarget

logger = logging.getLogger(__name__)

#: why a target is left dense when the statistics pass never saw it run
NOT_CALLED = ("its Linear was not called during the block's forward (the weight is used by other code, e.g. a fused "
              "kernel): left dense")


def solve_group(work: GroupWork, plan: GroupPlan, replaced: Callable[[PruneTarget], bool],
                min_expert_tokens: int) -> None:
    """Prune `work.targets` as `plan` says; `replaced(target)`: a block refiner decides that target's final mask
    and weights, so its layer solve stops after the sweep."""
    last_use = _last_use(work)
    services = work.services
    for position, t in enumerate(work.targets):
        solver = plan.solvers[t.name]
        if replaced(t):
            solver = solver.without_refit()
        if t.expert is not None:
            solver = _expert_solver(work, t, solver, min_expert_tokens)
        elif solver.statistics != "none" and work.stats.of(t) is None:
            services.report.skipped[t.name] = NOT_CALLED
            services.once(f"not called {t.name}", f"`{t.name}` was not called during its block's forward: left dense "
                          "(listed in the report's skipped modules).")
            continue
        tic = time.perf_counter()
        out = plan.outputs.pop(t.name, None)
        if out is None:
            out = _solve_once(work, position, t, solver)
        else:
            t.write(out.weight)
        for inputs in last_use.pop(position, ()):  # its sum and factor are no longer needed
            inputs.free()
        weight = t.weight()
        zeros = int((weight == 0).sum()) / weight.numel()  # no fp32 copy of the matrix
        services.report.layers.append(LayerRecord(work.index, t.name, solver.name, solver.updates_weights,
                                                  tuple(weight.shape), zeros, out.error, out.flipped,
                                                  time.perf_counter() - tic))
        logger.debug("block %d %s: %s sparsity %.4f error %.4g", work.index, t.name, solver.name, zeros, out.error)


def _solve_once(work: GroupWork, position: int, target: PruneTarget, solver: Solver) -> SolverOutput:
    """Solve on the owning rank (every rank when not distributed) and give the result to all ranks."""
    dist = work.services.dist
    owner = dist.owner(position)
    out = None
    if dist.rank == owner:
        out = solver.prune(target.weight(), work.stats.of(target), work.pattern_of(target))
        target.write(out.weight)
    if not dist.active:
        return out
    weight = dist.broadcast(target.weight(), owner)
    meta = torch.tensor([out.error, -1 if out.flipped is None else out.flipped] if out else [0.0, 0.0],
                        dtype=torch.float64, device=weight.device)
    meta = dist.broadcast(meta, owner).tolist()
    if out is None:
        target.write(weight)
        out = SolverOutput(weight, weight == 0, meta[0], None if meta[1] < 0 else int(meta[1]))
    return out


def _expert_solver(work: GroupWork, target: PruneTarget, solver: Solver, min_tokens: int) -> Solver:
    """The solver for one expert matrix: the planned one when the expert received at least `min_tokens` tokens (or
    when the run collects no statistics), else Wanda's criterion on the few tokens it has, or magnitude for an
    expert that received none; one report record per expert."""
    tokens: Optional[int] = work.stats.tokens.get((target.module_name, target.expert))
    chosen = solver
    if tokens is not None and solver.statistics != "none":
        chosen = MagnitudeSolver() if tokens == 0 else solver if tokens >= min_tokens else WandaSolver()
    from ..architectures.experts import expert_parameters

    if target.param == expert_parameters(target.module)[0]:
        work.services.report.experts.append(ExpertRecord(work.index, target.module_name, target.expert, tokens,
                                                         chosen.name, chosen is not solver))
    return chosen


def _last_use(work: GroupWork) -> dict[int, list]:
    """For each target position, the input statistics no later target reads (freed once it is solved, so a block
    holds one Hessian factor at a time rather than one per input stream)."""
    last: dict[int, tuple[int, object]] = {}
    for position, t in enumerate(work.targets):
        s = work.stats.modules.get(t.stats_key) if t.expert is None else None
        if s is not None:
            last[id(s.inputs)] = (position, s.inputs)
    by_position: dict[int, list] = {}
    for position, inputs in last.values():
        by_position.setdefault(position, []).append(inputs)
    return by_position
