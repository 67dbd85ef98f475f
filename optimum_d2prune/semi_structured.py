"""2:4 at inference: convert 2:4-pruned Linear weights to PyTorch's semi-structured sparse tensors (CUDA)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .masks import nm_pattern_ok

logger = logging.getLogger(__name__)


def to_semi_structured(model: nn.Module, include: Optional[list[str]] = None) -> list[str]:
    """Replace the weight of every 2:4-sparse Linear by a `torch.sparse` semi-structured tensor, in place.

    The sparse kernels (cuSPARSELt / CUTLASS) need a CUDA GPU of compute capability 8.0+, fp16/bf16 weights and
    shapes that are multiples of 64; Linears that do not qualify are left dense. Returns the converted names.

    Args:
        model: a model already on CUDA, pruned with `mask_structure="2:4"`.
        include: substrings of module names to consider (default: every Linear).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("Semi-structured (2:4) sparse tensors need a CUDA GPU; none is available here.")
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (include and not any(s in name for s in include)):
            continue
        weight = module.weight
        if not weight.is_cuda:
            raise RuntimeError(f"`{name}` is on {weight.device}: move the model to CUDA before converting.")
        rows, cols = weight.shape
        if weight.dtype not in (torch.float16, torch.bfloat16) or rows % 64 or cols % 64:
            continue
        if not nm_pattern_ok(weight.detach(), 2, 4):
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        converted.append(name)
    logger.info("Converted %d Linear layers to 2:4 semi-structured sparse tensors.", len(converted))
    return converted
