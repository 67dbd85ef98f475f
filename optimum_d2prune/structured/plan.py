"""The plan of a shrink, made and checked before any work: which units, how many per block, the new config.

A ratio is turned into a number of units per block (the same in every block, so the config stays standard), and
refused when no such number comes within `ratio_tolerance` of it. The new config is then checked by building the
model it describes on the meta device: its parameter names and shapes must be those of the shrunk model, which is
what `from_pretrained` needs to load it without a plugin (a family whose attention derives the head size from
`hidden_size / num_attention_heads` cannot express removed heads, and is refused here).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..architectures.generic import find_block_list
from ..errors import ConfigError, UnsupportedModelError
from .config import StructuredConfig
from .layout import ParamSlice, UnitLayout, find_attention, find_experts, find_mlp, params_per_unit

logger = logging.getLogger(__name__)

#: config fields of the MLP width, tried in order: those holding the current width are updated
INTERMEDIATE_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "intermediate_size_mlp", "ffn_hidden_size",
                       "d_ff", "inner_hidden_size")
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
#: config flags that give a family's linears a bias (used by `add_bias`)
BIAS_FLAGS = {"mlp": ("mlp_bias",), "attention": ("attention_bias",)}
#: config lists of layer *indices* (remapped when blocks are removed); other lists of length num_hidden_layers are
#: per-layer values and are filtered
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers", "global_attn_layers", "full_attention_layers")
KIND_OF_MODE = {"channels": "mlp", "heads": "attention", "experts": "experts"}


@dataclass
class ShrinkPlan:
    """What a shrink removes, decided before any work."""

    mode: str
    blocks_path: str
    num_blocks: int
    layouts: list[UnitLayout]  # one per block that has the mode's units (empty for blocks mode)
    remove: int  # units removed per block (blocks mode: blocks removed)
    block_params: int
    removed_params: int
    config_changes: dict[str, Any] = field(default_factory=dict)
    #: modules that get a zero bias, because the new config gives them one (`add_bias`)
    added_biases: list[str] = field(default_factory=list)

    @property
    def achieved_ratio(self) -> float:
        return self.removed_params / self.block_params


def text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, block list) of the model, refused with a remedy when it has none."""
    blocks = find_block_list(model)
    if blocks is None:
        raise UnsupportedModelError(f"Could not find the blocks of {type(model).__name__}: structured shrinking needs "
                                    "an nn.ModuleList of layers (e.g. `model.layers`).")
    path = next(name for name, module in model.named_modules() if module is blocks)
    return path, blocks


def unit_layouts(model: nn.Module, mode: str) -> list[UnitLayout]:
    """The mode's units in every block that has them (channels: a dense MLP; heads: q/k/v + output projection;
    experts: a fused experts module with its router)."""
    _, blocks = blocks_of(model)
    found = [layout for i in range(len(blocks)) if (layout := block_layout(model, mode, i)) is not None]
    if not found:
        what = {"channels": "a dense MLP of a known layout (gate/up/down, fc1/fc2, c_fc/c_proj...)",
                "heads": "q/k/v projections and an output projection",
                "experts": "a fused experts module (3D `gate_up_proj`/`down_proj`) with a router"}[mode]
        hint = " (its MLP is a mixture of experts: use mode='experts')" if mode == "channels" and \
            unit_layouts_safe(model, "experts") else ""
        raise UnsupportedModelError(f"mode={mode!r} needs {what} in the blocks of {type(model).__name__}; found "
                                    f"none{hint}. Use another mode, e.g. 'blocks'.")
    return found


def block_layout(model: nn.Module, mode: str, index: int) -> Optional[UnitLayout]:
    """The mode's units of block `index` as the block is now (after zero biases were added to it)."""
    path, blocks = blocks_of(model)
    block, prefix = blocks[index], f"{path}.{index}"
    if mode == "channels":
        return find_mlp(block, prefix, index)
    if mode == "heads":
        return find_attention(block, prefix, index, getattr(model, "config", None))
    return find_experts(block, prefix, index)


