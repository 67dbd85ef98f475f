"""Tiny random models of many families (random weights: structure tests only), and a sweep over every family
transformers knows.

`FAMILIES`: hand-picked tiny configs. The tests (`tests/test_generic.py`, `tests/test_adapters.py`,
`tests/test_moe.py`, `tests/test_attention_probabilities.py`, `tests/test_fused_layouts.py`) and the generated
support table (`python -m optimum_d2prune.architectures.support_table`) all read it, so the table lists exactly
what is tested.

The sweep (`sweep_cases`, `check_family`): for each `model_type` of transformers' own auto mappings, a tiny
random config (hidden sizes, layers, heads, vocabulary and experts shrunk), a calibration batch of the kind the
model reads (token ids, pixels, audio features, decoder inputs), one prune, and the property every family must
have: every matrix of every block stack of the model ends at the target sparsity, or the pruner refuses before
touching a weight with a `D2PruneError` whose message names a remedy. `tests/test_family_sweep.py` runs a fixed
sample; `python -m optimum_d2prune.testing.families` runs the whole list and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

VOCAB = 96
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
IMAGE = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, num_labels=6)
#: the sizes of the small GPT-style configs (`n_embd`/`n_layer`/`n_head` names)
GPT = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)


def _causal_lm(config_name: str, **overrides) -> nn.Module:
    import transformers

    config = getattr(transformers, config_name)(**{**TEXT, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config)


def _model(config_name: str, model_name: str, **kwargs) -> nn.Module:
    import transformers

    return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))


def _gpt2() -> nn.Module:
    return _model("GPT2Config", "GPT2LMHeadModel", **GPT)


def _image_classifier(prefix: str) -> nn.Module:
    import transformers

    config = getattr(transformers, f"{prefix}Config")(**IMAGE)
    return getattr(transformers, f"{prefix}ForImageClassification")(config)


def _swin() -> nn.Module:
    import transformers

    config = transformers.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2],
                                     num_heads=[2, 4], window_size=4, num_labels=6)
    return transformers.SwinForImageClassification(config)


def _falcon(**overrides) -> nn.Module:
    return _model("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, bos_token_id=1, eos_token_id=2, **overrides)


def _dbrx() -> nn.Module:
    # transformers' DBRX reads `attn_config.rope_theta` and clamps by `clip_qkv` (None fails): both are set
    return _model("DbrxConfig", "DbrxForCausalLM", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
                  max_seq_len=128, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                  ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))


#: layer types of the tiny hybrid models: one block without softmax attention, two with
HYBRID_LAYERS = ["linear_attention", "full_attention", "full_attention"]


@dataclass(frozen=True)
class Family:
    """One tested family: its display name, a builder of a tiny random model, and what the config exercises."""

    name: str
    build: Callable[[], nn.Module]
    exercises: str = ""
    #: transformers' SDPA cannot run it (soft-capping, attention sinks, no SDPA path): used with eager attention
    eager_only: bool = False
    kind: str = "causal"  # "causal" or "image"
    #: run by the per-family causal-LM tests of tests/test_generic.py (the others: the layout, probability and
    #: sweep tests)
    generic_suite: bool = True


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
    Family("codegen", lambda: _model("CodeGenConfig", "CodeGenForCausalLM", rotary_dim=8, **GPT),
           "fused qkv_proj in 4 model-parallel partitions of [q, v, k]", generic_suite=False),
    Family("gpt-bigcode", lambda: _model("GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=True, **GPT),
           "multi-query attention in a fused c_attn [q; k; v]", generic_suite=False),
    Family("gpt-bigcode-mha", lambda: _model("GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=False, **GPT),
           "multi-head attention: fused c_attn interleaved per head", generic_suite=False),
    Family("falcon", lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2),
           "new decoder architecture: fused query_key_value grouped per key/value head", generic_suite=False),
    Family("falcon-mqa", lambda: _falcon(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
           "multi-query fused query_key_value [q; k; v], parallel attention", generic_suite=False),
    Family("falcon-alibi", lambda: _falcon(new_decoder_architecture=False, multi_query=False, alibi=True),
           "ALiBi, fused query_key_value interleaved per head", generic_suite=False),
    Family("bloom", lambda: _model("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=64, n_layer=2,
                                   n_head=4, bos_token_id=1, eos_token_id=2),
           "ALiBi, additive mask, fused query_key_value interleaved per head", eager_only=True, generic_suite=False),
    Family("mpt", lambda: _model("MptConfig", "MptForCausalLM", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
                                 max_seq_len=128),
           "boolean mask marking the masked entries, ALiBi, fused Wqkv", eager_only=True, generic_suite=False),
    Family("dbrx", _dbrx, "fused Wqkv with GQA, clipped qkv; its experts (2D `w1`/`v1`/`w2`) are not pruned",
           generic_suite=False),
    Family("persimmon", lambda: _causal_lm("PersimmonConfig", num_key_value_heads=None),
           "fused query_key_value interleaved per head, q/k layer norms", generic_suite=False),
    Family("gpt-neox-japanese", lambda: _model(
        "GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", vocab_size=VOCAB, hidden_size=64,
        intermediate_multiple_size=2, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1, eos_token_id=2),
           "fused query_key_value interleaved per head, no SDPA", eager_only=True, generic_suite=False),
    Family("openai-gpt", lambda: _model("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", **{**GPT, "bos_token_id": None,
                                                                                     "eos_token_id": None}),
           "GPT-1: Conv1D, fused c_attn [q; k; v], no SDPA", eager_only=True, generic_suite=False),
    Family("imagegpt", lambda: _model("ImageGPTConfig", "ImageGPTForCausalImageModeling", **GPT),
           "Conv1D, fused c_attn [q; k; v], no SDPA", eager_only=True, generic_suite=False),
    Family("ergo", lambda: _causal_lm("ErgoConfig", head_dim=16, first_dense_intermediate_size=128,
                                      moe_intermediate_size=32, shared_intermediate_size=32, num_experts=4,
                                      num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                      mlp_layer_types=["dense", "sparse"]),
           "fused qkv_proj [q; k; v] with GQA, q/k norms, sliding and full layers, experts", generic_suite=False),
    Family("qwen3-next", lambda: _causal_lm(
        "Qwen3NextConfig", num_hidden_layers=3, layer_types=HYBRID_LAYERS, head_dim=16, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
           "hybrid: gated delta net blocks (no softmax attention), gated attention, experts", generic_suite=False),
    Family("olmo-hybrid", lambda: _causal_lm(
        "OlmoHybridConfig", num_hidden_layers=3, layer_types=HYBRID_LAYERS, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
           "hybrid: gated delta net blocks with separate q_proj/k_proj/v_proj (no softmax attention)",
           generic_suite=False),
    Family("minimax", lambda: _causal_lm(
        "MiniMaxConfig", num_hidden_layers=3, layer_types=HYBRID_LAYERS, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, intermediate_size=32),
           "hybrid: lightning attention blocks (a fused qkv_proj, no softmax), experts", generic_suite=False),
    Family("vit", lambda: _image_classifier("ViT"), "bidirectional, cls token", kind="image"),
    Family("deit", lambda: _image_classifier("DeiT"), "cls + distillation tokens", kind="image"),
    Family("dinov2", lambda: _image_classifier("Dinov2"), "layer scale", kind="image"),
    Family("swin", lambda: _swin(), "windowed and shifted attention; stages (with patch merging) as blocks",
           kind="image"),
)}

#: families the causal-LM tests of the generic path run on (MoE families have their own tests)
CAUSAL_FAMILIES = sorted(n for n, f in FAMILIES.items()
                         if f.kind == "causal" and f.generic_suite and n not in ("qwen3-moe", "mixtral"))
EAGER_ONLY = {n for n, f in FAMILIES.items() if f.eager_only}
#: families whose attention reads q, k and v from one fused Linear (their layouts: tests/test_fused_layouts.py)
FUSED_FAMILIES = ("phi3", "gpt-neox", "gpt2", "codegen", "gpt-bigcode", "gpt-bigcode-mha", "falcon", "falcon-mqa",
                  "falcon-alibi", "bloom", "mpt", "dbrx", "persimmon", "gpt-neox-japanese", "openai-gpt", "imagegpt",
                  "ergo")


def make_family(name: str, seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A tiny random model of family `name` in eval mode (eager attention where transformers needs it)."""
    torch.manual_seed(seed)
    family = FAMILIES[name]
    model = family.build()
    model.config._attn_implementation = "eager" if family.eager_only else attn_implementation
    return model.eval()


