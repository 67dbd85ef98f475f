"""Where the removable units of a block are: MLP channels, key/value groups of heads, MoE experts.

A unit is described by the parameter slices that removing it deletes (`ParamSlice`): for every parameter, the
dimension and, per unit, the indices along it. Planning (parameter counts, expected shapes) and surgery read the same
description, so what is counted is what is cut. Architecture knowledge lives here and only here: name tables for the
MLP and the output projection, `find_qkv`/`head_layout` for attention, the fused-experts interface of `moe.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures.experts import expert_parameters
from ..architectures.generic import find_qkv, head_layout

#: modules whose `weight` is a matrix this package slices (Conv1D stores `[in, out]`)
LINEAR_TYPES = (nn.Linear, Conv1D)

#: MLP layouts, tried in order on every module of a block: (producer names, consumer name), relative to one parent.
#: A producer named in FUSED_PRODUCERS holds several row blocks of the intermediate width (`[gate; up]`).
MLP_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("gate_up_proj",), "down_proj"),
    (("w1", "w3"), "w2"),
    (("fc1",), "fc2"),
    (("c_fc",), "c_proj"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
    (("intermediate.dense",), "output.dense"),
    (("up_proj",), "down_proj"),
)
FUSED_PRODUCERS = {"gate_up_proj": 2}

#: output projection of an attention module (its input columns are the heads)
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o", "out_lin", "output.dense")


def out_dim(module: nn.Module) -> int:
    """The weight dimension of the output features (0 for Linear, 1 for Conv1D)."""
    return 1 if isinstance(module, Conv1D) else 0


def in_dim(module: nn.Module) -> int:
    return 0 if isinstance(module, Conv1D) else 1


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight as `[out, in]` (a view)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


@dataclass
class ParamSlice:
    """One parameter touched by removing units: `index[u]` are unit u's indices along `dim`."""

    name: str  # full parameter name from the model root
    dim: int
    index: torch.Tensor  # [units, per_unit] long

    @property
    def per_unit(self) -> int:
        return self.index.shape[1]