def unit_layouts_safe(model: nn.Module, mode: str) -> bool:
    try:
        return bool(unit_layouts(model, mode))
    except UnsupportedModelError:
        return False


def parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}


def block_parameter_count(model: nn.Module) -> int:
    _, blocks = blocks_of(model)
    return sum(p.numel() for p in blocks.parameters())


def choose_count(config: StructuredConfig, block_params: int, unit_params: int, choices: list[int],
                 unit_name: str) -> int:
    """The count (of `choices`) whose removed parameters come closest to `ratio`; refused beyond the tolerance."""
    if not choices:
        raise ConfigError(f"No {unit_name} can be removed from this model in mode {config.mode!r} (removing any would "
                          "leave an invalid model). Use another mode.")
    target = config.ratio * block_params
    best = min(choices, key=lambda c: (abs(c * unit_params - target), c))
    achieved = best * unit_params / block_params
    if abs(achieved - config.ratio) > config.ratio_tolerance:
        below = max((c for c in choices if c * unit_params <= target), default=None)
        above = min((c for c in choices if c * unit_params >= target), default=None)
        nearest = ", ".join(f"{c * unit_params / block_params:.4f} ({c} {unit_name})"
                            for c in dict.fromkeys(x for x in (below, above) if x is not None))
        raise ConfigError(
            f"`ratio`={config.ratio:g} cannot be expressed in mode {config.mode!r}: the nearest valid ratios of block "
            f"parameters are {nearest} (the same count in every block keeps the config standard). Use one of them, "
            f"or raise `ratio_tolerance` (now {config.ratio_tolerance:g}).")
    return best


def plan_shrink(model: nn.Module, config: StructuredConfig) -> ShrinkPlan:
    """Count, config changes and the meta-device check of a shrink (raises before any work)."""
    if getattr(model, "config", None) is None:
        raise UnsupportedModelError("Structured shrinking needs a transformers model (with a `config`), got "
                                    f"{type(model).__name__}.")
    path, blocks = blocks_of(model)
    shapes = parameter_shapes(model)
    block_params = block_parameter_count(model)
    if config.mode == "blocks":
        per_block = {sum(p.numel() for p in b.parameters()) for b in blocks}
        if len(per_block) != 1:
            raise UnsupportedModelError("mode='blocks' counts parameters per block and needs blocks of one size; "
                                        f"{type(model).__name__}'s differ ({sorted(per_block)}).")
        unit = per_block.pop()
        count = choose_count(config, block_params, unit, list(range(1, len(blocks))), "blocks")
        plan = ShrinkPlan("blocks", path, len(blocks), [], count, block_params, count * unit)
        # which blocks go is decided by the calibration data; the last ones stand in for the check (and the check
        # runs again on the chosen ones before the model is changed)
        probe = list(range(len(blocks) - count, len(blocks)))
        plan.config_changes = block_config_changes(model, probe)
        check_expressible(model, plan, probe)
        return plan
    layouts = unit_layouts(model, config.mode)
    units = {layout.units for layout in layouts}
    unit_params = {params_per_unit(layout, shapes) for layout in layouts}
    if len(units) != 1 or len(unit_params) != 1:
        raise UnsupportedModelError(f"mode={config.mode!r} removes the same count in every block, but the blocks of "
                                    f"{type(model).__name__} differ in their units ({sorted(units)}); its config "
                                    "cannot express a uniform cut.")
    n, per = units.pop(), unit_params.pop()
    choices, name = _choices(config, layouts[0], n)
    count = choose_count(config, block_params, per * len(layouts), choices, name)
    plan = ShrinkPlan(config.mode, path, len(blocks), layouts, count, block_params, count * per * len(layouts))
    plan.config_changes = _config_changes(model, plan)
    if config.add_bias:
        _plan_biases(model, plan)
    plan.added_biases = check_expressible(model, plan)
    return plan


def _choices(config: StructuredConfig, layout: UnitLayout, n: int) -> tuple[list[int], str]:
    if config.mode == "channels":
        m = config.channel_multiple
        return [n - kept for kept in range(m, n, m)], "channels per block"
    if config.mode == "heads":
        return list(range(1, n)), "key/value groups per block"
    top_k = layout.info.get("top_k") or 1
    return list(range(1, n - top_k + 1)), "experts per block"


