"""Block stacks: every list of same-class blocks holding prunable layers, not nested in another one (a decoder's
layers; an encoder-decoder's two stacks; a vision-language model's vision tower and text stack)."""

from __future__ import annotations

from torch import nn

from .base import PRUNABLE_TYPES


def _is_stack(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1 or issubclass(next(iter(kinds)), PRUNABLE_TYPES):
        return False
    return any(isinstance(m, PRUNABLE_TYPES) for m in module[0].modules())


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(module name, block list)` of every stack, in module order; a list inside a block of another stack (experts,
    a Swin stage's inner blocks) is part of that stack. `nn.Sequential` lists count only when they hold more than one
    block (a single-block Sequential is usually a head or a projector)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not _is_stack(module) or (isinstance(module, nn.Sequential) and len(module) < 2):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        found.append((name, module))
    return found
