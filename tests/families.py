"""Tiny random configs of the families the generic path supports (random weights: structure tests only)."""

from __future__ import annotations

import torch

VOCAB = 96
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _causal_lm(config_name: str, **overrides):
    import transformers

    config = getattr(transformers, config_name)(**{**TEXT, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config)


#: family -> (builder, notes); every builder returns a model on random weights
CAUSAL_FAMILIES = {
    "llama": lambda: _causal_lm("LlamaConfig"),
    "qwen2": lambda: _causal_lm("Qwen2Config"),  # q/k/v bias
    "mistral": lambda: _causal_lm("MistralConfig", sliding_window=8),
    "qwen3-mixed": lambda: _causal_lm("Qwen3Config", head_dim=16, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=1, layer_types=["full_attention", "sliding_attention"]),
    "gemma2": lambda: _causal_lm("Gemma2Config", head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                 attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
    "gemma3-text": lambda: _causal_lm("Gemma3TextConfig", head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                      layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: _causal_lm("Phi3Config"),  # fused qkv_proj and gate_up_proj
    "gpt-neox": lambda: _causal_lm("GPTNeoXConfig", num_key_value_heads=None, use_parallel_residual=True),
    "gpt2": lambda: _gpt2(),
    "olmo2": lambda: _causal_lm("Olmo2Config"),
    # Llama 4 text with dense MLP layers: chunked attention, no-RoPE layers, q/k L2 norm
    "llama4-text": lambda: _causal_lm("Llama4TextConfig", head_dim=16, intermediate_size_mlp=128, moe_layers=[],
                                      attention_chunk_size=8, no_rope_layers=[1, 0], use_qk_norm=True),
    # gpt-oss: attention sinks, alternating sliding/full layers; its experts are not pruned (see docs)
    "gpt-oss": lambda: _causal_lm("GptOssConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                  sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "granite": lambda: _causal_lm("GraniteConfig", attention_multiplier=0.2, residual_multiplier=0.5,
                                  embedding_multiplier=2.0, logits_scaling=4.0),
}


def _gpt2():
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config)


#: families whose attention needs eager in transformers (SDPA has no logit soft-capping, no attention sinks)
EAGER_ONLY = {"gemma2", "gpt-oss"}


def make_family(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    torch.manual_seed(seed)
    model = CAUSAL_FAMILIES[name]()
    model.config._attn_implementation = "eager" if name in EAGER_ONLY else attn_implementation
    return model.eval()