def _config_changes(model: nn.Module, plan: ShrinkPlan) -> dict[str, Any]:
    cfg = text_config(model.config)
    layout = plan.layouts[0]
    if plan.mode == "channels":
        width = layout.info["width"]
        names = [f for f in INTERMEDIATE_FIELDS if getattr(cfg, f, None) == width]
        names = names or [f for f in INTERMEDIATE_FIELDS if hasattr(cfg, f) and getattr(cfg, f) is None]
        if not names:
            raise UnsupportedModelError(f"The config of {type(model).__name__} holds no MLP width field equal to "
                                        f"{width} (looked for {INTERMEDIATE_FIELDS}): cannot express fewer channels.")
        return {names[0]: width - plan.remove}
    if plan.mode == "heads":
        heads, kv, d = layout.info["heads"], layout.info["kv_heads"], layout.info["head_dim"]
        per = layout.info["queries_per_group"]
        changes: dict[str, Any] = {"num_attention_heads": heads - plan.remove * per, "head_dim": d}
        if getattr(cfg, "num_key_value_heads", None) is not None or kv != heads:
            changes["num_key_value_heads"] = kv - plan.remove
        return changes
    names = [f for f in EXPERT_FIELDS if getattr(cfg, f, None) == layout.units]
    if not names:
        raise UnsupportedModelError(f"The config of {type(model).__name__} holds no expert count field equal to "
                                    f"{layout.units} (looked for {EXPERT_FIELDS}).")
    return {names[0]: layout.units - plan.remove}


def _plan_biases(model: nn.Module, plan: ShrinkPlan) -> None:
    """Set the family's bias flag where the consumer has no bias; refuse when no flag can give it one."""
    cfg = text_config(model.config)
    consumer = model.get_submodule(plan.layouts[0].consumer)
    if getattr(consumer, "bias", None) is not None:
        return
    flags = [f for f in BIAS_FLAGS[KIND_OF_MODE[plan.mode]] if getattr(cfg, f, None) is False]
    if not flags:
        consumer_name = plan.layouts[0].consumer.rsplit(".", 1)[-1]
        raise ConfigError(f"`add_bias` needs a config flag that gives `{consumer_name}` a bias, and "
                          f"{type(cfg).__name__} has none (looked for {BIAS_FLAGS[KIND_OF_MODE[plan.mode]]}). Use "
                          "`add_bias=False` (and compensation 'least_squares' or 'none').")
    plan.config_changes.update({f: True for f in flags})


def new_config(model: nn.Module, changes: dict[str, Any]) -> Any:
    """A copy of the model's config with `changes` applied to its text config."""
    config = copy.deepcopy(model.config)
    cfg = text_config(config)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return config


def expected_shapes(model: nn.Module, plan: ShrinkPlan) -> dict[str, torch.Size]:
    """Parameter shapes after removing `plan.remove` units of every layout."""
    shapes = dict(parameter_shapes(model))
    for layout in plan.layouts:
        for s in layout.slices:
            shape = list(shapes[s.name])
            shape[s.dim] -= plan.remove * s.per_unit
            shapes[s.name] = torch.Size(shape)
    return shapes


