"""The generic adapter: any transformers model whose blocks can be found, with no per-family code.

- Blocks: a table of known block paths, then the longest `nn.ModuleList` of same-class modules (as optimum's
  GPTQ does).
- q/k/v: found by name patterns inside a block, separate (`q_proj`/`k_proj`/`v_proj`, `query`/`key`/`value`...)
  or fused (`qkv_proj`, `c_attn`, `qkv`, `Wqkv`: rows `[q; k; v]`; `query_key_value`: rows grouped per key/value
  head, `[q heads of the group; k; v]`, which is GPT-NeoX's per-head interleaving when there is one q head per
  kv head). The row split of a fused layer comes from the config's head counts and head size.
- Attention probabilities for the KL term: the model's own attention module is called with eager attention and
  the candidate q/k weights swapped in, and the attention weights it returns are read. RoPE, q/k norms,
  soft-capping, sliding windows, ALiBi, scaling and masks are therefore whatever transformers does.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import AttentionInterface

from ..errors import UnsupportedModelError
from .base import (
    PRUNABLE_TYPES,
    ArchitectureAdapter,
    AttentionInputs,
    AttentionScores,
    ProjectionRef,
    read_rows,
    write_rows,
)

logger = logging.getLogger(__name__)

#: dotted block-list paths of common transformers layouts, tried in order before the ModuleList search
BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "model.text_model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "model.transformer.h",
    "decoder.layers",
    "encoder.layer",
    "encoder.layers",
    "vit.layers",
    "vit.encoder.layer",
    "deit.layers",
    "deit.encoder.layer",
    "dinov2.encoder.layer",
    "layers",
    "h",
    "blocks",
)

#: separate q/k/v projection names (children of one attention module)
SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("wq", "wk", "wv"),
                ("q_lin", "k_lin", "v_lin"), ("to_q", "to_k", "to_v"))

#: fused q/k/v projection names and their row layout: "blocked" = `[q; k; v]`, "grouped" = per key/value head
#: `[its q heads; k; v]` (GPT-NeoX / Falcon `query_key_value`)
FUSED_QKV = {"qkv_proj": "blocked", "c_attn": "blocked", "qkv": "blocked", "Wqkv": "blocked", "W_pack": "blocked",
             "query_key_value": "grouped"}


class UnsupportedArchitectureError(UnsupportedModelError):
    """The model lacks something the requested pruning needs (a block list, or q/k/v for D²Prune)."""


@dataclass(frozen=True)
class HeadLayout:
    """Head counts and size of one attention module (from its own attributes, else the config)."""

    heads: int
    kv_heads: int
    head_dim: int


def _config_of(module: nn.Module, model_config: Any) -> Any:
    config = getattr(module, "config", None) or model_config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if get_text is not None else config


def head_layout(attention: nn.Module, config: Any) -> HeadLayout:
    """Heads, key/value heads and head size, from the config (`num_attention_heads`, `num_key_value_heads`,
    `head_dim`, `hidden_size`), with the attention module's own attributes taking precedence."""
    config = _config_of(attention, config)
    heads = getattr(config, "num_attention_heads", None) or getattr(attention, "num_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = config.hidden_size // heads
    if not heads or not head_dim:
        raise UnsupportedArchitectureError(
            f"Cannot split the fused q/k/v of {type(attention).__name__}: the config gives no "
            "`num_attention_heads`/`head_dim`. Register an adapter whose `projections()` returns the row blocks."
        )
    return HeadLayout(int(heads), int(kv_heads), int(head_dim))


def fused_rows(layout: str, heads: HeadLayout, out_features: int, name: str) -> dict[str, Any]:
    """Row selections of q, k and v inside a fused projection of `out_features` rows."""
    h, kv, d = heads.heads, heads.kv_heads, heads.head_dim
    if out_features != (h + 2 * kv) * d:
        raise UnsupportedArchitectureError(
            f"Fused projection `{name}` has {out_features} outputs, but the config says ({h} q heads + 2 x {kv} kv "
            f"heads) x {d} = {(h + 2 * kv) * d}. Register an adapter whose `projections()` returns its row blocks."
        )
    if layout == "blocked":
        return {"q": slice(0, h * d), "k": slice(h * d, (h + kv) * d), "v": slice((h + kv) * d, (h + 2 * kv) * d)}
    group = h // kv + 2  # heads per key/value group: its q heads, then one k and one v head
    rows = torch.arange(out_features).view(kv, group, d)
    q_per = h // kv
    return {"q": rows[:, :q_per].reshape(-1), "k": rows[:, q_per].reshape(-1), "v": rows[:, q_per + 1].reshape(-1)}


def find_block_list(model: nn.Module, paths: tuple[str, ...] = BLOCK_PATHS) -> Optional[nn.ModuleList]:
    """The block list: a known path, else the longest `nn.ModuleList` of same-class modules holding a prunable
    layer (ties: the first in module order)."""
    for path in paths:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    best = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, PRUNABLE_TYPES) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best):
            best = module
    return best


