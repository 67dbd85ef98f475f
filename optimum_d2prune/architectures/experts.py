"""Mixture-of-experts layout: routed experts as one module with fused 3D parameters.

In transformers 5 the routed experts of Qwen3-MoE, Mixtral, gpt-oss and others are one module holding fused 3D
parameters (`gate_up_proj [E, 2I, H]` or `up_proj`, and `down_proj [E, H, I]`; `[E, in, out]` when the class
sets `is_transposed`), with the common interface `forward(hidden_states, top_k_index, top_k_weights)`, `act_fn`,
`_apply_gate`, `has_gate`, `has_bias`. This module knows only that interface, no family. Routers (`gate`, not a
Linear in these classes) stay dense; shared experts are ordinary Linears.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: first-layer parameter names of an experts module (gated, then plain), and the second layer's
FIRST_LAYER = ("gate_up_proj", "up_proj")
SECOND_LAYER = "down_proj"


def _is_expert_tensor(value: Any) -> bool:
    return isinstance(value, nn.Parameter) and value.dim() == 3


def expert_parameters(module: nn.Module) -> list[str]:
    """`[first layer, "down_proj"]` for a fused experts module, `[]` for anything else."""
    if not _is_expert_tensor(getattr(module, SECOND_LAYER, None)):
        return []
    first = next((name for name in FIRST_LAYER if _is_expert_tensor(getattr(module, name, None))), None)
    return [first, SECOND_LAYER] if first else []


def expert_matrix(module: nn.Module, param: str, expert: int) -> torch.Tensor:
    """Expert `expert`'s matrix of parameter `param` as `[out, in]` (a view into the 3D parameter)."""
    w = getattr(module, param)[expert]
    return w.t() if getattr(module, "is_transposed", False) else w


def expert_key(module_name: str, param: str, expert: int) -> str:
    """The name of one expert matrix in reports and statistics: `...experts.gate_up_proj[3]`."""
    return f"{module_name}.{param}[{expert}]"
