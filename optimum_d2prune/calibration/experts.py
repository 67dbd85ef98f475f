"""Per-expert calibration statistics of fused MoE experts modules (layout: `architectures.experts`).

`ExpertStatisticsCollector` hooks the experts module and accumulates, per expert, statistics of exactly the tokens
the router sent to it (the second matrix's inputs are replayed from the first with the module's own
`_apply_gate`/`act_fn`). Memory: the experts module's inputs of the calibration batch and one expert's Hessians at
a time.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures.experts import expert_key, expert_matrix, expert_parameters
from .hooks import HookManager
from .statistics import InputStatistics, LinearStatistics

logger = logging.getLogger(__name__)

def _linear(module: nn.Module, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """`x W_eᵀ (+ b_e)` in fp32 for one expert, following the module's bias convention."""
    bias = getattr(module, f"{param}_bias", None) if getattr(module, "has_bias", False) else None
    b = None if bias is None else bias[expert].float()
    return F.linear(x.float(), expert_matrix(module, param, expert).float(), b)


def _hidden_act(module: nn.Module, first: str, y: torch.Tensor) -> torch.Tensor:
    """The second layer's input from the first layer's output (gating or plain activation, as the module does)."""
    if first == "gate_up_proj" and getattr(module, "has_gate", True):
        return module._apply_gate(y)
    return module.act_fn(y)


class ExpertStatisticsCollector:
    """Per-expert `LinearStatistics` (keyed by `expert_key`) from the tokens each expert received.

    A forward pre-hook on each experts module reads `hidden_states [N, H]` and `top_k_index [N, k]`; padded tokens
    (`token_mask`, False on padding) are left out. `tokens[(module name, expert)]` counts the routed tokens.

    Two modes:
    - deferred (the default): the hook keeps the module's inputs and routing; `statistics(...)` builds one expert's
      statistics when the engine first asks for them, from the weights as they are then (dense: the engine prunes
      an expert's first matrix before its second), and frees the previous expert's. Memory: the experts module's
      inputs (`N x H`) plus one expert's Hessians, instead of every expert's (`E x (H² + I²)`);
    - `all_experts=True` (data-parallel ranks, which must all-reduce the same tensors): every expert's statistics
      are allocated up front and accumulated during the forward; they are all in `stats`.
    """

    def __init__(self, modules: dict[str, nn.Module], level: str, device: torch.device, seq_len: int,
                 all_experts: bool = False) -> None:
        self.level = level
        self.device = device
        self.seq_len = seq_len
        self.deferred = not all_experts
        self.stats: dict[str, LinearStatistics] = {}
        self.tokens: dict[tuple[str, int], int] = {}
        self.token_mask: Optional[torch.Tensor] = None
        self._modules = modules
        self._inputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in modules}
        self._built: dict[str, LinearStatistics] = {}  # deferred mode: the statistics of one expert
        self._built_for: Optional[tuple[str, int]] = None
        self._hooks = HookManager()
        for name, module in modules.items():
            params = expert_parameters(module)
            for e in range(getattr(module, params[0]).shape[0]):
                self.tokens[(name, e)] = 0
                if all_experts:  # with zero output sums too, so that every rank reduces the same tensors
                    for param in params:
                        rows, columns = expert_matrix(module, param, e).shape
                        stat = self._stat(self.stats, expert_key(name, param, e), columns)
                        stat.y_sq = torch.zeros(rows, dtype=torch.float32, device=device)
            self._hooks.add(module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))

    def _stat(self, store: dict[str, LinearStatistics], key: str, columns: int) -> LinearStatistics:
        stat = store.get(key)
        if stat is None:
            stat = store[key] = LinearStatistics(InputStatistics(columns, self.level, self.device), self.seq_len)
        return stat

    def token_counts(self, modules: dict[str, nn.Module]) -> dict[tuple[str, int], int]:
        """Routed tokens per expert, read from the (possibly all-reduced) statistics."""
        counts = {}
        for (name, e), local in self.tokens.items():
            stat = self.stats.get(expert_key(name, expert_parameters(modules[name])[0], e))
            counts[(name, e)] = stat.inputs.num_tokens if stat is not None else local
        return counts

    def statistics(self, name: str, param: str, expert: int) -> Optional[LinearStatistics]:
        """The statistics of one expert matrix (None if the expert received no token)."""
        key = expert_key(name, param, expert)
        if not self.deferred:
            return self.stats.get(key)
        if self._built_for != (name, expert):
            self.release()
            for hidden, index in self._inputs[name]:
                self._accumulate_expert(self._built, name, expert, hidden, index)
            self._built_for = (name, expert)
        return self._built.get(key)

    def release(self) -> None:
        """Free the statistics built in deferred mode."""
        for stat in self._built.values():
            stat.inputs.free()
        self._built.clear()
        self._built_for = None

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            values = list(bound.values())
            hidden = bound.get("hidden_states", values[0] if values else None)
            index = bound.get("top_k_index", values[1] if len(values) > 1 else None)
            if hidden is None or index is None:
                raise RuntimeError(f"Could not read `hidden_states`/`top_k_index` of the experts module {name}.")
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            index = index.detach().reshape(hidden.shape[0], -1)
            mask = self.token_mask
            if mask is not None and mask.numel() == hidden.shape[0] and not bool(mask.all()):
                keep = mask.reshape(-1).to(hidden.device)
                hidden, index = hidden[keep], index[keep]
            num = getattr(module, expert_parameters(module)[0]).shape[0]
            counts = torch.bincount(index.reshape(-1)[index.reshape(-1) < num], minlength=num)
            for e, count in enumerate(counts.tolist()):
                self.tokens[(name, e)] += count
            if self.deferred:
                self._inputs[name].append((hidden.to(self.device), index.to(self.device)))
            else:
                for e in range(num):
                    self._accumulate_expert(self.stats, name, e, hidden, index)

        return hook

    def _accumulate_expert(self, store: dict[str, LinearStatistics], name: str, e: int, hidden: torch.Tensor,
                           index: torch.Tensor) -> None:
        """Add the tokens of `hidden` routed to expert `e` of module `name` to its matrices' statistics in `store`."""
        module = self._modules[name]
        rows = (index == e).any(-1)
        if not bool(rows.any()):
            return
        first, second = expert_parameters(module)
        x = hidden[rows]
        y = _linear(module, first, e, x)
        h = _hidden_act(module, first, y)
        for param, inputs, outputs in ((first, x, y), (second, h, _linear(module, second, e, h))):
            stat = self._stat(store, expert_key(name, param, e), inputs.shape[-1])
            stat.inputs.add(inputs)
            stat.add_output(outputs)

    def end_batch(self) -> None:
        """Nothing to release between batches (each hook call is self-contained)."""

    def remove(self) -> None:
        self._hooks.remove()

    def free(self) -> None:
        """Drop everything: kept inputs, built and accumulated statistics."""
        self.release()
        for stat in self.stats.values():
            stat.inputs.free()
        self.stats.clear()
        for inputs in self._inputs.values():
            inputs.clear()
