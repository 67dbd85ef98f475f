"""LLaMA family (LLaMA-2/3, SmolLM2, Mistral-style): rotary q/k, grouped-query attention."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .base import ArchitectureAdapter, AttentionInputs, projection_output, query_key_scores, register_adapter


@register_adapter("llama", "mistral")
class LlamaAdapter(ArchitectureAdapter):
    """`model.layers[i].self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`; k/v heads repeated for GQA."""

    block_paths = ("model.layers", "layers")

    def rotary_qk(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs):
        """Per-head q/k `[B, heads, T, head_dim]` after the family's position encoding (RoPE here)."""
        cos, sin = inputs.kwargs["position_embeddings"]
        return apply_rotary_pos_emb(q, k, cos.float(), sin.float())

    def attention_scores(self, attention: nn.Module, inputs: AttentionInputs, weights: dict[str, torch.Tensor]):
        x = inputs.hidden_states
        batch, length = x.shape[:2]
        head_dim = attention.head_dim
        q = projection_output(attention.q_proj, weights["q"], x, None).view(batch, length, -1, head_dim).transpose(1, 2)
        k = projection_output(attention.k_proj, weights["k"], x, None).view(batch, length, -1, head_dim).transpose(1, 2)
        q, k = self.rotary_qk(attention, q, k, inputs)
        window = getattr(attention, "sliding_window", None)
        return query_key_scores(q, k, attention.scaling, inputs.kwargs.get("attention_mask"), causal=True,
                                sliding_window=window)
