"""A block's targets in execution order, one group per input stream (q/k/v together, gate/up together): what
`sequential` calibrates group by group, and where the block reconstruction finds the output projections."""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.hooks import HookManager
from .capture import CapturedBatch
from .targets import PruneTarget


def execution_groups(block: nn.Module, targets: list[PruneTarget], batch: CapturedBatch,
                     device: torch.device) -> list[list[PruneTarget]]:
    """Targets grouped in execution order by one forward of the first calibration batch; targets that did not run
    form a last group."""
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []  # keep inputs alive so that their ids stay unique during the pass

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            alive.append(inputs[0])
            order.append((name, id(inputs[0])))

        return hook

    with HookManager() as hooks:
        for t in {t.module_name: t for t in targets}.values():
            hooks.add(t.module.register_forward_hook(make_hook(t.module_name)))
        block(batch.hidden_states.to(device), *batch.args, **batch.kwargs)
    by_module: dict[str, list[PruneTarget]] = {}
    for t in targets:
        by_module.setdefault(t.module_name, []).append(t)
    groups: list[list[PruneTarget]] = []
    last_input = None
    seen: set[str] = set()
    for name, input_id in order:
        if name in seen:
            continue
        seen.add(name)
        if input_id != last_input:
            groups.append([])
            last_input = input_id
        groups[-1].extend(by_module[name])
    unseen = [t for t in targets if t.module_name not in seen]
    if unseen:
        groups.append(unseen)
    return groups
