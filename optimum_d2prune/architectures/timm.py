"""timm `VisionTransformer` (vit_*, deit_*, deit_*_distilled): one fused `attn.qkv` Linear per block.

The rows of `attn.qkv.weight` are `[q; k; v]` (each `num_heads * head_dim` rows). The adapter exposes them as
three row blocks, so the engine prunes each with its own solver: the OBS update is row-independent, so leaving
one block un-updated is exact (the other blocks' updates never touch its rows).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .base import (
    ArchitectureAdapter,
    AttentionInputs,
    MaskSpec,
    ProjectionRef,
    projection_output,
    query_key_scores,
    register_adapter,
)


def _timm_vit_classes() -> tuple[type, ...]:
    """timm's ViT model/attention classes, if timm's ViT module is already imported (a timm model exists)."""
    module = sys.modules.get("timm.models.vision_transformer")
    return (module.VisionTransformer,) if module is not None else ()


@register_adapter("timm_vit")
class TimmViTAdapter(ArchitectureAdapter):
    """`blocks[i].attn.qkv` (fused q/k/v rows), `attn.proj`, `mlp.fc1`/`fc2`; optional `attn.q_norm`/`k_norm`."""

    block_paths = ("blocks",)
    attention_path = "attn"
    qkv_names = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv"}

    @staticmethod
    def detect(model: nn.Module) -> bool:
        classes = _timm_vit_classes()
        return bool(classes) and isinstance(model, classes)

    def validate(self, model: nn.Module) -> None:
        for i, block in enumerate(self.blocks(model)):
            attn = getattr(block, "attn", None)
            qkv = getattr(attn, "qkv", None)
            if not isinstance(qkv, nn.Linear) or not hasattr(attn, "num_heads") or not hasattr(attn, "head_dim"):
                raise ValueError(
                    f"Block {i} of {type(model).__name__} has no fused `attn.qkv` Linear with `num_heads`/`head_dim` "
                    f"(attention {type(attn).__name__}); only timm's standard `Attention` is supported. Prune with "
                    "`method_options={'skip_update': 'none'}` and `targets` excluding attention, or add an adapter."
                )
            if qkv.out_features != 3 * attn.num_heads * attn.head_dim:
                raise ValueError(f"Block {i}: `attn.qkv` has {qkv.out_features} outputs, expected "
                                 f"3 * {attn.num_heads} heads * {attn.head_dim}.")

    def blocks(self, model: nn.Module) -> nn.Module:
        """timm keeps its blocks in an `nn.Sequential` (indexable and iterable like a ModuleList)."""
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
            raise ValueError(f"{type(model).__name__} has no `blocks` Sequential: not a timm VisionTransformer.")
        return blocks

    def projections(self, block: nn.Module) -> dict[str, ProjectionRef]:
        d = block.attn.num_heads * block.attn.head_dim
        return {p: ProjectionRef("attn.qkv", slice(i * d, (i + 1) * d)) for i, p in enumerate(("q", "k", "v"))}

    def forward_model(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        return model(inputs["pixel_values"])

    def attention_scores(self, attention: nn.Module, inputs: AttentionInputs, weights: dict[str, torch.Tensor]):
        x = inputs.hidden_states
        batch, length = x.shape[:2]
        heads, head_dim = attention.num_heads, attention.head_dim
        d = heads * head_dim
        q = projection_output(attention.qkv, weights["q"], x, slice(0, d))
        k = projection_output(attention.qkv, weights["k"], x, slice(d, 2 * d))
        q = attention.q_norm(q.view(batch, length, heads, head_dim).transpose(1, 2)).float()
        k = attention.k_norm(k.view(batch, length, heads, head_dim).transpose(1, 2)).float()
        mask = inputs.args[1] if len(inputs.args) > 1 else inputs.kwargs.get("attn_mask")
        causal = bool(inputs.args[2] if len(inputs.args) > 2 else inputs.kwargs.get("is_causal", False))
        return query_key_scores(q, k, attention.scale, MaskSpec(mask, causal))
