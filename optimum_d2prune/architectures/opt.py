"""OPT: learned positions outside the blocks, biased q/k/v, q scaled before the product."""

from __future__ import annotations

import torch
from torch import nn

from .base import ArchitectureAdapter, AttentionInputs, projection_output, query_key_scores, register_adapter


@register_adapter("opt")
class OPTAdapter(ArchitectureAdapter):
    """`model.decoder.layers[i].self_attn.{q,k,v,out}_proj` and `fc1`/`fc2`."""

    block_paths = ("model.decoder.layers", "decoder.layers")

    def attention_scores(self, attention: nn.Module, inputs: AttentionInputs, weights: dict[str, torch.Tensor]):
        x = inputs.hidden_states
        batch, length = x.shape[:2]
        heads, head_dim = attention.num_heads, attention.head_dim
        q = projection_output(attention.q_proj, weights["q"], x, None) * attention.scaling
        k = projection_output(attention.k_proj, weights["k"], x, None)
        q = q.view(batch, length, heads, head_dim).transpose(1, 2)
        k = k.view(batch, length, heads, head_dim).transpose(1, 2)
        return query_key_scores(q, k, 1.0, inputs.kwargs.get("attention_mask"), causal=True)