def meta_model(model: nn.Module, config: Any) -> nn.Module:
    """The model `config` describes, on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return type(model)(config)


def check_expressible(model: nn.Module, plan: ShrinkPlan, removed_blocks: Optional[list[int]] = None) -> list[str]:
    """Refuse unless the new config builds exactly the parameters of the shrunk model (names and shapes); returns
    the modules that must get a zero bias because a bias flag of the new config gives them one."""
    config = new_config(model, plan.config_changes)
    family = type(text_config(model.config)).__name__
    try:
        reference = parameter_shapes(meta_model(model, config))
    except Exception as err:  # noqa: BLE001 - the family's own modeling code refuses the new sizes
        raise UnsupportedModelError(
            f"The config of {family} cannot describe the model shrunk in mode {plan.mode!r} (changes "
            f"{plan.config_changes}): its modeling code refuses it ({type(err).__name__}: {err}). Its sizes are "
            "derived from other fields (e.g. the head size from hidden_size / num_attention_heads), so "
            "`from_pretrained` could not load the result. Use another mode (channels or blocks).") from err
    if plan.mode == "blocks":
        expected = block_renamed_shapes(model, plan.blocks_path, removed_blocks or [])
    else:
        expected = expected_shapes(model, plan)
    extra = sorted(set(reference) - set(expected))
    biases = []
    if plan.config_changes.keys() & _bias_flags():
        owners = [n[: -len(".bias")] for n in extra if n.endswith(".bias")]
        biases = [n for n in owners if f"{n}.weight" in expected]
    problems = [f"{n}: config gives {tuple(reference[n])}, shrunk model has {tuple(expected[n])}"
                for n in sorted(set(reference) & set(expected)) if reference[n] != expected[n]]
    problems += [f"{n}: only in the model the config builds" for n in extra if n[: -len(".bias")] not in biases]
    problems += [f"{n}: only in the shrunk model" for n in sorted(set(expected) - set(reference))]
    if problems:
        raise UnsupportedModelError(
            f"The config of {family} cannot describe the model shrunk in mode {plan.mode!r} (changes "
            f"{plan.config_changes}): {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Its modeling "
            "code derives these sizes from other fields (e.g. the head size from hidden_size / num_attention_heads), "
            "so `from_pretrained` could not load the result. Use another mode (channels or blocks).")
    return biases


def _bias_flags() -> set[str]:
    return {f for flags in BIAS_FLAGS.values() for f in flags}


def block_renamed_shapes(model: nn.Module, blocks_path: str, removed: list[int]) -> dict[str, torch.Size]:
    """Parameter shapes after removing blocks `removed`, with the kept blocks renumbered."""
    prefix = f"{blocks_path}."
    keep = [i for i in range(len(blocks_of(model)[1])) if i not in set(removed)]
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, shape in parameter_shapes(model).items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if int(index) not in new_index:
                continue
            name = f"{prefix}{new_index[int(index)]}.{rest}"
        out[name] = shape
    return out


def block_config_changes(model: nn.Module, removed: list[int]) -> dict[str, Any]:
    """Config fields after removing blocks `removed`: the layer count, per-layer lists filtered, index lists
    remapped."""
    cfg = text_config(model.config)
    total = cfg.num_hidden_layers
    keep = [i for i in range(total) if i not in set(removed)]
    new_index = {old: new for new, old in enumerate(keep)}
    changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
    for key, value in cfg.to_dict().items():
        if not isinstance(value, (list, tuple)) or key.startswith("_"):
            continue
        if key in LAYER_INDEX_LISTS:
            new = [new_index[i] for i in value if i in new_index]
        elif len(value) == total:
            new = type(value)(value[i] for i in keep)
        else:
            continue
        if list(new) != list(value):
            changes[key] = new
    return changes


def valid_ratios(model: nn.Module, mode: str, config: Optional[StructuredConfig] = None) -> list[float]:
    """Every ratio of block parameters `mode` can express on `model` (ascending)."""
    config = config or StructuredConfig(mode=mode, ratio=0.5, ratio_tolerance=1.0)
    block_params = block_parameter_count(model)
    if mode == "blocks":
        _, blocks = blocks_of(model)
        unit = sum(p.numel() for p in blocks[0].parameters())
        return [c * unit / block_params for c in range(1, len(blocks))]
    layouts = unit_layouts(model, mode)
    per = params_per_unit(layouts[0], parameter_shapes(model)) * len(layouts)
    choices, _ = _choices(config, layouts[0], layouts[0].units)
    return sorted(c * per / block_params for c in choices)


def slice_keep(s: ParamSlice, removed: torch.Tensor, size: int) -> torch.Tensor:
    """Indices along `s.dim` that remain after removing units `removed`."""
    drop = torch.zeros(size, dtype=torch.bool)
    drop[s.index[removed].reshape(-1)] = True
    return (~drop).nonzero().squeeze(1)

