"""The family sweep: a tiny random model of a transformers family is either pruned to the target sparsity on every
matrix of every block stack, or refused before any weight changes with a `D2PruneError` that names a remedy.

CI runs `SAMPLE` (chosen to cover every q/k/v layout and block kind the generic path reads); set
`D2PRUNE_FULL_SWEEP=1` to run every family of transformers' auto mappings (`sweep_cases()`; families the sweep
cannot build are skipped with the reason). `python -m optimum_d2prune.testing.families` prints the same as a table.
"""

from __future__ import annotations

import os

import pytest
import torch

from optimum_d2prune.testing.families import (
    SweepCase,
    block_stacks,
    check_family,
    other_matrices,
    stack_matrices,
    sweep_cases,
)

FULL = os.environ.get("D2PRUNE_FULL_SWEEP", "") not in ("", "0")

#: model_type -> what it covers
SAMPLE = {
    "llama": "separate q_proj/k_proj/v_proj, GQA, RoPE",
    "gpt2": "Conv1D (transposed weights), fused c_attn [q; k; v]",
    "codegen": "fused qkv_proj in model-parallel partitions of [q; v; k]",
    "gpt_bigcode": "multi-query attention in a fused c_attn",
    "falcon": "fused query_key_value per key/value head (new decoder architecture)",
    "bloom": "fused query_key_value per head, ALiBi, additive mask, no SDPA",
    "mpt": "fused Wqkv, boolean mask marking the masked entries",
    "ctrl": "separate Wq/Wk/Wv",
    "dbrx": "fused Wqkv with GQA, clipped qkv",
    "ergo": "fused qkv_proj [q; k; v] with GQA and q/k norms",
    "gpt_neox_japanese": "fused query_key_value per head, no SDPA",
    "openai-gpt": "GPT-1: Conv1D c_attn, no SDPA",
    "imagegpt": "Conv1D c_attn, image classifier over token ids",
    "persimmon": "fused query_key_value per head, q/k layer norms",
    "qwen3_moe": "fused 3D experts",
    "qwen3_next": "hybrid: gated delta net blocks without softmax attention, gated attention",
    "olmo_hybrid": "hybrid: linear attention with separate q_proj/k_proj/v_proj",
    "minimax": "hybrid: lightning attention with a fused qkv_proj",
    "vit": "image classifier, bidirectional attention",
    "wav2vec2": "raw audio `input_values`, convolutional feature encoder before the blocks",
}


def _cases():
    cases = sweep_cases(None if FULL else sorted(SAMPLE))
    assert FULL or {c.model_type for c in cases} == set(SAMPLE)
    return cases


@pytest.mark.parametrize("method", ["d2prune", "sparsegpt"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.model_type)
def test_family_is_pruned_to_the_target_or_refused_with_a_remedy(case: SweepCase, method):
    outcome = check_family(case, method)
    if outcome.status == "skipped":
        if not FULL:
            pytest.fail(f"a sample family must build: {outcome.detail}")
        pytest.skip(outcome.detail)
    assert outcome.holds, f"{case.model_type} ({case.class_name}), {method}: {outcome.status}: {outcome.detail}"
    if not FULL:
        assert outcome.status == "passes" and sum(outcome.stacks.values()) >= 4  # two blocks of two or more


def _t5():
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return transformers.T5ForConditionalGeneration(config)


def _llava():
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=4)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(vision_config=vision,
                                                                               text_config=text))


def _dbrx():
    from optimum_d2prune.testing.families import make_family

    return make_family("dbrx")


@pytest.mark.parametrize("build, stacks, matrices, dense", [
    (_t5, {"encoder.block": 2 * 6, "decoder.block": 2 * 10}, 32, 0),  # q, k, v, o, wi, wo (+ cross q, k, v, o)
    (_llava, {"model.vision_tower.encoder.layers": 2 * 6, "model.language_model.layers": 3 * 7},
     33, 0),
    (_dbrx, {"transformer.blocks": 2 * 3}, 6, 2 * 3),  # Wqkv, out_proj, router; 2D experts w1/v1/w2 left over
], ids=["t5", "llava", "dbrx"])
def test_block_stacks_are_every_outermost_list_of_blocks(build, stacks, matrices, dense):
    """The property's reach: an encoder-decoder has two stacks, a vision-language model a vision tower and a text
    stack; matrices are counted once (nested lists, e.g. experts, belong to their block)."""
    torch.manual_seed(0)
    model = build()
    found = block_stacks(model)
    weights = stack_matrices(found)
    assert {name: sum(1 for w in weights if w.startswith(name + ".")) for name in found} == stacks
    assert len(weights) == matrices
    assert len(other_matrices(found, weights)) == dense


def test_outcome_counts_count_families_per_status_combination():
    from optimum_d2prune.testing.families import SweepOutcome, outcome_counts

    cases = [SweepCase(name, "causal-lm", name.title()) for name in ("a", "b", "c")]
    statuses = {"a": ("passes", "passes"), "b": ("refuses", "passes"), "c": ("passes", "passes")}
    outcomes = [SweepOutcome(case, method, status) for case in cases
                for method, status in zip(("d2prune", "sparsegpt"), statuses[case.model_type])]
    assert outcome_counts(outcomes).splitlines() == [
        "| d2prune | sparsegpt | families |", "|---|---|---|", "| passes | passes | 2 |", "| refuses | passes | 1 |"]
