"""Hybrid models: blocks without softmax attention (Mamba mixers, gated-delta-rule and lightning linear attention)
report no attention, so the engine can prune them with every projection updated instead of warning per block."""

from __future__ import annotations

import pytest

from optimum_d2prune.architectures import GenericAdapter
from optimum_d2prune.testing.families import build_case, sweep_cases

#: model_type -> what its attention-free blocks hold
HYBRIDS = {
    "jamba": "Mamba mixers",
    "qwen3_next": "gated delta net (linear attention with in_proj_qkvz)",
    "minimax": "lightning attention (a fused qkv_proj, no softmax)",
    "nemotron_h": "Mamba-2 mixers, MoE and MLP-only blocks",
    "olmo_hybrid": "gated delta net with separate q_proj/k_proj/v_proj",
}
SOFTMAX_TYPES = {"full_attention", "sliding_attention", "attention"}


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_attention_free_blocks_have_no_attention(model_type):
    model = build_case(sweep_cases([model_type])[0])
    adapter = GenericAdapter()
    adapter.validate(model)
    blocks = adapter.blocks(model)
    expected = [t in SOFTMAX_TYPES for t in model.config.layer_types]
    assert len(expected) == len(blocks) and True in expected and False in expected
    assert [adapter.has_attention(block) for block in blocks] == expected
    for block, attention in zip(blocks, expected):
        groups = adapter.attention_groups(block)
        assert len(groups) == int(attention)
        if attention:
            assert set(groups[0][1]) == {"q", "k", "v"}