# ---------------------------------------------------------------------------------------------------- the sweep
#: transformers' task mappings, in the order a family's model class is chosen (the first that lists it)
SWEEP_MAPPINGS = (  # encoder-decoders first: their `ForCausalLM` class is the decoder alone
    ("seq2seq-lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("image-text-to-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("base", "MODEL_MAPPING_NAMES"),
)

SWEEP_VOCAB = 256
#: token ids of the calibration batches stay below this (the ids above it are the shrunk special tokens)
SWEEP_TOKENS = 192
SWEEP_SEQ = 16
#: tiny configs above this many parameters are not run (a size the shrinking missed)
SWEEP_MAX_PARAMETERS = 12_000_000

_HIDDEN = {"hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "model_dim", "hidden_dim",
           "word_embed_proj_dim", "embedding_size", "projection_dim", "text_embed_dim", "vision_embed_dim",
           "emb_dim", "d_embed", "encoder_hidden_size", "cross_attention_hidden_size", "vision_hidden_size",
           "dim_model"}
_INTERMEDIATE = {"intermediate_size", "ffn_dim", "n_inner", "d_ff", "dff", "encoder_ffn_dim", "decoder_ffn_dim",
                 "ffn_hidden_size", "intermediate_size_mlp", "mlp_dim", "dim_feedforward", "encoder_intermediate_size",
                 "decoder_intermediate_size", "d_inner", "dim_ff"}
_MOE_INTERMEDIATE = {"moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "expert_intermediate_size", "moe_ffn_hidden_size"}
_LAYERS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
           "num_decoder_layers", "num_encoder_layers", "depth", "encoder_num_hidden_layers",
           "decoder_num_hidden_layers"}
_HEADS = {"num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
          "num_heads", "attention_heads", "encoder_num_attention_heads", "decoder_num_attention_heads"}
_KV_HEADS = {"num_key_value_heads", "num_kv_heads", "kv_n_heads", "multi_query_group_num", "n_kv_heads",
             "encoder_num_key_value_heads", "decoder_num_key_value_heads"}
_HEAD_DIM = {"head_dim", "d_kv", "attention_head_dim", "kv_channels", "v_head_dim", "qk_nope_head_dim",
             "linear_key_head_dim", "linear_value_head_dim", "mamba_d_head", "dim_head"}
_EXPERTS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_TOP_K = {"num_experts_per_tok", "moe_top_k", "num_selected_experts", "top_k"}
#: other sizes, to at most this value
_CAPS = {"vocab_size": SWEEP_VOCAB, "max_position_embeddings": 512, "n_positions": 512, "max_seq_len": 512,
         "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1, "kv_lora_rank": 32,
         "q_lora_rank": 32, "qk_rope_head_dim": 8, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
         "mamba_n_heads": 8, "mamba_d_state": 8, "state_size": 8, "mamba_dt_rank": 8, "time_step_rank": 8,
         "mamba_expand": 2, "expand": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
         "expert_layer_offset": 1, "num_mel_bins": 16, "max_source_positions": 32, "max_target_positions": 64,
         "num_labels": 4, "rotary_dim": 8, "num_codebooks": 2, "max_window_layers": 1, "first_k_dense_replace": 1,
         "decoder_sparse_step": 1, "num_groups": 1, "mamba_n_groups": 1, "n_groups": 1}


#: config entries a family needs beyond the shrinking (merged into the shrunk config, sub-dicts key by key)
SWEEP_OVERRIDES: dict[str, dict[str, Any]] = {
    # transformers' DBRX reads `attn_config.rope_theta` and clamps by `clip_qkv` (None fails)
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
}


def _merge(config: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = _merge(dict(config[key]), value)
        else:
            config[key] = value
    return config


class SweepSkip(Exception):
    """The sweep cannot build or run a family's tiny model (a harness limit, not a pruner outcome)."""


@dataclass(frozen=True)
class SweepCase:
    """One family of the sweep: its `model_type`, the task mapping its class came from, and the class name."""

    model_type: str
    task: str
    class_name: str


def sweep_cases(model_types: Optional[list[str]] = None) -> list[SweepCase]:
    """A case per `model_type` of transformers' `CONFIG_MAPPING_NAMES` that one of `SWEEP_MAPPINGS` lists (the
    first mapping listing it gives its class), in `model_type` order; `model_types` restricts the list."""
    from transformers.models.auto import configuration_auto, modeling_auto

    cases = []
    for model_type in sorted(model_types or configuration_auto.CONFIG_MAPPING_NAMES):
        for task, mapping in SWEEP_MAPPINGS:
            name = getattr(modeling_auto, mapping).get(model_type)
            if name:
                cases.append(SweepCase(model_type, task, name if isinstance(name, str) else name[0]))
                break
    return cases


def _shrink_value(key: str, value: Any) -> Any:
    """The tiny value of one config entry (unchanged when no rule applies)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    rules = ((_HIDDEN, 64), (_INTERMEDIATE, 64), (_MOE_INTERMEDIATE, 32), (_LAYERS, 2), (_HEADS, 4), (_HEAD_DIM, 16),
             (_EXPERTS, 4), (_TOP_K, 2))
    for names, size in rules:
        if key in names:
            return min(value, size) if value > 0 else value
    if key in _KV_HEADS:
        return min(value, 2) if value > 0 else value
    if key.endswith(("intermediate_size", "_lora_rank")):  # the other sizes of this kind (dense-first layers)
        return min(value, 64) if value > 0 else value
    if key in _CAPS:
        return min(value, _CAPS[key]) if value > 0 else value
    return value


def _layer_selection(types: list, count: int) -> list[int]:
    """Indices of `count` or more layers covering every distinct entry of a per-layer list (first occurrences)."""
    keys = [str(t) for t in types]
    chosen = sorted({keys.index(k) for k in keys})
    extra = [i for i in range(len(types)) if i not in chosen]
    return sorted(chosen + extra[:max(0, count - len(chosen))])


def _shrink_layers(config: dict) -> None:
    """Cut per-layer lists (`layer_types`, ...) to the layers kept, and layer-index lists to those layers."""
    old = next((config[k] for k in _LAYERS if isinstance(config.get(k), int)), None)
    types = config.get("layer_types") or config.get("layers_block_type")
    if not isinstance(old, int) or not isinstance(types, list) or len(types) != old:
        return
    keep = _layer_selection(types, 2)
    for key in _LAYERS:
        if isinstance(config.get(key), int) and config[key] == old:
            config[key] = len(keep)
    for key, value in list(config.items()):
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # keyed by layer index
            config[key] = {str(keep.index(int(k))): v for k, v in value.items() if int(k) in keep}
        elif isinstance(value, list) and len(value) == old:
            config[key] = [value[i] for i in keep]
        elif (isinstance(value, list) and key.endswith("layers") and value
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            config[key] = [keep.index(v) for v in value if v in keep]


def _shrink_dict(config: dict) -> dict:
    """Every size rule applied to a config dict and, recursively, to its sub-config dicts."""
    for key in ("out_features", "out_indices"):  # a backbone's output stages follow its (shrunk) depth
        config.pop(key, None)
    old_layers = {k: config[k] for k in _LAYERS if isinstance(config.get(k), int)}
    _shrink_layers(config)
    for key, value in list(config.items()):
        if isinstance(value, dict) and (key.endswith("config") or "model_type" in value or key in (
                "encoder", "decoder")):
            config[key] = _shrink_dict(dict(value))
        elif key in ("depths", "layers_per_stage") and isinstance(value, list):
            config[key] = [min(v, 1) for v in value]
        elif key in ("hidden_sizes", "embed_dims", "dims") and isinstance(value, list):
            config[key] = [16 * 2**i for i in range(len(value))]
        elif key in _HEADS and isinstance(value, list):
            config[key] = [2**i for i in range(len(value))]
        elif key not in old_layers or config[key] == old_layers[key]:
            config[key] = _shrink_value(key, value)
    if isinstance(config.get("qk_rope_head_dim"), int):  # multi-head latent attention: RoPE on the rope part only
        config["head_dim"] = config["qk_rope_head_dim"]
        if isinstance(config.get("qk_nope_head_dim"), int):
            config["qk_head_dim"] = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    patch = config.get("patch_size")
    if isinstance(config.get("image_size"), int) and isinstance(patch, int) and patch > 0:
        config["image_size"] = min(config["image_size"], max(32, 4 * patch))
    vocab = config.get("vocab_size")
    if isinstance(vocab, int):
        special = sorted({v for k, v in config.items() if (k.endswith("token_id") or k.endswith("token_index"))
                          and isinstance(v, int) and not isinstance(v, bool) and v >= SWEEP_TOKENS})
        remap = {v: SWEEP_TOKENS + i for i, v in enumerate(special) if SWEEP_TOKENS + i < vocab}
        for k, v in list(config.items()):
            if (k.endswith("token_id") or k.endswith("token_index")) and isinstance(v, int) and v in remap:
                config[k] = remap[v]
    return config


def tiny_config(model_type: str) -> Any:
    """The default config of `model_type` with every size shrunk (see `_shrink_dict`); raises `SweepSkip`."""
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type)
        shrunk = _merge(_shrink_dict(default.to_dict()), SWEEP_OVERRIDES.get(model_type, {}))
    except Exception as err:  # noqa: BLE001 - any failure means the family needs more than a config
        raise SweepSkip(f"no default config: {_one_line(err)}") from None
    shrunk.pop("transformers_version", None)
    try:
        return type(default).from_dict(shrunk)
    except Exception as err:  # noqa: BLE001
        raise SweepSkip(f"shrunk config rejected: {_one_line(err)}") from None


def build_case(case: SweepCase, seed: int = 0) -> nn.Module:
    """A tiny random model of the case's class, in eval mode; raises `SweepSkip`."""
    import transformers

    config = tiny_config(case.model_type)
    cls = getattr(transformers, case.class_name, None)
    if cls is None:
        raise SweepSkip(f"transformers has no class {case.class_name}")
    try:
        with torch.device("meta"):  # the size first, without allocating or initialising anything
            size = sum(p.numel() for p in cls._from_config(config).parameters())
        if size > SWEEP_MAX_PARAMETERS:
            raise SweepSkip(f"tiny config still has {size / 1e6:.1f}M parameters")
        torch.manual_seed(seed)
        model = cls._from_config(config)
    except SweepSkip:
        raise
    except Exception as err:  # noqa: BLE001
        raise SweepSkip(f"cannot build from the tiny config: {_one_line(err)}") from None
    return model.eval()


def _main_input(model: nn.Module, name: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch of the input `name` (token ids, pixels, audio features or a waveform) sized from the config."""
    config = model.config
    if name == "input_ids":
        return {"input_ids": torch.randint(3, SWEEP_TOKENS, (2, SWEEP_SEQ), generator=g)}
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, getattr(vision, "num_channels", 3), size, size, generator=g)}
    if name == "input_features":
        audio = getattr(config, "encoder_config", None) or getattr(config, "audio_config", None) or config
        bins = getattr(audio, "num_mel_bins", None) or getattr(audio, "feature_size", 16)
        frames = 2 * (getattr(audio, "max_source_positions", None) or SWEEP_SEQ)
        return {"input_features": torch.randn(2, bins, frames, generator=g)}
    if name == "input_values":  # a raw waveform: 3200 samples are 10 frames of wav2vec2's 320x downsampling
        return {"input_values": torch.randn(2, 3200, generator=g)}
    raise SweepSkip(f"reads `{name}`: the sweep makes token ids, pixels, audio features and waveforms only")


def calibration_batches(model: nn.Module, num: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Calibration batches of the kind the model's forward reads, the first kind its dense forward runs on: its
    main input (token ids, pixels or audio features; decoder ids too for an encoder-decoder), then token ids
    with pixels (a dual encoder). Raises `SweepSkip` when none runs."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    kinds = [(main,)] + [("input_ids", "pixel_values")] * (
        "input_ids" in parameters and "pixel_values" in parameters)
    failure = None
    for kind in kinds:
        g = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(num):
            batch = {}
            for name in kind:
                batch.update(_main_input(model, name, g))
            if "decoder_input_ids" in parameters and getattr(model.config, "is_encoder_decoder", False):
                batch["decoder_input_ids"] = torch.randint(3, SWEEP_TOKENS, (2, SWEEP_SEQ // 2), generator=g)
            batches.append(batch)
        try:
            with torch.no_grad():
                model(**batches[0])
        except Exception as err:  # noqa: BLE001 - the next kind of input may run
            failure = failure or err
            continue
        return batches
    raise SweepSkip(f"the dense model does not run on the sweep's batch: {_one_line(failure)}")


def block_stacks(model: nn.Module, adapter_blocks: Optional[nn.ModuleList] = None) -> dict[str, nn.ModuleList]:
    """Every block stack of the model: each outermost `nn.ModuleList` of same-class blocks holding a prunable
    layer (an encoder-decoder has two, a vision-language model a vision tower and a text stack), plus the list
    the adapter prunes (a hybrid's mixed-class layers)."""
    from ..architectures import PRUNABLE_TYPES

    stacks: dict[str, nn.ModuleList] = {}
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        is_stack = module is adapter_blocks or (
            len({type(c) for c in children}) == 1
            and not isinstance(children[0], PRUNABLE_TYPES)
            and all(any(isinstance(m, PRUNABLE_TYPES) for m in c.modules()) for c in children))
        if is_stack:
            stacks[name] = module
            inside |= {id(m) for m in module.modules()}
    return stacks


def other_matrices(stacks: dict[str, nn.ModuleList], matrices: dict[str, torch.Tensor]) -> list[str]:
    """Matrix parameters inside the stacks that are neither a Linear's weight nor a recognised expert matrix
    (e.g. experts stored as 2D parameters), convolutions and embeddings aside: what the pruner leaves dense
    without a word."""
    pruned = {id(w) for w in matrices.values()}
    found = []
    for prefix, stack in stacks.items():
        for name, module in stack.named_modules():
            if isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)):
                continue
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() >= 2 and id(param) not in pruned:
                    found.append(f"{prefix}.{name}.{param_name}" if name else f"{prefix}.{param_name}")
    return found


def stack_matrices(stacks: dict[str, nn.ModuleList]) -> dict[str, torch.Tensor]:
    """Every Linear (Conv1D) weight and every fused-expert matrix inside the stacks, by name."""
    from ..architectures import PRUNABLE_TYPES
    from ..architectures.experts import expert_parameters

    found = {}
    for prefix, stack in stacks.items():
        for name, module in stack.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if isinstance(module, PRUNABLE_TYPES):
                found[full] = module.weight
            for param in expert_parameters(module):
                found[f"{full}.{param}"] = getattr(module, param)
    return found


@dataclass
class SweepOutcome:
    """What one prune of one family did.

    `status`: "passes" (every stack matrix at the target), "refuses" (a `D2PruneError` naming a remedy before
    any weight changed: the property holds), "wrong" (it finished, but matrices are not at the target), "crash"
    (any other exception, or a refusal after weights changed or without a remedy), "skipped" (the harness could
    not build or run the family: `detail` says why).
    """

    case: SweepCase
    method: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    stacks: dict[str, int] = field(default_factory=dict)  # stack path -> matrices in it

    @property
    def holds(self) -> bool:
        return self.status in ("passes", "refuses")


#: words by which a refusal's message names what to do
REMEDY = re.compile(r"\b(use|pass|set|give|choose|prune with|register|install|add|call|remove|convert|load|"
                    r"run|provide|wrap|select)\b", re.I)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}"


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise `TimeoutError` after `seconds` (main thread only; no limit elsewhere)."""
    def stop(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    try:
        previous = signal.signal(signal.SIGALRM, stop)
    except ValueError:  # not the main thread
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _at_target(weight: torch.Tensor, sparsity: float, before: float) -> bool:
    zeros = int((weight == 0).sum())
    return before > sparsity or abs(zeros - weight.numel() * sparsity) <= 1


def check_family(case: SweepCase, method: str = "d2prune", sparsity: float = 0.5,
                 time_limit: int = 300) -> SweepOutcome:
    """Build the case's tiny model, prune it with `method` at `sparsity`, and classify what happened."""
    from .. import D2PruneConfig, D2Pruner
    from ..architectures import get_adapter
    from ..errors import D2PruneError

    start = time.perf_counter()
    outcome = SweepOutcome(case, method, "skipped")
    try:
        with _time_limit(time_limit):
            model = build_case(case)
            batches = calibration_batches(model)
            try:
                adapter_blocks = get_adapter(model).blocks(model)
            except Exception:  # noqa: BLE001 - the pruner reports it below
                adapter_blocks = None
            stacks = block_stacks(model, adapter_blocks)
            matrices = stack_matrices(stacks)
            outcome.stacks = {name: sum(1 for m in matrices if m.startswith(name + ".")) for name in stacks}
            if not matrices:
                raise SweepSkip("no block stack with a Linear layer")
            before = {name: float((w == 0).float().mean()) for name, w in matrices.items()}
            snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
            try:
                D2Pruner(D2PruneConfig(sparsity=sparsity, method=method)).prune(model, batches)
            except TimeoutError:
                raise
            except Exception as err:  # noqa: BLE001
                touched = [n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])]
                if isinstance(err, D2PruneError) and not touched and REMEDY.search(str(err)):
                    outcome.status, outcome.detail = "refuses", _one_line(err)
                else:
                    why = "after changing weights: " if touched else ""
                    why += "" if isinstance(err, D2PruneError) else "not a D2PruneError: "
                    outcome.status, outcome.detail = "crash", why + _one_line(err)
                return outcome
            missed = [n for n, w in matrices.items() if not _at_target(w, sparsity, before[n])]
            dense = other_matrices(stacks, matrices)
            if not missed:
                outcome.status = "passes"
                if dense:
                    outcome.detail = f"note: {len(dense)} other matrices stay dense ({', '.join(dense[:3])}...)"
            else:
                outcome.status = "wrong"
                by_stack = {s: [n for n in missed if n.startswith(s + ".")] for s in stacks}
                outcome.detail = (f"{len(matrices) - len(missed)} of {len(matrices)} block matrices at "
                                  f"{sparsity:.0%}; not: " + ", ".join(
                                      f"{s} ({len(ms)} of {outcome.stacks[s]})" for s, ms in by_stack.items() if ms))
    except SweepSkip as err:
        outcome.status, outcome.detail = "skipped", str(err)
    except TimeoutError as err:
        outcome.status, outcome.detail = "crash", f"TimeoutError: {err}"
    finally:
        outcome.seconds = time.perf_counter() - start
    return outcome


