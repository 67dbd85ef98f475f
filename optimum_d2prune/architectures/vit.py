"""transformers ViT and DeiT (incl. DeiT with distillation token/teacher head): separate q/k/v, no causal mask."""

from __future__ import annotations

import torch
from torch import nn

from .base import ArchitectureAdapter, AttentionInputs, projection_output, query_key_scores, register_adapter


@register_adapter("vit", "deit")
class ViTAdapter(ArchitectureAdapter):
    """`{vit,deit}.layers[i].attention.{q,k,v,o}_proj` and `mlp.fc1`/`fc2` (transformers >= 5 layout).

    The cls (and, for DeiT, distillation) tokens are ordinary sequence positions inside the blocks, so nothing
    model-specific is needed for them: the block-0 pre-hook captures the embedded sequence as it is.
    """

    block_paths = ("vit.layers", "deit.layers", "layers")
    attention_path = "attention"
    qkv_names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj"}

    def validate(self, model: nn.Module) -> None:
        block = self.blocks(model)[0]
        for name in self.qkv_names.values():
            try:
                module = block.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"{type(model).__name__} has no Linear `{name}` in its blocks: this adapter expects the "
                    "transformers >= 5 ViT/DeiT layout (`attention.q_proj`...). Upgrade transformers."
                )

    def attention_scores(self, attention: nn.Module, inputs: AttentionInputs, weights: dict[str, torch.Tensor]):
        x = inputs.hidden_states
        batch, length = x.shape[:2]
        shape = (batch, length, -1, attention.head_dim)
        q = projection_output(attention.q_proj, weights["q"], x, None).view(shape).transpose(1, 2)
        k = projection_output(attention.k_proj, weights["k"], x, None).view(shape).transpose(1, 2)
        mask = inputs.args[1] if len(inputs.args) > 1 else inputs.kwargs.get("attention_mask")
        return query_key_scores(q, k, attention.scaling, mask, causal=False)
