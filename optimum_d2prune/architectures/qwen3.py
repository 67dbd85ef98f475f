"""Qwen3: LLaMA layout plus a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

import torch
from torch import nn

from .base import AttentionInputs, register_adapter
from .llama import LlamaAdapter


@register_adapter("qwen3")
class Qwen3Adapter(LlamaAdapter):
    """`self_attn.q_norm`/`k_norm` (RMSNorm over head_dim) are applied before the rotary embedding.

    Configs that mix sliding-window and full layers work: the engine captures each block's own mask.
    """

    def rotary_qk(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs):
        q, k = attention.q_norm(q).float(), attention.k_norm(k).float()  # RMSNorm over head_dim
        return super().rotary_qk(attention, q, k, inputs)
