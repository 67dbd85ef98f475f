"""2:4 at inference: convert 2:4-pruned Linear weights to PyTorch's semi-structured sparse tensors (CUDA).

What this buys depends on the GPU and the shapes: torch's semi-structured kernels (cuSPARSELt / CUTLASS) run on
compute capability 8.0+ with fp16/bf16 weights whose sides are multiples of 64; they help most at prefill-sized
matrix products and little at decode shapes (docs/results.md has what was measured).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .errors import ModelStateError
from .masks import nm_pattern_ok

logger = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def to_semi_structured(model: nn.Module, include: Optional[list[str]] = None) -> list[str]:
    """Replace the weight of every 2:4-sparse Linear by a `torch.sparse` semi-structured tensor, in place; returns
    the converted names. Linears that are not 2:4 or whose sides are not multiples of 64 stay dense (counted in the
    log); 2:4 weights in a dtype the kernels do not take (float32) are refused: convert the model first.

    Args:
        model: a model already on CUDA, pruned with `mask_structure="2:4"`, in float16 or bfloat16.
        include: substrings of module names to consider (default: every Linear).
    """
    if not torch.cuda.is_available():
        raise ModelStateError("Semi-structured (2:4) sparse tensors need a CUDA GPU; none is available here.")
    from torch.sparse import to_sparse_semi_structured

    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and (not include or any(s in name for s in include))]
    skipped = {"not 2:4": 0, "sides not multiples of 64": 0}
    convert = []
    for name, module in candidates:
        weight = module.weight
        if not weight.is_cuda:
            raise ModelStateError(f"`{name}` is on {weight.device}: move the model to CUDA before converting.")
        if weight.shape[0] % 64 or weight.shape[1] % 64:
            skipped["sides not multiples of 64"] += 1
        elif not nm_pattern_ok(weight.detach(), 2, 4):
            skipped["not 2:4"] += 1
        elif weight.dtype not in SPARSE_DTYPES:
            raise ModelStateError(f"`{name}` is 2:4 but {weight.dtype}; the semi-structured kernels take float16 or "
                                  "bfloat16 weights: convert the model first (`model.half()` or "
                                  "`model.to(torch.bfloat16)`).")
        else:
            convert.append((name, module))
    for name, module in convert:
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    logger.info("Converted %d of %d Linear layers to 2:4 semi-structured tensors (left dense: %s).", len(convert),
                len(candidates), ", ".join(f"{n} {why}" for why, n in skipped.items() if n) or "none")
    return [name for name, _ in convert]