def attention_paths(root: nn.Module) -> list[str]:
    """Paths (relative to `root`) of every module with q/k/v children, separate or fused, of a prunable type."""
    found = []
    for path, module in root.named_modules():
        children = dict(module.named_children())
        if any(all(isinstance(children.get(n), PRUNABLE_TYPES) for n in names) for names in SEPARATE_QKV) or any(
                isinstance(children.get(n), PRUNABLE_TYPES) for n in FUSED_QKV):
            found.append(path)
    return found


def find_qkv(root: nn.Module, config: Any = None) -> tuple[str, dict[str, ProjectionRef]]:
    """`(attention module path, {"q"/"k"/"v": ref})` relative to `root`, or `("", {})` if none is found.

    The attention module is the shallowest module with q/k/v children (separate or fused) of a prunable type.
    """
    for path, module in root.named_modules():
        children = dict(module.named_children())
        for names in SEPARATE_QKV:
            if all(isinstance(children.get(n), PRUNABLE_TYPES) for n in names):
                prefix = f"{path}." if path else ""
                return path, {p: ProjectionRef(prefix + n) for p, n in zip(("q", "k", "v"), names)}
        for name, layout in FUSED_QKV.items():
            fused = children.get(name)
            if isinstance(fused, PRUNABLE_TYPES):
                prefix = f"{path}." if path else ""
                out = read_rows(fused).shape[0]
                rows = fused_rows(layout, head_layout(module, config), out, prefix + name)
                return path, {p: ProjectionRef(prefix + name, rows[p]) for p in ("q", "k", "v")}
    return "", {}


