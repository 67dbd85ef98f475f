"""Tiny random transformers models and helpers the tests share (imported as `from tinymodels import ...`)."""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"

VOCAB = 96

def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, max_position_embeddings=128)
    return OPTForCausalLM(config)


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return Qwen3ForCausalLM(config)


TINY_MODELS = {"llama": tiny_llama, "opt": tiny_opt, "qwen3": tiny_qwen3}


def make_tiny(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    torch.manual_seed(seed)
    model = tiny_llama(layers=4) if name == "llama4" else TINY_MODELS[name]()
    model.config._attn_implementation = attn_implementation
    return model.eval()


def calib_batches(num: int = 4, batch: int = 2, length: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(num)]


def tiny_llama_for(tokenizer, seed: int = 0, layers: int = 2):
    """A tiny random LLaMA whose vocabulary matches `tokenizer` (so real text can be evaluated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def assert_nm_pattern(weights: dict, n: int = 2, m: int = 4) -> None:
    """Every group of `m` consecutive inputs of every row holds exactly `n` zeros, in every named weight."""
    for name, w in weights.items():
        zeros = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((zeros == n).all()), name


def capture_attention(model, run, block_index: int = 1):
    """Run `run()` with hooks on block `block_index`'s attention module.

    Returns `(adapter, block, attention, inputs, output, result)`: the `AttentionInputs` and the output the
    attention module saw, and what `run()` returned.
    """
    from optimum_d2prune.architectures import AttentionInputs, get_adapter

    adapter = get_adapter(model)
    block = adapter.blocks(model)[block_index]
    attention = adapter.attention_module(block)
    seen = {}

    def pre_hook(module, args, kwargs):
        seen["inputs"] = AttentionInputs(args, dict(kwargs))

    def hook(module, args, kwargs, output):
        seen["output"] = output

    handles = [attention.register_forward_pre_hook(pre_hook, with_kwargs=True),
               attention.register_forward_hook(hook, with_kwargs=True)]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return adapter, block, attention, seen["inputs"], seen["output"], result
