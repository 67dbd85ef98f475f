"""Router-aware expert saliency (after REAP: Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE
Compression", 2025, arXiv 2510.13999).

For every token x routed to expert e with gate weight g_e(x) (the router's top-k weight) and expert output f_e(x):

- reap: `Σ_{x→e} g_e(x)·‖f_e(x)‖ / N` over all N calibration tokens of the layer, i.e. routing frequency × mean gate
  weight × output norm: an expert that is rarely chosen, or chosen with a small weight, or that adds little, goes
  first. (REAP's own average runs over the tokens routed to e only; weighting by the frequency also ranks an expert
  that is almost never routed low.)
- frequency: the number of tokens routed to e (the routing-count baseline).

The expert outputs are computed by the experts module itself (each routed (token, slot) pair once, with gate 1), so
any family following `moe.py`'s fused-experts interface works.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration.hooks import HookManager
from .calibration import BlockInputs, forward_block


@dataclass
class ExpertUsage:
    """Routing sums of one MoE layer over the calibration tokens."""

    tokens: int
    counts: torch.Tensor  # [E] tokens routed to each expert
    weighted_norm: torch.Tensor  # [E] Σ g·‖f(x)‖ over the routed tokens

    def scores(self, method: str) -> torch.Tensor:
        if method == "frequency":
            return self.counts.double()
        return self.weighted_norm.double() / max(self.tokens, 1)


def _routing(module: nn.Module, args: tuple,
             kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    values = list(bound.values())
    hidden = bound.get("hidden_states", values[0] if values else None)
    index = bound.get("top_k_index", values[1] if len(values) > 1 else None)
    weights = bound.get("top_k_weights", values[2] if len(values) > 2 else None)
    if hidden is None or index is None or weights is None:
        raise RuntimeError(f"Could not read hidden_states/top_k_index/top_k_weights of {type(module).__name__}.")
    hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    return hidden, index.detach().reshape(hidden.shape[0], -1), weights.detach().reshape(hidden.shape[0], -1)


def collect_usage(block: nn.Module, experts: nn.Module, count: int, inputs: BlockInputs, index: int) -> ExpertUsage:
    """Run block `index` over the calibration batches and sum the routing statistics of its experts module."""
    usage = ExpertUsage(0, torch.zeros(count, dtype=torch.long), torch.zeros(count, dtype=torch.float64))
    state: dict[str, Any] = {"busy": False, "mask": None, "seen": []}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not state["busy"]:
            state["seen"].append(_routing(module, args, kwargs))

    def on_batch(b: int) -> None:
        _drain(experts, usage, state)
        state["mask"] = inputs.token_masks[b]

    with HookManager() as hooks:
        hooks.add(experts.register_forward_pre_hook(hook, with_kwargs=True))
        forward_block(block, inputs, index, on_batch)
        _drain(experts, usage, state)
    return usage


def _drain(experts: nn.Module, usage: ExpertUsage, state: dict[str, Any]) -> None:
    """Add the routed calls recorded for the last batch to `usage` (each expert output computed once)."""
    state["busy"] = True
    try:
        with torch.no_grad():
            for hidden, index, weights in state["seen"]:
                mask = state["mask"]
                if mask is not None and mask.numel() == hidden.shape[0]:
                    keep = mask.reshape(-1).to(hidden.device)
                    hidden, index, weights = hidden[keep], index[keep], weights[keep]
                usage.tokens += hidden.shape[0]
                valid = index < usage.counts.numel()
                token, slot = valid.nonzero(as_tuple=True)
                chosen = index[token, slot]
                gates = weights[token, slot]
                outputs = experts(hidden[token], chosen.unsqueeze(1), torch.ones_like(gates).unsqueeze(1))
                norms = outputs.float().norm(dim=-1).double().cpu() * gates.double().cpu()
                usage.counts += torch.bincount(chosen.cpu(), minlength=usage.counts.numel())
                usage.weighted_norm.index_add_(0, chosen.cpu(), norms)
    finally:
        state["busy"] = False
        state["seen"] = []
