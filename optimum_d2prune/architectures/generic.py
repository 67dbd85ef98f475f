"""The generic adapter: any transformers model whose blocks can be found, with no per-family code.

- Blocks: a table of known block paths, then the longest `nn.ModuleList` of same-class modules (as optimum's
  GPTQ does).
- q/k/v: found by name patterns inside a block, separate (`q_proj`/`k_proj`/`v_proj`, `query`/`key`/`value`...)
  or fused in one Linear. How a fused Linear's rows split into q, k and v is a property of the family, not of
  the layer's name (CodeGen's `qkv_proj` is four partitions of `[q, v, k]`, Phi-3's is `[q; k; v]`), so it comes
  from `FUSED_LAYOUTS`, keyed by `config.model_type` and checked against each family's own attention in
  tests/test_fused_layouts.py; families not in the table get the name-based default `FUSED_QKV`. A fused layer
  whose rows do not fit its layout is not read at all: the attention-aware choice refuses the model.
- Attention probabilities for the KL term: the model's own attention module is called with eager attention and
  the candidate q/k weights swapped in, and the attention weights it returns are read. RoPE, q/k norms,
  soft-capping, sliding windows, ALiBi, scaling and masks are therefore whatever transformers does. The module
  gets its mask exactly as the model gave it (boolean, additive or None); only transformers' eager attention
  function, called on the captured queries and keys, gets it in the additive form it expects.
- Blocks without softmax attention (Mamba mixers; linear attentions, whose q/k/v feed a gated delta rule or a
  lightning attention rather than a softmax) have no attention group: `GenericAdapter.has_attention(block)` is
  False for them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

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
    Rows,
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
                ("Wq", "Wk", "Wv"), ("q_lin", "k_lin", "v_lin"), ("to_q", "to_k", "to_v"),
                ("query_proj", "key_proj", "value_proj"), ("project_q", "project_k", "project_v"),
                ("linear_q", "linear_k", "linear_v"), ("q_linear", "k_linear", "v_linear"))

#: the remedy every refusal of the attention-aware choice names
AWARE_REMEDY = ("Prune with `method_options={'skip_update': 'none'}` (CLI `--skip-update none`) or a baseline "
                "method (`sparsegpt`, `wanda`, `magnitude`: they need only the block list)")


class UnsupportedArchitectureError(UnsupportedModelError):
    """The model lacks something the requested pruning needs (a block list, or q/k/v for D²Prune)."""


@dataclass(frozen=True)
class HeadLayout:
    """Head counts and size of one attention module (from its own attributes, else the config)."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class FusedLayout:
    """How the output rows of one fused q/k/v Linear split into q, k and v.

    The rows form `groups` equal groups, each holding its share of the three projections in `order`:

    - `"one"`: a single group `[q; k; v]`; q has `heads x head_dim` rows, k and v share the rest equally
      (multi-query and grouped-query attention included);
    - `"heads"`: one group per attention head, `[q; k; v]` of one head size each (GPT-NeoX, BLOOM);
    - `"kv_heads"`: one group per key/value head, `[its q heads; k; v]` (Falcon's new decoder architecture);
    - any other string: the attribute of the attention module holding the number of groups (CodeGen's
      `mp_num` model-parallel partitions), each split in three equal parts.
    """

    groups: str = "one"
    order: tuple[str, str, str] = ("q", "k", "v")

    def describe(self) -> str:
        inner = "; ".join(self.order)
        if self.groups == "one":
            return f"[{inner}]"
        if self.groups in ("heads", "kv_heads"):
            return f"[{inner}] per {'head' if self.groups == 'heads' else 'key/value head'}"
        return f"`{self.groups}` partitions of [{inner}]"

    def rows(self, attention: nn.Module, heads: HeadLayout, out_features: int) -> dict[str, Rows]:
        """Row selections of q, k and v; raises `UnsupportedArchitectureError` when the rows do not fit."""
        h, kv, d = heads.heads, heads.kv_heads, heads.head_dim
        if self.groups == "one":
            rest = out_features - h * d
            if rest <= 0 or rest % 2:
                raise UnsupportedArchitectureError(
                    f"{out_features} rows do not hold {h} query heads of {d} plus equal key and value parts")
            sizes = {"q": h * d, "k": rest // 2, "v": rest // 2}
            start, found = 0, {}
            for p in self.order:
                found[p] = slice(start, start + sizes[p])
                start += sizes[p]
            return found
        count = {"heads": h, "kv_heads": kv}.get(self.groups) or getattr(attention, self.groups, None)
        if not isinstance(count, int) or count <= 0 or out_features % count:
            raise UnsupportedArchitectureError(f"{out_features} rows do not form {count} groups ({self.describe()})")
        per = out_features // count
        if self.groups == "kv_heads":
            if h % kv or per != (h // kv + 2) * d:
                raise UnsupportedArchitectureError(
                    f"{out_features} rows are not {kv} groups of {h // max(kv, 1)} query heads plus one key and one "
                    f"value head of {d}")
            sizes = {"q": h // kv * d, "k": d, "v": d}
        else:
            if per % 3:
                raise UnsupportedArchitectureError(f"groups of {per} rows cannot hold three equal parts")
            sizes = dict.fromkeys("qkv", per // 3)
        grid = torch.arange(out_features).view(count, per)
        start, found = 0, {}
        for p in self.order:
            found[p] = grid[:, start:start + sizes[p]].reshape(-1)
            start += sizes[p]
        return found


#: `[q; k; v]` (GPT-2, Phi-3, MPT, DBRX, multi-query GPTBigCode and Falcon)
BLOCKED = FusedLayout("one")
#: `[q; k; v]` per attention head (GPT-NeoX, BLOOM, Persimmon, Falcon's old architecture)
PER_HEAD = FusedLayout("heads")
#: `[q heads of the group; k; v]` per key/value head (Falcon's new decoder architecture)
PER_KV_HEAD = FusedLayout("kv_heads")

Layout = Union[FusedLayout, Callable[[Any], FusedLayout]]

#: fused q/k/v layouts by `config.model_type`: {name of the fused Linear: layout, or config -> layout}; each
#: entry is proven on a tiny model of the family (perturbing v's rows leaves the attention weights unchanged,
#: perturbing q's or k's changes them: tests/test_fused_layouts.py)
FUSED_LAYOUTS: dict[str, dict[str, Layout]] = {
    "gpt2": {"c_attn": BLOCKED},
    "openai-gpt": {"c_attn": BLOCKED},
    "imagegpt": {"c_attn": BLOCKED},
    "gpt_bigcode": {"c_attn": lambda config: BLOCKED if config.multi_query else PER_HEAD},
    "codegen": {"qkv_proj": FusedLayout("mp_num", ("q", "v", "k"))},
    "gpt_neox": {"query_key_value": PER_HEAD},
    "gpt_neox_japanese": {"query_key_value": PER_HEAD},
    "persimmon": {"query_key_value": PER_HEAD},
    "bloom": {"query_key_value": PER_HEAD},
    "falcon": {"query_key_value": lambda config: (PER_KV_HEAD if config.new_decoder_architecture
                                                  else BLOCKED if config.multi_query else PER_HEAD)},
    "phi3": {"qkv_proj": BLOCKED},
    "mpt": {"Wqkv": BLOCKED},
    "dbrx": {"Wqkv": BLOCKED},
    "ergo": {"qkv_proj": BLOCKED},
}

#: fused q/k/v names of families not in `FUSED_LAYOUTS` (a guess from the name, checked only against row counts)
FUSED_QKV: dict[str, FusedLayout] = {"qkv_proj": BLOCKED, "c_attn": BLOCKED, "qkv": BLOCKED, "Wqkv": BLOCKED,
                                     "W_pack": BLOCKED, "query_key_value": PER_KV_HEAD}


def _config_of(module: nn.Module, model_config: Any) -> Any:
    config = getattr(module, "config", None) or model_config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if get_text is not None else config


def _first_int(*values: Any) -> Optional[int]:
    return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def head_layout(attention: nn.Module, config: Any) -> HeadLayout:
    """Heads, key/value heads and head size: the attention module's own attributes (what its forward splits by),
    else the config (`num_attention_heads`, `num_key_value_heads`, `head_dim`, `hidden_size`)."""
    config = _config_of(attention, config)
    heads = _first_int(*(getattr(attention, n, None) for n in ("num_heads", "num_attention_heads", "n_heads")),
                       getattr(config, "num_attention_heads", None))
    kv_heads = _first_int(*(getattr(attention, n, None) for n in ("num_key_value_heads", "num_kv_heads",
                                                                   "kv_heads")),
                          getattr(config, "num_key_value_heads", None), heads)
    head_dim = _first_int(*(getattr(attention, n, None) for n in ("head_dim", "head_size", "attention_head_size")),
                          getattr(config, "head_dim", None))
    if head_dim is None and heads:
        head_dim = _first_int(getattr(config, "hidden_size", 0) // heads)
    if not heads or not head_dim:
        raise UnsupportedArchitectureError(
            f"the config gives no `num_attention_heads`/`head_dim` for {type(attention).__name__}")
    return HeadLayout(heads, kv_heads or heads, head_dim)


def fused_layouts(attention: nn.Module, config: Any = None) -> dict[str, FusedLayout]:
    """The fused q/k/v names and layouts that apply to `attention`: its family's `FUSED_LAYOUTS` entry (by the
    module's or the model's `model_type`), then the name-based defaults."""
    own = _config_of(attention, config)
    found: dict[str, FusedLayout] = {}
    for candidate in (own, config):
        entry = FUSED_LAYOUTS.get(getattr(candidate, "model_type", None))
        if entry:
            found = {name: layout if isinstance(layout, FusedLayout) else layout(candidate)
                     for name, layout in entry.items()}
            break
    return {**found, **{n: layout for n, layout in FUSED_QKV.items() if n not in found}}


@dataclass(frozen=True)
class _QKV:
    """The q/k/v children of one module (names relative to it), or why a fused one cannot be read."""

    refs: dict[str, ProjectionRef]
    problem: Optional[str] = None


#: what the source of a softmax attention mentions (linear attentions: gated delta rules, lightning attention,
#: and approximate ones: LSH, Nyström, mention none of it)
_SOFTMAX_SOURCE = re.compile(r"softmax|attention_interface|ALL_ATTENTION_FUNCTIONS|scaled_dot_product_attention", re.I)


@functools.lru_cache(maxsize=1024)
def is_softmax_attention(cls: type) -> bool:
    """Whether modules of class `cls` (with q/k/v children) compute softmax attention probabilities, judged by the
    source of the class and its bases. A class without readable source counts as softmax attention."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            return True
        if _SOFTMAX_SOURCE.search(source):
            return True
    return False


def _own_qkv(module: nn.Module, config: Any) -> Optional[_QKV]:
    """q/k/v among `module`'s direct children: separate Linears, or one fused Linear split by its family's layout.
    None when it has none, or when the module is no softmax attention (a linear attention's q/k/v)."""
    children = dict(module.named_children())
    for names in SEPARATE_QKV:
        if all(isinstance(children.get(n), PRUNABLE_TYPES) for n in names):
            if not is_softmax_attention(type(module)):
                return None
            return _QKV({p: ProjectionRef(n) for p, n in zip(("q", "k", "v"), names)})
    for name, layout in fused_layouts(module, config).items():
        fused = children.get(name)
        if not isinstance(fused, PRUNABLE_TYPES):
            continue
        if not is_softmax_attention(type(module)):
            return None
        try:
            rows = layout.rows(module, head_layout(module, config), read_rows(fused).shape[0])
        except UnsupportedArchitectureError as err:
            return _QKV({}, f"`{name}` of {type(module).__name__} (layout {layout.describe()}): {err}")
        return _QKV({p: ProjectionRef(name, rows[p]) for p in ("q", "k", "v")})
    return None


def _scan(root: nn.Module, config: Any) -> Iterator[tuple[str, _QKV]]:
    """(path relative to `root`, q/k/v) of every module with q/k/v children, in module order."""
    for path, module in root.named_modules():
        found = _own_qkv(module, config)
        if found is not None:
            yield path, found


def _relative(path: str, refs: dict[str, ProjectionRef]) -> dict[str, ProjectionRef]:
    prefix = f"{path}." if path else ""
    return {p: ProjectionRef(prefix + r.module, r.rows) for p, r in refs.items()}


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


def attention_paths(root: nn.Module, config: Any = None) -> list[str]:
    """Paths (relative to `root`) of every module whose q/k/v can be read (separate, or fused in a known layout)."""
    return [path for path, found in _scan(root, config) if found.refs]


def fused_layout_problems(root: nn.Module, config: Any = None) -> list[str]:
    """Why fused q/k/v layers under `root` cannot be split (empty when every one can)."""
    return [found.problem for _, found in _scan(root, config) if found.problem]


def find_qkv(root: nn.Module, config: Any = None) -> tuple[str, dict[str, ProjectionRef]]:
    """`(attention module path, {"q"/"k"/"v": ref})` relative to `root`, or `("", {})` if none can be read.

    The attention module is the shallowest module with q/k/v children (separate, or fused in a layout that fits).
    """
    for path, found in _scan(root, config):
        if found.refs:
            return path, _relative(path, found.refs)
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
        """Every module of the block whose q/k/v can be read (a Swin stage holds one per inner block); none for a
        block without softmax attention (a Mamba mixer, a linear attention) or whose fused q/k/v cannot be split."""
        if self.qkv_names:
            return super().attention_groups(block)
        return [(block.get_submodule(path) if path else block, _relative(path, found.refs))
                for path, found in _scan(block, self.config) if found.refs]

    def has_attention(self, block: nn.Module) -> bool:
        """Whether the block holds a softmax attention whose q/k/v the attention-aware choice can act on. False
        for attention-free blocks of hybrid models (Mamba, linear attention), which are pruned with every
        projection updated and need no per-block warning."""
        return bool(self.attention_groups(block))

    def projections(self, block: nn.Module) -> dict[str, ProjectionRef]:
        return self._qkv(block)[1]

    def attention_module(self, block: nn.Module) -> nn.Module:
        path, refs = self._qkv(block)
        if not refs:
            raise self.missing_qkv_error(block)
        return block.get_submodule(path) if path else block

    def missing_qkv_error(self, block: nn.Module) -> UnsupportedArchitectureError:
        problems = fused_layout_problems(block, self.config) if not self.qkv_names else []
        if problems:
            return UnsupportedArchitectureError(
                f"Cannot split the fused q/k/v of {type(block).__name__} into q, k and v: {'; '.join(problems)}. "
                f"D²Prune's attention-aware choice would act on the wrong rows. {AWARE_REMEDY}, or register a small "
                "adapter whose `projections()` returns the row blocks (see docs/architectures.md)."
            )
        separate = ", ".join("/".join(names) for names in SEPARATE_QKV)
        return UnsupportedArchitectureError(
            f"Found no q/k/v projections in the blocks ({type(block).__name__}): looked for separate {separate} "
            f"or fused {', '.join(FUSED_QKV)} layers. D²Prune's attention-aware choice needs them. "
            f"{AWARE_REMEDY}, choose the layers with `targets`, or register a small adapter that sets `qkv_names` "
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
        queries = next((v.shape[1] for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() == 3), None)
        if probs is None or (queries is not None and probs.shape[-2] != queries):
            found = "no attention weights" if probs is None else (
                f"attention weights of shape {tuple(probs.shape)}, not [batch, heads, {queries} queries, keys]")
            raise UnsupportedArchitectureError(
                f"{type(attention).__name__} returned {found} in eager mode; the generic path cannot compute the KL "
                f"term for it. {AWARE_REMEDY}, use `skip_update` in ('q', 'k', 'v'), or add an adapter with "
                "its own `attention_scores`."
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
    mask = _eager_mask(mask, attention, query, key, kwargs)
    heads, group = query.shape[1], query.shape[1] // key.shape[1]
    all_heads = [False]  # fallback: a family whose eager function needs every head at once (per-head sinks)
    last: list = []  # with all heads: (rows, weights) of the last call, reused by the other head slices

    def run(q: torch.Tensor, k: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        _, weights = eager(attention, q, k, k, m, *args, **{**kwargs, "dropout": 0.0})
        return weights.float()

    def run_all(q: torch.Tensor, k: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        try:
            return run(q, k, m)
        except RuntimeError as err:  # the family's eager attention itself fails (e.g. no key/value head repeat)
            raise UnsupportedArchitectureError(
                f"The eager attention function of {type(attention).__name__} fails on the queries and keys its "
                f"module computes ({' '.join(str(err).split())[:200]}); the generic path cannot compute the KL "
                f"term for it. {AWARE_REMEDY}, or add an adapter with its own `attention_scores`."
            ) from err

    def weights(sl: slice, rows: Optional[torch.Tensor]) -> torch.Tensor:
        q, m = query, mask
        if rows is not None:
            q = q.index_select(2, rows.to(q.device))
            if m is not None and m.shape[-2] > 1:
                m = m.index_select(-2, rows.to(m.device))
        if sl.stop - sl.start == heads:
            return run_all(q, key, m)
        if not all_heads[0]:
            try:
                return run(q[:, sl], key[:, sl.start // group : sl.stop // group], m)
            except RuntimeError as err:
                logger.debug("%s: eager attention needs all heads at once (%s).", type(attention).__name__, err)
                all_heads[0] = True
        if not last or last[0] is not rows:
            last[:] = [rows, run_all(q, key, m)]
        return last[1][:, sl]

    def log_probs(sl: slice, rows: Optional[torch.Tensor]) -> torch.Tensor:
        return weights(sl, rows).clamp_min(1e-12).log()

    return AttentionScores(heads, group, lambda sl: weights(sl, None), log_probs)


def _bound_arguments(attention: nn.Module, inputs: AttentionInputs) -> dict[str, Any]:
    """The captured call as keyword arguments, the mask as the model gave it (its dtype and meaning are the
    module's business: MPT's boolean mask marks the masked entries, SDPA's the allowed ones); only a KV cache,
    which would grow with every call, is dropped."""
    signature = inspect.signature(attention.forward)
    bound = signature.bind_partial(*inputs.args, **inputs.kwargs)
    kwargs = dict(bound.arguments)
    extra = kwargs.pop(next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), ""), None)
    if extra:
        kwargs.update(extra)
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            kwargs[name] = None
    return kwargs


def _eager_mask(mask: Optional[torch.Tensor], attention: nn.Module, query: torch.Tensor, key: torch.Tensor,
                kwargs: dict[str, Any]) -> Optional[torch.Tensor]:
    """The mask an attention function received, in the additive form transformers' eager functions add to the
    scores.

    The attention function gets the mask of the model's attention implementation: with SDPA boolean (True =
    attend) or None for a plain causal mask (SDPA's `is_causal` shortcut, taken when the module's `is_causal` is
    set); with flash attention a `[B, T]` padding mask or None. An additive (float) mask is returned as is.
    """
    tq, tk = query.shape[-2], key.shape[-2]
    if mask is None or mask.dim() == 2:
        causal = bool(kwargs.get("is_causal", getattr(attention, "is_causal", False)))
        if mask is None and (not causal or tq < 2):
            return None
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=query.device)
        allowed = (allowed.tril(tk - tq) if causal else allowed)[None, None]
        mask = allowed if mask is None else allowed & mask[:, None, None, -tk:].bool().to(query.device)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(query.dtype).min)
    return mask


def _attention_weights(output: Any) -> Optional[torch.Tensor]:
    """The `[B, heads, Tq, Tk]` attention weights in an attention module's output tuple."""
    if isinstance(output, (tuple, list)):
        for item in output[1:]:
            if isinstance(item, torch.Tensor) and item.dim() == 4:
                return item
    return getattr(output, "attentions", None)

