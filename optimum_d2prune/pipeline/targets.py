"""What gets pruned: the matrices of each block (`PruneTarget`) and the block stacks that hold them (`ModelPlan`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..architectures import PROJECTIONS, PRUNABLE_TYPES, ArchitectureAdapter
from ..architectures.base import Rows, read_rows, write_rows
from ..architectures.experts import expert_key, expert_matrix, expert_parameters

#: set on a module when a run writes its weights, removed when the run ends: a model that still carries it was left
#: half-pruned by an interrupted run (a refusal before any weight changed leaves none)
PARTLY_PRUNED = "_d2prune_partly_pruned"


def is_partly_pruned(model: nn.Module) -> bool:
    return any(PARTLY_PRUNED in m.__dict__ for m in model.modules())


def clear_partly_pruned(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop(PARTLY_PRUNED, None)


@dataclass
class PruneTarget:
    """One matrix to prune: a Linear (or GPT-2 `Conv1D`), one row block (q, k or v) of a fused one, or one expert's
    matrix of a fused MoE parameter. `weight()` is always `[out, in]` (a Conv1D's `[in, out]` is seen transposed)."""

    name: str  # full module name, plus "[q]"/"[k]"/"[v]" for a row block, or ".param[e]" for an expert matrix
    module_name: str
    module: nn.Module
    rows: Rows = None
    projection: Optional[str] = None  # "q"/"k"/"v" when it is an attention projection
    attention: int = 0  # which attention module of the block (`adapter.attention_groups`) it belongs to
    param: Optional[str] = None  # for an expert matrix: the 3D parameter of the experts module...
    expert: Optional[int] = None  # ...and the expert's index in it

    @property
    def stats_key(self) -> str:
        """Key of this target's statistics: the module (shared by its row blocks), or the expert matrix."""
        return self.module_name if self.expert is None else self.name

    @property
    def record_name(self) -> str:
        """The name `d2prune_config.json` records the sparsity under (row blocks merged, experts by parameter)."""
        return self.module_name if self.expert is None else f"{self.module_name}.{self.param}"

    def weight(self) -> torch.Tensor:
        if self.expert is not None:
            return expert_matrix(self.module, self.param, self.expert)
        return read_rows(self.module, self.rows)

    def write(self, new_weight: torch.Tensor) -> None:
        self.module.__dict__[PARTLY_PRUNED] = True  # removed when the run ends (`is_partly_pruned`)
        if self.expert is not None:
            w = expert_matrix(self.module, self.param, self.expert).data
            w.copy_(new_weight.to(device=w.device, dtype=w.dtype))
        else:
            write_rows(self.module, self.rows, new_weight)


@dataclass
class StackPlan:
    """One stack of blocks (a decoder's layers; an encoder-decoder has two) and the targets of each block."""

    path: str  # the block list's module name, e.g. "model.layers"
    blocks: nn.ModuleList
    targets: list[list[PruneTarget]]
    offset: int = 0  # index of its first block among all blocks of the model (reports, checkpoints)
    #: calibration batch keys holding this stack's token mask, tried in order (encoder-decoder decoders have their own)
    mask_keys: tuple[str, ...] = ("attention_mask",)


@dataclass
class ModelPlan:
    """Every block stack of the model with its targets, in execution order."""

    stacks: list[StackPlan] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.stacks)

    def targets(self) -> list[PruneTarget]:
        return [t for s in self.stacks for block in s.targets for t in block]


def find_targets(adapter: ArchitectureAdapter, block: nn.Module, prefix: str, targets: Optional[list[str]],
                 ignore: list[str]) -> list[PruneTarget]:
    """The Linears (and Conv1Ds) of a block selected by the `targets`/`ignore` regexes (searched in full module
    names), then the fused MoE expert matrices, expert by expert (one expert's statistics alive at a time)."""

    def selected(full: str) -> bool:
        return (targets is None or any(re.search(p, full) for p in targets)) and not any(
            re.search(p, full) for p in ignore)

    by_module: dict[str, list[tuple[str, Rows, int]]] = {}
    for number, (_, projections) in enumerate(adapter.attention_groups(block)):
        for p, ref in projections.items():
            by_module.setdefault(ref.module, []).append((p, ref.rows, number))
    found = []
    for local_name, module in block.named_modules():
        full = f"{prefix}.{local_name}"
        if not isinstance(module, PRUNABLE_TYPES) or not selected(full):
            continue
        refs = by_module.get(local_name, [])
        if any(rows is not None for _, rows, _ in refs):  # fused projection: one target per row block
            found += [PruneTarget(f"{full}[{p}]", full, module, rows, p, number) for p, rows, number in refs]
        else:
            found.append(PruneTarget(full, full, module, None, refs[0][0] if refs else None,
                                     refs[0][2] if refs else 0))
    for local_name, module in block.named_modules():
        full = f"{prefix}.{local_name}"
        params = [param for param in expert_parameters(module) if selected(f"{full}.{param}")]
        experts = getattr(module, params[0]).shape[0] if params else 0
        found += [PruneTarget(expert_key(full, param, e), full, module, param=param, expert=e)
                  for e in range(experts) for param in params]
    return found


def complete_attentions(targets: list[PruneTarget]) -> bool:
    """Whether the targets hold q, k and v of every attention module they touch (and touch at least one)."""
    present: dict[int, set[str]] = {}
    for t in targets:
        if t.projection:
            present.setdefault(t.attention, set()).add(t.projection)
    return bool(present) and all(p == set(PROJECTIONS) for p in present.values())
