"""Cutting a model down in place: parameters sliced, blocks dropped, counters and the config brought along.

Parameters are replaced by smaller ones (`index_select` along the sliced dimension), never resized in place, and the
size attributes of their modules (`in_features`/`out_features`, Conv1D's `nx`/`nf`) follow, so the module prints and
behaves as one built at the new size.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layout import UnitLayout
from .plan import slice_keep, text_config

#: module attributes holding a count that the shrink changes (updated where they equal the old count)
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
EXPERT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts")
WIDTH_ATTRIBUTES = ("intermediate_size", "intermediate_dim", "ffn_dim")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter `name` by `value` (same dtype, device and `requires_grad`)."""
    module, attr = _owner(model, name)
    old = getattr(module, attr)
    module._parameters[attr] = nn.Parameter(value.to(device=old.device, dtype=old.dtype).contiguous(),
                                            requires_grad=old.requires_grad)
    sync_shape(module)


def sync_shape(module: nn.Module) -> None:
    """Size attributes of a Linear/Conv1D from its weight."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, Conv1D):
        module.nx, module.nf = module.weight.shape


def add_zero_bias(model: nn.Module, module_name: str) -> None:
    """Give a Linear/Conv1D a zero bias (its outputs do not change)."""
    module = model.get_submodule(module_name)
    if getattr(module, "bias", None) is not None:
        return
    w = module.weight
    size = w.shape[1] if isinstance(module, Conv1D) else w.shape[0]
    module.bias = nn.Parameter(torch.zeros(size, dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)


def remove_units(model: nn.Module, layout: UnitLayout, removed: torch.Tensor) -> None:
    """Delete units `removed` of `layout` from every parameter slice, and update the count attributes."""
    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1)
    params = dict(model.named_parameters(remove_duplicate=False))
    for s in layout.slices:
        param = params[s.name]
        keep = slice_keep(s, removed, param.shape[s.dim]).to(param.device)
        set_parameter(model, s.name, param.detach().index_select(s.dim, keep))
    kept = layout.units - removed.numel()
    root = model.get_submodule(layout.module) if layout.module else model
    if layout.kind == "attention":
        per = layout.info["queries_per_group"]
        _update(root.modules(), HEAD_ATTRIBUTES, layout.info["heads"], kept * per)
        _update(root.modules(), KV_ATTRIBUTES, layout.info["kv_heads"], kept)
        _update(root.modules(), ("all_head_size",), layout.info["heads"] * layout.info["head_dim"],
                kept * per * layout.info["head_dim"])
    elif layout.kind == "mlp":
        _update(root.modules(), WIDTH_ATTRIBUTES, layout.units, kept)


def update_expert_counts(model: nn.Module, old: int, new: int) -> None:
    """Every module's expert-count attribute (experts, router, the LM's load-balancing loss)."""
    _update(model.modules(), EXPERT_ATTRIBUTES, old, new)


def _update(modules: Iterable[nn.Module], names: tuple[str, ...], old: int, new: int) -> None:
    for module in modules:
        for name in names:
            if isinstance(module.__dict__.get(name), int) and not isinstance(module.__dict__[name], bool) \
                    and module.__dict__[name] == old:
                setattr(module, name, new)


def remove_blocks(model: nn.Module, blocks_path: str, removed: list[int]) -> None:
    """Drop blocks `removed` from the block list and renumber the kept blocks' `layer_idx` (KV-cache slots)."""
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    gone = set(removed)
    kept = [block for i, block in enumerate(blocks) if i not in gone]
    setattr(parent, attr, nn.ModuleList(kept))
    for new, block in enumerate(kept):
        for module in block.modules():
            for name in ("layer_idx", "layer_id"):
                if isinstance(module.__dict__.get(name), int):
                    setattr(module, name, new)


def apply_config_changes(model: nn.Module, changes: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set `changes` on the model's (text) config; returns `{field: (old, new)}`."""
    cfg = text_config(model.config)
    done = {}
    for key, value in changes.items():
        old = getattr(cfg, key, None)
        setattr(cfg, key, value)
        done[key] = (old, value)
    return done