class GenericAdapter(ArchitectureAdapter):
    """Blocks and q/k/v found by name; attention probabilities from the model's own (eager) attention.

    Set `block_paths` (and optionally `qkv_names`/`attention_path`) in a subclass to help it on a layout it
    cannot discover.
    """

    block_paths = BLOCK_PATHS
    qkv_names: dict[str, str] = {}

    def __init__(self) -> None:
        self.config: Any = None

    def validate(self, model: nn.Module) -> None:
        self.config = getattr(model, "config", None)
        self.blocks(model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        found = find_block_list(model, tuple(self.block_paths))
        if found is None:
            raise UnsupportedArchitectureError(
                f"Could not find the transformer blocks of {type(model).__name__}: none of the known block paths "
                f"exists and it has no nn.ModuleList of same-class blocks. Tell the pruner where they are with a small "
                "adapter: `@register_adapter('<model_type>') class MyAdapter(GenericAdapter): block_paths = "
                "('path.to.layers',)` (see docs/architectures.md)."
            )
        return found

    def block_stacks(self, model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        """Every block stack of `model` (`stacks.find_block_stacks`), or the one a subclass's `block_paths` name."""
        from .stacks import find_block_stacks

        if type(self).block_paths is not BLOCK_PATHS:
            return super().block_stacks(model)
        return find_block_stacks(model) or super().block_stacks(model)

    def _qkv(self, root: nn.Module) -> tuple[str, dict[str, ProjectionRef]]:
        """The block's (first) attention module and its q/k/v."""
        if self.qkv_names:
            return self.attention_path, {p: ProjectionRef(n) for p, n in self.qkv_names.items()}
        return find_qkv(root, self.config)

    def attention_groups(self, block: nn.Module) -> list[tuple[nn.Module, dict[str, ProjectionRef]]]:
        """Every module of the block with q/k/v children (a Swin stage holds one per inner block)."""
        if self.qkv_names:
            return super().attention_groups(block)
        groups = []
        for path in attention_paths(block):
            module = block.get_submodule(path) if path else block
            _, refs = find_qkv(module, self.config)
            prefix = f"{path}." if path else ""
            groups.append((module, {p: ProjectionRef(prefix + r.module, r.rows) for p, r in refs.items()}))
        return groups

    def projections(self, block: nn.Module) -> dict[str, ProjectionRef]:
        return self._qkv(block)[1]

    def attention_module(self, block: nn.Module) -> nn.Module:
        path, refs = self._qkv(block)
        if not refs:
            raise self.missing_qkv_error(block)
        return block.get_submodule(path) if path else block

    def missing_qkv_error(self, block: nn.Module) -> UnsupportedArchitectureError:
        separate = ", ".join("/".join(names) for names in SEPARATE_QKV)
        return UnsupportedArchitectureError(
            f"Found no q/k/v projections in the blocks ({type(block).__name__}): looked for separate {separate} "
            f"or fused {', '.join(FUSED_QKV)} layers. D²Prune's attention-aware choice needs them. Prune with "
            "`attention_update='all'` or a baseline method (`sparsegpt`, `wanda`, `magnitude`: they need only the "
            "block list), choose the layers with `targets`, or register a small adapter that sets `qkv_names` "
            "(see docs/architectures.md)."
        )

    def attention_scores(self, attention: nn.Module, inputs: AttentionInputs, weights: dict[str, torch.Tensor]):
        """The module's own attention with q/k rows replaced by `weights`, a chunk of heads at a time.

        The module runs up to its attention function, which a registered capture function replaces: it records
        the queries and keys after the family's own norms and position encoding, and stops the call. The
        probabilities are then computed by the family's eager function on slices of heads. Modules that do not
        dispatch through transformers' attention interface are called once in eager mode for all heads.
        """
        _, refs = find_qkv(attention, self.config) if not self.qkv_names else self._relative_refs(attention)
        eager = getattr(sys.modules.get(type(attention).__module__), "eager_attention_forward", None)
        with swapped_weights(attention, {p: refs[p] for p in weights}, weights):
            kwargs = _bound_arguments(attention, inputs)
            captured = _capture_query_key(attention, kwargs) if eager is not None else None
            if captured is None:
                return self._eager_scores(attention, kwargs)
        return _chunked_eager_scores(attention, eager, *captured)

    @staticmethod
    def _eager_scores(attention: nn.Module, kwargs: dict[str, Any]) -> AttentionScores:
        with eager_attention(attention):
            if "output_attentions" in inspect.signature(attention.forward).parameters:
                kwargs["output_attentions"] = True
            output = attention(**kwargs)
        probs = _attention_weights(output)
        if probs is None:
            raise UnsupportedArchitectureError(
                f"{type(attention).__name__} returned no attention weights in eager mode; the generic path cannot "
                "compute the KL term for it. Use `attention_update` in ('all', 'q', 'k', 'v') or add an adapter "
                "with its own `attention_scores`."
            )
        probs = probs.float()
        return AttentionScores(probs.shape[1], probs.shape[1], lambda heads: probs[:, heads])

    def _relative_refs(self, attention: nn.Module) -> tuple[str, dict[str, ProjectionRef]]:
        prefix = f"{self.attention_path}." if self.attention_path else ""
        return "", {p: ProjectionRef(n[len(prefix):] if n.startswith(prefix) else n) for p, n in self.qkv_names.items()}


@contextlib.contextmanager
def swapped_weights(root: nn.Module, refs: dict[str, ProjectionRef], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily write `weights[p]` into the rows of projection `p`; the originals are restored on exit."""
    saved = []
    try:
        for p, ref in refs.items():
            module = root.get_submodule(ref.module)
            saved.append((module, ref.rows, read_rows(module, ref.rows).detach().clone()))
            write_rows(module, ref.rows, weights[p])
        yield
    finally:
        for module, rows, original in reversed(saved):
            write_rows(module, rows, original)


@contextlib.contextmanager
def attention_implementation(attention: nn.Module, name: str) -> Iterator[bool]:
    """Switch the module's config to another attention implementation; yields False when it has no config."""
    config = getattr(attention, "config", None)
    current = getattr(config, "_attn_implementation", None) if config is not None else None
    if config is None or current is None or current == name:
        yield config is not None and current == name
        return
    try:
        config._attn_implementation = name
        yield True
    finally:
        config._attn_implementation = current


def eager_attention(attention: nn.Module) -> contextlib.AbstractContextManager:
    """Switch the module's config to eager attention (the only implementation returning the weights)."""
    return attention_implementation(attention, "eager")


class _QueryKeyCaptured(Exception):
    """Raised by the capture attention function once it recorded the queries and keys (never escapes)."""


#: the attention implementation name under which `_capture_attention` is registered
CAPTURE_IMPLEMENTATION = "d2prune_capture"
_CAPTURE_SLOT = "_d2prune_query_key"


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """An attention function (transformers' `AttentionInterface` signature) that records its inputs and stops."""
    slot = module.__dict__.get(_CAPTURE_SLOT)
    if slot is None:
        raise RuntimeError(f"`{CAPTURE_IMPLEMENTATION}` attention is only used by the D2Prune KL term.")
    slot.append((query, key, attention_mask, args, kwargs))
    raise _QueryKeyCaptured


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)


def _capture_query_key(attention: nn.Module, kwargs: dict[str, Any]) -> Optional[tuple]:
    """Run `attention` until its attention function; return what that function received, or None when the
    module does not dispatch through transformers' attention interface."""
    slot: list = []
    attention.__dict__[_CAPTURE_SLOT] = slot
    try:
        with attention_implementation(attention, CAPTURE_IMPLEMENTATION) as switched:
            if not switched:
                return None
            attention(**kwargs)
    except _QueryKeyCaptured:
        pass
    finally:
        del attention.__dict__[_CAPTURE_SLOT]
    return slot[0] if slot else None


def _chunked_eager_scores(attention: nn.Module, eager: Any, query: torch.Tensor, key: torch.Tensor,
                          mask: Optional[torch.Tensor], args: tuple, kwargs: dict[str, Any]) -> AttentionScores:
    """Probabilities from the family's eager function on slices of whole key-head groups, in fp32.

    Query rows are independent in every eager attention (scores, mask, softcap, sinks and softmax act row by row),
    so the KL term's subset of query positions is taken before the call, with the same rows of the mask: a chunk
    holds `[B, h, rows, T]`, not `[B, h, T, T]`.
    """
    query, key = query.detach().float(), key.detach().float()
    heads, group = query.shape[1], query.shape[1] // key.shape[1]
    all_heads = [False]  # fallback: a family whose eager function needs every head at once (per-head sinks)
    last: list = []  # with all heads: (rows, weights) of the last call, reused by the other head slices

    def run(q: torch.Tensor, k: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        _, weights = eager(attention, q, k, k, m, *args, **{**kwargs, "dropout": 0.0})
        return weights.float()

    def weights(sl: slice, rows: Optional[torch.Tensor]) -> torch.Tensor:
        q, m = query, mask
        if rows is not None:
            q = q.index_select(2, rows.to(q.device))
            if m is not None and m.shape[-2] > 1:
                m = m.index_select(-2, rows.to(m.device))
        if sl.stop - sl.start == heads:
            return run(q, key, m)
        if not all_heads[0]:
            try:
                return run(q[:, sl], key[:, sl.start // group : sl.stop // group], m)
            except RuntimeError as err:
                logger.debug("%s: eager attention needs all heads at once (%s).", type(attention).__name__, err)
                all_heads[0] = True
        if not last or last[0] is not rows:
            last[:] = [rows, run(q, key, m)]
        return last[1][:, sl]

    def log_probs(sl: slice, rows: Optional[torch.Tensor]) -> torch.Tensor:
        return weights(sl, rows).clamp_min(1e-12).log()

    return AttentionScores(heads, group, lambda sl: weights(sl, None), log_probs)


def _bound_arguments(attention: nn.Module, inputs: AttentionInputs) -> dict[str, Any]:
    """The captured call as keyword arguments, with the mask in eager form.

    The captured mask follows the convention of the model's attention implementation; with SDPA it is boolean
    (True = attend) or None for a plain causal mask (SDPA's `is_causal` shortcut, taken when the module's
    `is_causal` is set). Eager attention adds the mask to the scores, so it needs the additive form.
    """
    signature = inspect.signature(attention.forward)
    bound = signature.bind_partial(*inputs.args, **inputs.kwargs)
    kwargs = dict(bound.arguments)
    extra = kwargs.pop(next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), ""), None)
    if extra:
        kwargs.update(extra)
    for name, value in kwargs.items():  # a KV cache would grow with every call: probabilities need none
        if isinstance(value, Cache):
            kwargs[name] = None
    if "attention_mask" in signature.parameters or "attention_mask" in kwargs:
        hidden = inputs.hidden_states
        kwargs["attention_mask"] = _additive_mask(kwargs.get("attention_mask"), attention, hidden)
    return kwargs


def _additive_mask(mask: Optional[torch.Tensor], attention: nn.Module, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    dtype = hidden.dtype if hidden.is_floating_point() else torch.float32
    causal = bool(getattr(attention, "is_causal", False))
    if mask is None or mask.dim() == 2:  # SDPA's causal shortcut, or a flash-attention padding mask [B, T]
        length = hidden.shape[1]
        if mask is None and (not causal or length < 2):
            return None
        allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device)
        allowed = (allowed.tril() if causal else allowed)[None, None]
        mask = allowed if mask is None else allowed & mask[:, None, None, :].bool().to(hidden.device)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return mask


def _attention_weights(output: Any) -> Optional[torch.Tensor]:
    """The `[B, heads, Tq, Tk]` attention weights in an attention module's output tuple."""
    if isinstance(output, (tuple, list)):
        for item in output[1:]:
            if isinstance(item, torch.Tensor) and item.dim() == 4:
                return item
    return getattr(output, "attentions", None)

