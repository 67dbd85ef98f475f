"""Tiny random configs of every family the pruner is tested on (random weights: structure tests only).

The tests (`tests/test_generic.py`, `tests/test_adapters.py`, `tests/test_moe.py`) and the generated support table
(`python -m optimum_d2prune.architectures.support_table`) both read `FAMILIES`, so the table lists exactly what is
tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

VOCAB = 96
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
IMAGE = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, num_labels=6)


def _causal_lm(config_name: str, **overrides) -> nn.Module:
    import transformers

    config = getattr(transformers, config_name)(**{**TEXT, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config)


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config)


def _image_classifier(prefix: str) -> nn.Module:
    import transformers

    config = getattr(transformers, f"{prefix}Config")(**IMAGE)
    return getattr(transformers, f"{prefix}ForImageClassification")(config)


def _swin() -> nn.Module:
    import transformers

    config = transformers.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2],
                                     num_heads=[2, 4], window_size=4, num_labels=6)
    return transformers.SwinForImageClassification(config)


@dataclass(frozen=True)
class Family:
    """One tested family: its display name, a builder of a tiny random model, and what the config exercises."""

    name: str
    build: Callable[[], nn.Module]
    exercises: str = ""
    #: transformers' SDPA cannot run it (soft-capping, attention sinks): the model is used with eager attention
    eager_only: bool = False
    kind: str = "causal"  # "causal" or "image"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", lambda: _causal_lm("LlamaConfig"), "RoPE, GQA"),
    Family("qwen2", lambda: _causal_lm("Qwen2Config"), "q/k/v bias"),
    Family("mistral", lambda: _causal_lm("MistralConfig", sliding_window=8), "sliding window"),
    Family("qwen3-mixed", lambda: _causal_lm("Qwen3Config", head_dim=16, use_sliding_window=True, sliding_window=8,
                                             max_window_layers=1, layer_types=["full_attention", "sliding_attention"]),
           "q/k norms, sliding and full layers mixed"),
    Family("gemma2", lambda: _causal_lm("Gemma2Config", head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
           "soft-capping, alternating sliding/full, query_pre_attn_scalar", eager_only=True),
    Family("gemma3-text", lambda: _causal_lm("Gemma3TextConfig", head_dim=16, sliding_window=8,
                                             query_pre_attn_scalar=24,
                                             layer_types=["sliding_attention", "full_attention"]),
           "q/k norms, local/global RoPE, alternating sliding/full"),
    Family("phi3", lambda: _causal_lm("Phi3Config"), "fused qkv_proj and gate_up_proj"),
    Family("gpt-neox", lambda: _causal_lm("GPTNeoXConfig", num_key_value_heads=None, use_parallel_residual=True),
           "fused per-head interleaved query_key_value, parallel residual"),
    Family("gpt2", _gpt2, "Conv1D (transposed weights), fused c_attn"),
    Family("olmo2", lambda: _causal_lm("Olmo2Config"), "q/k norms over all heads"),
    Family("granite", lambda: _causal_lm("GraniteConfig", attention_multiplier=0.2, residual_multiplier=0.5,
                                         embedding_multiplier=2.0, logits_scaling=4.0), "attention multiplier"),
    Family("llama4-text", lambda: _causal_lm("Llama4TextConfig", head_dim=16, intermediate_size_mlp=128,
                                             moe_layers=[], attention_chunk_size=8, no_rope_layers=[1, 0],
                                             use_qk_norm=True),
           "chunked attention, no-RoPE layers, q/k L2 norm (dense MLP layers)"),
    Family("gpt-oss", lambda: _causal_lm("GptOssConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                         sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
           "attention sinks, alternating sliding/full, transposed biased experts", eager_only=True),
    Family("qwen3-moe", lambda: _causal_lm("Qwen3MoeConfig", head_dim=16, num_experts=5, num_experts_per_tok=2,
                                           moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
           "fused experts [E, 2I, H]"),
    Family("mixtral", lambda: _causal_lm("MixtralConfig", num_local_experts=5, num_experts_per_tok=2,
                                         intermediate_size=32), "fused experts, sliding window"),
    Family("vit", lambda: _image_classifier("ViT"), "bidirectional, cls token", kind="image"),
    Family("deit", lambda: _image_classifier("DeiT"), "cls + distillation tokens", kind="image"),
    Family("dinov2", lambda: _image_classifier("Dinov2"), "layer scale", kind="image"),
    Family("swin", lambda: _swin(), "windowed and shifted attention; stages (with patch merging) as blocks",
           kind="image"),
)}

#: families the causal-LM tests of the generic path run on (MoE families have their own tests)
CAUSAL_FAMILIES = sorted(n for n, f in FAMILIES.items() if f.kind == "causal" and n not in ("qwen3-moe", "mixtral"))
EAGER_ONLY = {n for n, f in FAMILIES.items() if f.eager_only}


def make_family(name: str, seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A tiny random model of family `name` in eval mode (eager attention where transformers needs it)."""
    torch.manual_seed(seed)
    family = FAMILIES[name]
    model = family.build()
    model.config._attn_implementation = "eager" if family.eager_only else attn_implementation
    return model.eval()