@dataclass
class UnitLayout:
    """The removable units of one block, of one kind."""

    kind: str  # "mlp", "attention" or "experts"
    block: int
    units: int
    slices: list[ParamSlice]
    #: full name of the consuming Linear (down_proj / fc2 / o_proj) and its input columns per unit `[units, g]`
    consumer: Optional[str] = None
    columns: Optional[torch.Tensor] = None
    #: the module whose forward calls the unit's modules (MLP parent, attention module, MoE block) and extras
    module: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _child(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _linear_slices(prefix: str, module: nn.Module, dim_out: bool, index: torch.Tensor) -> list[ParamSlice]:
    """Slices of a Linear/Conv1D's weight (and bias, for output slices) for per-unit `index`."""
    dim = out_dim(module) if dim_out else in_dim(module)
    slices = [ParamSlice(f"{prefix}.weight", dim, index)]
    if dim_out and getattr(module, "bias", None) is not None:
        slices.append(ParamSlice(f"{prefix}.bias", 0, index))
    return slices


def find_mlp(block: nn.Module, block_prefix: str, index: int) -> Optional[UnitLayout]:
    """The MLP channels of a block (`MLP_LAYOUTS`), or None when the block has no dense MLP of a known layout."""
    for parent_path, parent in block.named_modules():
        for producers, consumer in MLP_LAYOUTS:
            mods = [_child(parent, n) for n in (*producers, consumer)]
            if not all(isinstance(m, LINEAR_TYPES) for m in mods):
                continue
            width = matrix(mods[-1]).shape[1]
            parts = [FUSED_PRODUCERS.get(n, 1) for n in producers]
            if any(matrix(m).shape[0] != width * p for m, p in zip(mods[:-1], parts, strict=True)):
                continue
            base = _join(block_prefix, parent_path)
            channels = torch.arange(width).unsqueeze(1)
            slices: list[ParamSlice] = []
            for name, module, p in zip(producers, mods[:-1], parts, strict=True):
                rows = torch.cat([channels + k * width for k in range(p)], dim=1)
                slices += _linear_slices(_join(base, name), module, True, rows)
            slices += _linear_slices(_join(base, consumer), mods[-1], False, channels)
            return UnitLayout("mlp", index, width, slices, consumer=_join(base, consumer), columns=channels,
                              module=base, info={"width": width})
    return None


def _as_index(rows: Any, size: int) -> torch.Tensor:
    if rows is None:
        return torch.arange(size)
    if isinstance(rows, slice):
        return torch.arange(size)[rows]
    return torch.as_tensor(rows).reshape(-1)


def find_attention(block: nn.Module, block_prefix: str, index: int, config: Any) -> Optional[UnitLayout]:
    """The key/value groups of a block's attention: a unit is one kv head with its query heads, so GQA/MQA stays
    valid. None when the block has no q/k/v or no output projection of a known name."""
    path, refs = find_qkv(block, config)
    if not refs:
        return None
    attention = block.get_submodule(path) if path else block
    output = next(((n, m) for n in OUTPUT_PROJECTIONS
                   if isinstance(m := _child(attention, n), LINEAR_TYPES)), None)
    if output is None:
        return None
    layout = head_layout(attention, config)
    heads, kv, d = layout.heads, layout.kv_heads, layout.head_dim
    if kv < 1 or heads % kv:
        return None
    per = heads // kv
    base = _join(block_prefix, path)
    # per unit (kv group g): the q rows of its `per` query heads, the k and v rows of head g
    by_module: dict[str, list[torch.Tensor]] = {}
    modules: dict[str, nn.Module] = {}
    for p, count in (("q", heads), ("k", kv), ("v", kv)):
        ref = refs[p]
        module = block.get_submodule(ref.module)
        rows = _as_index(ref.rows, matrix(module).shape[0])
        if rows.numel() != count * d:
            return None
        by_module.setdefault(ref.module, []).append(rows.view(kv, -1))
        modules[ref.module] = module
    slices: list[ParamSlice] = []
    for name, parts in by_module.items():
        slices += _linear_slices(_join(block_prefix, name), modules[name], True, torch.cat(parts, dim=1))
    columns = torch.arange(heads * d).view(kv, per * d)
    out_name = _join(base, output[0])
    slices += _linear_slices(out_name, output[1], False, columns)
    # norms over all heads (e.g. OLMo-2's q/k norms) and per-head parameters (attention sinks)
    projections = [_relative(name, path) for name in (*modules, _join(path, output[0]))]
    for pname, param in attention.named_parameters():
        if param.dim() != 1 or any(pname.startswith(f"{p}.") for p in projections):
            continue
        size = param.shape[0]
        if "norm" in pname and size == heads * d:
            slices.append(ParamSlice(_join(base, pname), 0, columns))
        elif "norm" in pname and size == kv * d:
            slices.append(ParamSlice(_join(base, pname), 0, torch.arange(kv * d).view(kv, d)))
        elif "sink" in pname and size == heads:
            slices.append(ParamSlice(_join(base, pname), 0, torch.arange(heads).view(kv, per)))
    return UnitLayout("attention", index, kv, slices, consumer=out_name, columns=columns, module=base,
                      info={"heads": heads, "kv_heads": kv, "head_dim": d, "queries_per_group": per})


def _relative(name: str, prefix: str) -> str:
    """`name` relative to the module at `prefix` (both relative to the block)."""
    return name[len(prefix) + 1:] if prefix and name.startswith(f"{prefix}.") else name


def find_experts(block: nn.Module, block_prefix: str, index: int) -> Optional[UnitLayout]:
    """The routed experts of a block (a fused experts module of `moe.py`'s interface) with their router rows."""
    for path, module in block.named_modules():
        if not expert_parameters(module):
            continue
        count = getattr(module, expert_parameters(module)[0]).shape[0]
        parent_path = path.rpartition(".")[0]
        parent = block.get_submodule(parent_path) if parent_path else block
        router = next(((n, m) for n, m in parent.named_children()
                       if m is not module and isinstance(getattr(m, "weight", None), torch.Tensor)
                       and m.weight.dim() == 2 and m.weight.shape[0] == count), None)
        if router is None:
            return None
        units = torch.arange(count).unsqueeze(1)
        base = _join(block_prefix, path)
        slices = [ParamSlice(_join(base, n), 0, units) for n, p in module.named_parameters(recurse=False)
                  if p.dim() >= 1 and p.shape[0] == count]
        router_base = _join(block_prefix, parent_path, router[0])
        slices += [ParamSlice(_join(router_base, n), 0, units) for n, p in router[1].named_parameters()
                   if p.dim() >= 1 and p.shape[0] == count]
        top_k = _top_k(parent, router[1])
        return UnitLayout("experts", index, count, slices, module=_join(block_prefix, parent_path),
                          info={"experts": base, "router": router_base, "top_k": top_k})
    return None


def _top_k(*modules: nn.Module) -> Optional[int]:
    for module in modules:
        for name in ("top_k", "num_experts_per_tok"):
            value = getattr(module, name, None)
            if isinstance(value, int):
                return value
    return None


def params_per_unit(layout: UnitLayout, shapes: dict[str, torch.Size]) -> int:
    """Parameters removed with one unit (every slice: its per-unit indices times the size of the other dims)."""
    total = 0
    for s in layout.slices:
        shape = shapes[s.name]
        other = 1
        for i, n in enumerate(shape):
            if i != s.dim:
                other *= n
        total += s.per_unit * other
    return total
