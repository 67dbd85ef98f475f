"""Hybrid models (softmax attention in some blocks, state-space or linear attention in others): the blocks without
attention are said once, pruned with every projection updated, and never warned about."""

from __future__ import annotations

import logging

import pytest
from tinymodels import calib_batches

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.testing.families import make_family


@pytest.mark.parametrize("name", ["qwen3-next", "olmo-hybrid", "minimax"])
def test_blocks_without_attention_are_said_once(name, caplog):
    model = make_family(name).eval()
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": "dynamic", "strategy": "layer"}))
    with caplog.at_level(logging.INFO, logger="optimum_d2prune"):
        pruner.prune(model, calib_batches())
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "partly targeted" in m], messages
    said = [m for m in messages if "no softmax attention" in m]
    assert len(said) == 1 and said[0].startswith("Blocks 0 "), said
    with_attention = {a.block for a in pruner.report.attention}
    assert 0 not in with_attention and with_attention
    assert all(r.updated for r in pruner.report.layers if r.block == 0)
