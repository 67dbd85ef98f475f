"""Integration on the real SmolLM2-135M-Instruct (LLaMA, GQA 9/3) with the shared C4 and WikiText-2 data."""

from __future__ import annotations

import math

import pytest

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.data import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity


@pytest.mark.slow
def test_d2prune_beats_sparsegpt_at_half_sparsity(smollm2, shared_data):
    model, tokenizer, dense_state = smollm2
    calib = get_calibration_dataset(shared_data / "c4_train_sample.jsonl", tokenizer, num_samples=16, seq_len=512)

    def ppl():
        return perplexity(model, tokenizer, shared_data / "wikitext2_test.txt", seq_len=512, max_windows=16)

    results = {}
    for method in ("sparsegpt", "d2prune"):
        model.load_state_dict(dense_state)
        pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method=method))
        pruner.prune(model, calib)
        assert pruner.report.total_sparsity == pytest.approx(0.5, abs=1e-6)
        results[method] = ppl()
    model.load_state_dict(dense_state)
    dense = ppl()
    assert all(math.isfinite(v) for v in results.values())
    assert dense < results["d2prune"] < results["sparsegpt"], (dense, results)
