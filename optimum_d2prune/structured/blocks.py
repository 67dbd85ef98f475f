"""Which whole blocks to remove, from how little they change the hidden states on calibration data.

- block_influence (ShortGPT: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
  Expect", 2024, arXiv 2403.03853): `BI_l = 1 − mean_t cos(h_l,t, h_l+1,t)` over calibration tokens; the `n` blocks
  of lowest BI go.
- angular (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", 2024, arXiv 2403.17887): the `n`
  *consecutive* blocks starting at the l minimising `mean_t arccos(cos(h_l,t, h_l+n,t)) / π` go.

Both are measured on the dense model in one forward per batch (hooks on every block's input and output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..calibration.hooks import HookManager, calibration_context
from ..pipeline.capture import split_hidden_states
from .calibration import _to, block_output, model_device, tokens


@dataclass
class BlockSimilarity:
    """Per block: the mean cosine of its input and output; per start l: the mean angular distance of `h_l`, `h_l+n`."""

    cosine: torch.Tensor  # [L]
    angular: torch.Tensor  # [L - n + 1]
    span: int

    def influence(self) -> torch.Tensor:
        return 1.0 - self.cosine


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)


def measure(model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]],
            span: int) -> BlockSimilarity:
    """Cosine similarities of every block's input and output, and angular distances over `span` blocks."""
    count = len(blocks)
    cos_sum = torch.zeros(count, dtype=torch.float64)
    ang_sum = torch.zeros(count - span + 1, dtype=torch.float64)
    total = [0]
    states: list[torch.Tensor] = []
    mask: list[Optional[torch.Tensor]] = [None]

    def pre(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            states.append(tokens(split_hidden_states(args, kwargs)[0].detach(), mask[0]))
        return hook

    def post(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            out = tokens(block_output(output).detach(), mask[0])
            cos_sum[index] += float(_cos(states[index], out).double().sum())
            if index == count - 1:
                states.append(out)
        return hook

    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with calibration_context(model), HookManager() as hooks:
        for i, block in enumerate(blocks):
            hooks.add(block.register_forward_pre_hook(pre(i), with_kwargs=True))
            hooks.add(block.register_forward_hook(post(i), with_kwargs=True))
        for batch in batches:
            states.clear()
            m = batch.get("attention_mask")
            mask[0] = None if m is None or bool(m.bool().all()) else m.bool().to(device)
            model(**_to(batch, device, dtype))
            for start in range(count - span + 1):
                ang_sum[start] += float((torch.arccos(_cos(states[start], states[start + span])) / torch.pi)
                                        .double().sum())
            total[0] += states[0].shape[0]
    n = max(total[0], 1)
    return BlockSimilarity(cos_sum / n, ang_sum / n, span)


def blocks_to_remove(similarity: BlockSimilarity, method: str) -> list[int]:
    """The blocks the method removes (ascending)."""
    if method == "angular":
        start = int(torch.argmin(similarity.angular))
        return list(range(start, start + similarity.span))
    order = torch.argsort(similarity.influence(), stable=True)
    return sorted(order[: similarity.span].tolist())
