"""Adapter contract: all the architecture knowledge the engine needs, and the registry of adapters.

An adapter says where the block stacks are, which linears of a block are q/k/v (possibly row blocks of one fused
Linear), which batch key holds each stack's token mask, and how to compute a block's attention probabilities from
given q/k weights (for the KL term of D²Prune's attention-aware choice). A family the generic adapter cannot read
gets one file in this package with a `@register_adapter` class, imported by the package's `__init__`.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

MODEL_TYPE_TO_ADAPTER: dict[str, type["ArchitectureAdapter"]] = {}

PROJECTIONS = ("q", "k", "v")

#: module types whose weight the engine prunes as a matrix `[out, in]` (GPT-2's `Conv1D` stores it transposed)
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

#: the output rows of one projection inside a fused layer: a contiguous block, or explicit row indices
Rows = Optional[Union[slice, torch.Tensor]]


def register_adapter(*model_types: str) -> Callable[[type["ArchitectureAdapter"]], type["ArchitectureAdapter"]]:
    """Class decorator: map `model_type`s (transformers `config.model_type`, or a timm family key) to an adapter."""

    def wrap(cls: type["ArchitectureAdapter"]) -> type["ArchitectureAdapter"]:
        for model_type in model_types:
            MODEL_TYPE_TO_ADAPTER[model_type] = cls
        cls.model_types = tuple(model_types)
        return cls

    return wrap


@dataclass(frozen=True)
class ProjectionRef:
    """One attention projection: a Linear (by name, relative to the block) and, for fused layers, its row block."""

    module: str
    rows: Rows = None


@dataclass
class AttentionInputs:
    """The positional and keyword arguments one attention module received for one calibration batch."""

    args: tuple
    kwargs: dict[str, Any]
    token_mask: Optional[torch.Tensor] = None  # [B, T] bool, False on padding

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class ArchitectureAdapter(ABC):
    """Architecture knowledge for the engine. Subclasses set the class attributes or override the methods."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: dotted path of the block list from the model root, tried in order
    block_paths: ClassVar[tuple[str, ...]] = ()
    #: dotted path of the attention module inside a block
    attention_path: ClassVar[str] = "self_attn"
    #: q/k/v Linear names relative to the block
    qkv_names: ClassVar[dict[str, str]] = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}

    def validate(self, model: nn.Module) -> None:
        """Raise `ValueError` for a configuration of this family the adapter cannot handle."""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        for path in self.block_paths:
            try:
                found = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                return found
        raise ValueError(
            f"{type(self).__name__} found no block list at {list(self.block_paths)} in {type(model).__name__}."
        )

    def block_stacks(self, model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        """Every stack of blocks as `(module name, block list)`; one for a decoder-only or encoder-only model."""
        blocks = self.blocks(model)
        return [(next(name for name, module in model.named_modules() if module is blocks), blocks)]

    def mask_keys(self, model: nn.Module, path: str) -> tuple[str, ...]:
        """The calibration batch keys that hold the token mask of the stack at `path`, tried in order: an
        encoder-decoder's decoder stack has its own mask."""
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False) and "decoder" in path.split("."):
            return ("decoder_attention_mask",)
        return ("attention_mask",)

    def projections(self, block: nn.Module) -> dict[str, ProjectionRef]:
        """`{"q": ref, "k": ref, "v": ref}` for one block."""
        return {p: ProjectionRef(name) for p, name in self.qkv_names.items()}

    def attention_module(self, block: nn.Module) -> nn.Module:
        return get_submodule(block, self.attention_path)

    def attention_groups(self, block: nn.Module) -> list[tuple[nn.Module, dict[str, ProjectionRef]]]:
        """Every attention module of a block with its q/k/v (refs relative to the block); the q/k/v choice is made
        for each. One for most families (a Swin stage holds several)."""
        refs = self.projections(block)
        return [(self.attention_module(block), refs)] if refs else []

    def has_attention(self, block: nn.Module) -> bool:
        """Whether the block has a softmax attention with q/k/v (state-space and linear-attention blocks have not)."""
        return bool(self.attention_groups(block))

    def forward_model(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """Call the model on one prepared batch (`input_ids`/`attention_mask` or `pixel_values`)."""
        return model(**inputs)

    def attention_scores(
        self, attention: nn.Module, inputs: AttentionInputs, weights: dict[str, torch.Tensor]
    ) -> "AttentionScores":
        """The attention of one call with the q/k weights in `weights` (`"q"`, `"k"`, fp32, rows of the projection
        only) instead of the module's own, as probabilities computed a chunk of heads at a time."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `attention_scores`.")


@dataclass
class AttentionScores:
    """One attention call whose probabilities are computed for a slice of query heads at a time, so the KL term
    holds `[B, h, T, T]` for a few heads h, never for all of them (T² × heads grows fastest with model size)."""

    num_heads: int
    group: int  # query heads per key head (grouped-query attention): slices hold whole groups
    probs: Callable[[slice], torch.Tensor]  # heads -> fp32 probabilities [B, h, Tq, Tk], masked entries 0
    #: (heads, query rows or None for all) -> fp32 log-probabilities `[B, h, rows, Tk]` (masked entries very
    #: negative, their probability exactly 0), computing only the rows asked for; when absent, the log of
    #: `probs` floored at 1e-12, rows selected afterwards
    log_probs: Optional[Callable[[slice, Optional[torch.Tensor]], torch.Tensor]] = None

    def log_probabilities(self, heads: slice, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-probabilities of a slice of heads, for the query positions `rows` only (a 1D index) or all."""
        if self.log_probs is not None:
            return self.log_probs(heads, rows)
        log = self.probs(heads).clamp_min(1e-12).log()
        return log if rows is None else log.index_select(2, rows.to(log.device))

    def chunks(self, heads_per_chunk: int) -> Iterator[slice]:
        """Consecutive head slices of at most `heads_per_chunk` heads (at least one whole group)."""
        step = max(self.group, heads_per_chunk // self.group * self.group)
        for start in range(0, self.num_heads, step):
            yield slice(start, min(start + step, self.num_heads))


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to: the model's own mask (None, a `[B, Tk]` padding mask, or the 4D mask
    transformers passes to attention layers: boolean True = attend, or additive float), causality, and a sliding
    window."""

    attention_mask: Optional[torch.Tensor] = None
    causal: bool = True
    sliding_window: Optional[int] = None


def query_key_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: MaskSpec) -> AttentionScores:
    """`AttentionScores` from per-head queries `[B, H, Tq, D]` and keys `[B, Hkv, Tk, D]` (after the family's
    position encoding); probabilities by `masked_softmax` of `q kᵀ · scaling`, one head slice at a time."""
    group = q.shape[1] // k.shape[1]

    def scores(heads: slice, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        keys = k[:, heads.start // group : heads.stop // group].repeat_interleave(group, dim=1)  # whole groups
        queries = q[:, heads] if rows is None else q[:, heads].index_select(2, rows.to(q.device))
        return queries @ keys.transpose(-1, -2) * scaling

    def probs(heads: slice) -> torch.Tensor:
        return masked_softmax(scores(heads), mask)

    def log_probs(heads: slice, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        return masked_log_softmax(scores(heads, rows), mask, query_rows=rows, query_length=q.shape[2])

    return AttentionScores(q.shape[1], group, probs, log_probs)


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a prunable module as `[out_features, in_features]` (a view: Conv1D stores `[in, out]`)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def read_rows(module: nn.Module, rows: Rows = None) -> torch.Tensor:
    """Rows `rows` of the module's `[out, in]` matrix (a view for a slice, a copy for index rows)."""
    w = matrix(module)
    return w if rows is None else w[rows]


def write_rows(module: nn.Module, rows: Rows, value: torch.Tensor) -> None:
    """Write `value` into rows `rows` of the module's `[out, in]` matrix, in the module's dtype and device."""
    w = matrix(module).data
    value = value.to(device=w.device, dtype=w.dtype)
    if rows is None:
        w.copy_(value)
    else:
        w[rows] = value


def projection_output(module: nn.Module, weight: torch.Tensor, x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """`x @ weightᵀ + bias[rows]` in fp32."""
    bias = module.bias
    if bias is not None:
        bias = (bias if rows is None else bias[rows]).float()
    return F.linear(x.float(), weight.float(), bias)


def masked_log_softmax(scores: torch.Tensor, mask: MaskSpec, query_rows: Optional[torch.Tensor] = None,
                       query_length: Optional[int] = None) -> torch.Tensor:
    """`log(masked_softmax(...))` in three passes over the scores: masked entries get a very negative log (their
    probability is exactly 0 after `exp`); rows with no allowed key are uniform over masked keys (padding queries,
    which the KL term excludes). `scores` may hold only the query positions `query_rows` of `query_length`."""
    masked = _masked_scores(scores, mask, query_rows, query_length)[0]
    return torch.log_softmax(masked, dim=-1)


def _masked_scores(scores: torch.Tensor, spec: MaskSpec, query_rows: Optional[torch.Tensor] = None,
                   query_length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores with disallowed entries at the dtype's minimum, and the allowed mask (broadcastable).

    With `query_rows`, `scores` holds those query positions (of `query_length`) only; the masks are built for
    all positions, then the same rows are taken."""
    attention_mask, causal, sliding_window = spec.attention_mask, spec.causal, spec.sliding_window
    tk = scores.shape[-1]
    tq = scores.shape[-2] if query_rows is None else query_length
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=scores.device)
    if causal:
        allowed = allowed.tril(tk - tq)
        if sliding_window is not None:
            allowed &= ~torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq - sliding_window)
    rows = None if query_rows is None else query_rows.to(scores.device)
    if rows is not None:
        allowed = allowed[rows]
    if attention_mask is not None:
        mask = attention_mask.to(scores.device)
        if mask.dim() == 2:
            mask = mask[:, None, None, :].bool()
        mask = mask[..., -tq:, -tk:]
        if rows is not None and mask.shape[-2] > 1:
            mask = mask.index_select(mask.dim() - 2, rows)
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.float()
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), allowed


def masked_softmax(scores: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
    """Softmax over keys of `[B, H, Tq, Tk]` scores with the causal mask and the model's own mask applied."""
    masked, allowed = _masked_scores(scores, mask)
    probs = torch.softmax(masked, dim=-1).nan_to_num(0.0)  # rows with no allowed key (padding) become 0
    return probs.masked_fill(~allowed, 0.0)
