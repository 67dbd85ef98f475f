"""Qwen3: LLaMA layout plus a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

import torch
from torch import nn

from .base import AttentionInputs, register_adapter
from .llama import LlamaAdapter


@register_adapter("qwen3")
class Qwen3Adapter(LlamaAdapter):
    """`self_attn.q_norm`/`k_norm` (RMSNorm over head_dim) are applied before the rotary embedding."""

    def validate(self, model: nn.Module) -> None:
        layer_types = set(getattr(model.config, "layer_types", None) or [])
        if len(layer_types) > 1:
            raise ValueError(
                f"This Qwen3 config mixes attention layer types {sorted(layer_types)} (sliding-window layers); "
                "blocks would need per-layer masks, which this adapter does not capture. Disable "
                "`use_sliding_window` or use `attention_update` in ('all', 'q', 'k', 'v') with a uniform config."
            )

    def rotary_qk(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs):
        q, k = attention.q_norm(q).float(), attention.k_norm(k).float()  # RMSNorm over head_dim
        return super().rotary_qk(attention, q, k, inputs)