def outcome_counts(outcomes: list[SweepOutcome]) -> str:
    """A markdown table: how many families got each combination of statuses (one column per method)."""
    methods = list(dict.fromkeys(o.method for o in outcomes))
    statuses: dict[tuple[str, str], dict[str, str]] = {}
    for o in outcomes:
        statuses.setdefault((o.case.model_type, o.case.class_name), {})[o.method] = o.status
    counts = Counter(tuple(by_method.get(m, "") for m in methods) for by_method in statuses.values())
    lines = ["| " + " | ".join(methods) + " | families |", "|" + "---|" * (len(methods) + 1)]
    lines += [f"| {' | '.join(combination)} | {n} |" for combination, n in counts.most_common()]
    return "\n".join(lines)


def outcome_table(outcomes: list[SweepOutcome]) -> str:
    """A markdown table: family -> class -> one column per method."""
    methods = list(dict.fromkeys(o.method for o in outcomes))
    rows: dict[tuple[str, str], dict[str, SweepOutcome]] = {}
    for o in outcomes:
        rows.setdefault((o.case.model_type, o.case.class_name), {})[o.method] = o
    lines = ["| family | class | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (model_type, cls), by_method in rows.items():
        cells = []
        for m in methods:
            o = by_method.get(m)
            cells.append("" if o is None else f"{o.status}" + (f": {o.detail}" if o.detail else ""))
        lines.append(f"| {model_type} | {cls} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Prune a tiny random model of every transformers family and "
                                                 "print which keep the property (see the module docstring).")
    parser.add_argument("model_types", nargs="*", help="model types to run (default: all)")
    parser.add_argument("--methods", default="d2prune,sparsegpt")
    parser.add_argument("--time-limit", type=int, default=300, help="seconds per family and method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("transformers", "optimum_d2prune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")  # one line per family, not per block
    outcomes = []
    for case in sweep_cases(args.model_types or None):
        for method in args.methods.split(","):
            outcome = check_family(case, method, time_limit=args.time_limit)
            outcomes.append(outcome)
            logger.info("%s\t%s\t%s\t%s\t%.1fs\t%s", case.model_type, case.class_name, method, outcome.status,
                        outcome.seconds, outcome.detail)
    print(f"{outcome_counts(outcomes)}\n\n{outcome_table(outcomes)}")


if __name__ == "__main__":
    main()
