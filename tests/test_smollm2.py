"""Integration on the real SmolLM2-135M-Instruct (LLaMA, GQA 9/3): with nothing beside the clone (text sampled from
the model itself), and with the benchmark data when $D2PRUNE_DATA_DIR names it."""

from __future__ import annotations

import math

import pytest

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.calibration import get_calibration_dataset, held_out_seed, self_generated_calibration
from optimum_d2prune.evaluation import perplexity


def _compare(model, dense_state, calib, ppl) -> dict[str, float]:
    """Perplexity of the dense model, SparseGPT and D²Prune (50 %) on the same calibration samples."""
    results = {}
    for method in ("sparsegpt", "d2prune"):
        model.load_state_dict(dense_state)
        pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method=method))
        pruner.prune(model, calib)
        assert pruner.report.total_sparsity == pytest.approx(0.5, abs=1e-6)
        results[method] = ppl()
    model.load_state_dict(dense_state)
    results["dense"] = ppl()
    assert all(math.isfinite(v) for v in results.values())
    return results


@pytest.mark.slow
def test_d2prune_beats_sparsegpt_without_any_data(smollm2):
    model, tokenizer, dense_state = smollm2
    calib = self_generated_calibration(model, tokenizer, num_samples=16, seq_len=256, seed=0)
    held_out = self_generated_calibration(model, tokenizer, num_samples=8, seq_len=256, seed=held_out_seed(0))
    results = _compare(model, dense_state, calib, lambda: perplexity(model, tokenizer, held_out))
    assert results["dense"] < results["d2prune"] < results["sparsegpt"], results


@pytest.mark.slow
def test_d2prune_beats_sparsegpt_at_half_sparsity_on_c4(smollm2, shared_data):
    model, tokenizer, dense_state = smollm2
    calib = get_calibration_dataset(shared_data / "c4_train_sample.jsonl", tokenizer, num_samples=16, seq_len=512)

    def ppl():
        return perplexity(model, tokenizer, shared_data / "wikitext2_test.txt", seq_len=512, max_windows=16)

    results = _compare(model, dense_state, calib, ppl)
    assert results["dense"] < results["d2prune"] < results["sparsegpt"], results
