"""Issue 11: memory bounded by construction, and the memory model that the CLI checks before a run.

The counters here are `LiveTensorBytes` (bytes of live tensors created by torch operations), not timings.
"""

from __future__ import annotations

import pytest
import torch

from conftest import calib_batches, make_tiny
from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune import attention as attention_module
from optimum_d2prune.architectures import AttentionInputs, get_adapter
from optimum_d2prune.memory import MemoryBudgetError, check_fits, estimate
from optimum_d2prune.solvers import inverse_hessian_cholesky
from optimum_d2prune.solvers.base import SolverOutput
from optimum_d2prune.statistics import InputStatistics, LinearStatistics
from optimum_d2prune.testing.families import make_family
from optimum_d2prune.testing.memory_counter import LiveTensorBytes


def _capture_block(model, index: int, ids, mask=None):
    adapter = get_adapter(model, generic=model.config.model_type not in ("llama", "qwen3", "opt"))
    block = adapter.blocks(model)[index]
    attention, refs = adapter.attention_groups(block)[0]
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("inputs", AttentionInputs(args, dict(kwargs), mask))

    handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    handle.remove()
    return adapter, block, attention, refs, seen["inputs"]


def _outputs(block, refs, scale: float):
    """Stand-in solver outputs: the dense q/k/v rows, zeroed at random (updated) or by magnitude (non-updated)."""
    from optimum_d2prune.architectures.base import read_rows

    g = torch.Generator().manual_seed(0)
    out = {}
    for p, ref in refs.items():
        w = read_rows(block.get_submodule(ref.module), ref.rows).detach().float()
        keep = torch.rand(w.shape, generator=g) > scale
        out[p] = SolverOutput(w * keep, ~keep, 0.0)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_kl_in_head_chunks_equals_all_heads(family):
    """One group of heads at a time (the bounded path) gives the KL of all heads at once, per candidate."""
    model = make_tiny("llama") if family == "llama" else make_family(family, attn_implementation="eager")
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    adapter, block, attention, refs, inputs = _capture_block(model, 1, ids, mask)
    dense = {p: _outputs(block, refs, 0.0)[p].weight for p in ("q", "k")}
    updated, non_updated = _outputs(block, refs, 0.3), _outputs(block, refs, 0.6)
    with torch.no_grad():
        whole = attention_module.choose_unupdated_projection(adapter, attention, [inputs], dense, updated,
                                                             non_updated, 1.0, 1, chunk_bytes=1 << 40)
        chunked = attention_module.choose_unupdated_projection(adapter, attention, [inputs], dense, updated,
                                                               non_updated, 1.0, 1, chunk_bytes=1)
    assert all(whole.kls[c] > 0 for c in "qkv")
    for c in "qkv":
        assert chunked.kls[c] == pytest.approx(whole.kls[c], rel=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "bool4d", "float4d", "window"])
def test_query_rows_are_the_same_rows_of_the_full_attention(mask_kind):
    """The KL term on a subset of query positions sees exactly those rows of the full masked attention."""
    from optimum_d2prune.architectures.base import query_key_scores

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :3] = False
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    mask = {"none": None, "padding": padding, "window": None,
            "bool4d": causal[None, None] & padding[:, None, None, :],
            "float4d": torch.zeros(2, 1, 12, 12).masked_fill(~(causal[None, None] & padding[:, None, None, :]),
                                                              torch.finfo(torch.float32).min)}[mask_kind]
    scores = query_key_scores(q, k, 0.3, mask, causal=True, sliding_window=5 if mask_kind == "window" else None)
    rows = attention_module.query_rows(12, 5)
    assert rows.tolist() == [0, 3, 6, 8, 11]
    for heads in scores.chunks(2):
        full = scores.log_probabilities(heads)
        assert torch.equal(scores.log_probabilities(heads, rows), full[:, :, rows])


def test_kl_on_query_rows_is_the_mean_over_those_rows():
    model = make_tiny("llama")
    ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(1))
    adapter, block, attention, refs, inputs = _capture_block(model, 1, ids)
    dense = {p: _outputs(block, refs, 0.0)[p].weight for p in ("q", "k")}
    updated, non_updated = _outputs(block, refs, 0.3), _outputs(block, refs, 0.6)
    rows = attention_module.query_rows(16, 6)
    with torch.no_grad():
        sampled = attention_module.choose_unupdated_projection(adapter, attention, [inputs], dense, updated,
                                                               non_updated, 1.0, 1, max_query_rows=6)
        for c in "qkv":
            candidate = adapter.attention_scores(attention, inputs,
                                                 attention_module.candidate_weights(c, updated, non_updated))
            reference = adapter.attention_scores(attention, inputs, dense)
            every_head = slice(0, reference.num_heads)
            p = candidate.probs(every_head)[:, :, rows]
            log_q = reference.probs(every_head)[:, :, rows].clamp_min(1e-12).log()
            expected = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()
            assert sampled.kls[c] == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


_CHOOSE = attention_module.choose_unupdated_projection


def _kl_phase_peaks(monkeypatch, batch: int, kl_num_samples: int = 2) -> tuple[list[int], list[int]]:
    """Peak live bytes of the q/k/v choice and bytes of the captured attention inputs, per block."""
    peaks, captured = [], []
    original = _CHOOSE

    def measured(adapter, attention, inputs, *args, **kwargs):
        captured.append(sum(t.numel() * t.element_size() for one in inputs
                            for t in attention_module._tensors((one.args, one.kwargs))))
        with LiveTensorBytes() as counter:
            record = original(adapter, attention, inputs, *args, **kwargs)
        peaks.append(counter.peak)
        return record

    monkeypatch.setattr(attention_module, "choose_unupdated_projection", measured)
    ids = torch.cat(calib_batches(num=4, batch=2, length=32))  # the same 8 sequences, batched differently
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    D2Pruner(D2PruneConfig(kl_num_samples=kl_num_samples)).prune(make_tiny("llama"), batches)
    return peaks, captured


def test_kl_memory_does_not_grow_with_the_loader_batch(monkeypatch):
    peaks_1, captured_1 = _kl_phase_peaks(monkeypatch, batch=1)
    peaks_8, captured_8 = _kl_phase_peaks(monkeypatch, batch=8)
    assert len(peaks_1) == len(peaks_8) == 2  # one choice per block
    assert captured_8 == captured_1  # exactly kl_num_samples sequences kept, whatever the batch
    for a, b in zip(peaks_1, peaks_8):
        assert b <= a * 1.05
    more_peaks, more_captured = _kl_phase_peaks(monkeypatch, batch=8, kl_num_samples=4)
    assert more_captured[0] == 2 * captured_1[0]  # the counter does see what kl_num_samples keeps


def test_factorisation_adds_one_matrix():
    """The sum becomes the damped H in place; the factor is the only `cols²` matrix kept (the old code kept three
    and peaked at five), with one transient matrix inside the inversion."""
    cols = 256
    x = torch.randn(4096, cols)
    inputs = InputStatistics(cols, "hessian", torch.device("cpu"))
    inputs.add(x)
    stats = LinearStatistics(inputs, 64, y_sq=torch.ones(8))
    gram = x.t() @ x
    with LiveTensorBytes() as counter:
        upper, dead = inverse_hessian_cholesky(stats, 0.01)
    matrix = cols * cols * 4
    assert matrix <= counter.peak < 2.5 * matrix
    assert matrix <= counter.live < 1.1 * matrix
    assert upper.shape == (cols, cols) and not dead.any()
    probe = torch.randn(3, cols)
    torch.testing.assert_close(inputs.gram_matmul(probe), probe @ gram, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(inputs.x_sq_mean(), gram.diagonal() / 4096, rtol=1e-4, atol=1e-6)
    hinv = upper.t() @ upper  # the factor is still the one of the damped H
    damped = inputs.damped_matmul(torch.eye(cols))
    torch.testing.assert_close(hinv @ damped, torch.eye(cols), rtol=0, atol=1e-3)


def test_offloaded_activations_give_the_same_model():
    a, b = make_tiny("llama"), make_tiny("llama")
    D2Pruner(D2PruneConfig()).prune(a, calib_batches())
    D2Pruner(D2PruneConfig(offload_activations=True)).prune(b, calib_batches())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def _llama_7b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
                       vocab_size=32000)


def test_estimate_scales_with_what_the_engine_keeps():
    config = _llama_7b()
    base = estimate(config, D2PruneConfig(), 128, 2048, "cuda")
    assert base.resident > 0  # the model is not on the device yet: one block and the embeddings move there
    assert base.components["activations"] == 128 * 2048 * 4096 * 4
    offloaded = estimate(config, D2PruneConfig(offload_activations=True), 128, 2048, "cuda")
    assert offloaded.peak < base.peak - 3 * 2**30
    every_row = estimate(config, D2PruneConfig(kl_query_rows=None), 128, 2048, "cuda")
    assert base.components["KL chunk"] < every_row.components["KL chunk"]  # 64 of 2048 query rows
    small_chunk = estimate(config, D2PruneConfig(kl_query_rows=None, kl_chunk_mib=16), 128, 2048, "cuda")
    assert small_chunk.components["KL chunk"] < every_row.components["KL chunk"]
    sparsegpt = estimate(config, D2PruneConfig(method="sparsegpt"), 128, 2048, "cuda")
    assert "attention choice" not in sparsegpt.phases and sparsegpt.components["KL chunk"] == 0


def test_too_large_job_is_refused_with_the_estimate_and_suggestions(monkeypatch):
    import optimum_d2prune.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 30 * 2**30)
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(_llama_7b(), D2PruneConfig(), 128, 2048, "cuda:0", model_bytes=27 * 2**30)
    message = str(err.value)
    assert "GiB are free" in message and "--offload-activations" in message and "--num-samples" in message
    assert "| statistics |" in message  # the per-phase table
    check_fits(_llama_7b(), D2PruneConfig(), 8, 512, "cuda:0", model_bytes=27 * 2**30)  # fits: no error


def test_live_tensor_counter_attributes_each_phase():
    """With a live-tensor counter the per-phase peaks are exact bytes: the statistics phase holds at least every
    Hessian sum of a block (q/k/v, o, gate/up inputs: hidden²; down: intermediate²), and no phase exceeds the run."""
    from optimum_d2prune.engine import PruningEngine
    from optimum_d2prune.pruner import prepare_batches

    model = make_tiny("llama")
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    batches = prepare_batches(calib_batches())
    with LiveTensorBytes() as counter:
        report = PruningEngine(D2PruneConfig(method="sparsegpt", sparsity=0.5), get_adapter(model),
                               memory_counter=counter).run(model, batches)
    assert report.peak_memory_kind == "live tensors"
    phases = report.phase_memory_bytes
    assert {"inputs", "statistics", "solve", "propagate"} <= phases.keys()
    assert phases["statistics"] >= (3 * hidden * hidden + inter * inter) * 4
    assert max(phases.values()) == report.memory_increase_bytes


def test_estimate_models_the_block_reconstruction():
    """The reconstruction's memory (dense weight copy, recorded dense outputs, the down projection's refit) as
    measured by the live-tensor counter on a tiny LLaMA, against the estimate for the same run."""
    from optimum_d2prune.engine import PruningEngine
    from optimum_d2prune.pruner import prepare_batches

    measured, estimated = {}, {}
    for name, kwargs in {"plain": {}, "rebuild": {"block_reconstruction": True},
                         "reference": {"block_reconstruction": True, "reconstruction_reference": "model"}}.items():
        model, batches = make_tiny("llama"), prepare_batches(calib_batches())
        config = D2PruneConfig(sparsity=0.5, **kwargs)
        with LiveTensorBytes() as counter:
            measured[name] = PruningEngine(config, get_adapter(model), memory_counter=counter).run(
                model, batches).phase_memory_bytes
        estimated[name] = estimate(model.config, config, 8, 24, "cpu", batch_size=2).phases
    assert "reconstruction" not in estimated["plain"]
    assert measured["rebuild"]["reconstruction"] == pytest.approx(estimated["rebuild"]["reconstruction"], rel=0.2)
    held = measured["rebuild"]["statistics"] - measured["plain"]["statistics"]  # weight copy + recorded outputs
    assert held > 0
    assert held == pytest.approx(estimated["rebuild"]["statistics"] - estimated["plain"]["statistics"], rel=0.2)
    # the dense model's activations propagated beside the pruned ones: a second copy of the calibration activations
    # (from the first block's pass on: not in the inputs phase)
    for phase in ("statistics", "propagate", "reconstruction"):
        assert measured["reference"][phase] == pytest.approx(estimated["reference"][phase], rel=0.2)
    assert estimated["reference"]["statistics"] - estimated["rebuild"]["statistics"] == 8 * 24 * 64 * 4
    big = _llama_7b()
    rebuild = estimate(big, D2PruneConfig(block_reconstruction=True), 128, 2048, "cuda")
    offloaded = estimate(big, D2PruneConfig(block_reconstruction=True, offload_activations=True), 128, 2048, "cuda")
    recorded = 2 * 128 * 2048 * 4096 * 4  # two output projections' dense outputs, fp32 config
    assert rebuild.components["reconstruction targets"] - offloaded.components["reconstruction targets"] == recorded



@pytest.mark.parametrize("rows,cols", [(32, 512), (256, 128)])
@pytest.mark.parametrize("refit,admm", [(False, False), (True, False), (True, True)])
def test_solve_work_matches_a_measured_solve(rows, cols, refit, admm):
    """One layer solve's memory (the estimate's `solve_work_bytes` plus the Cholesky factor) against the live-tensor
    counter: the OBS sweep, the refit and ADMM's eigendecomposition and iterates, wide and tall matrices."""
    from optimum_d2prune.masks import SparsityPattern
    from optimum_d2prune.memory import solve_work_bytes
    from optimum_d2prune.solvers import OBSSolver
    from optimum_d2prune.statistics import InputStatistics, LinearStatistics

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g)
    inputs = InputStatistics(cols, "hessian", torch.device("cpu"))
    stats = LinearStatistics(inputs, 64)
    x = torch.randn(4 * cols, cols, generator=g)
    inputs.add(x)
    stats.add_output(x @ weight.t())
    solver = OBSSolver(refine_steps=8 if refit else 0, admm_steps=6 if admm else 0)
    with LiveTensorBytes() as counter:
        out = solver.prune(weight, stats, SparsityPattern.parse("unstructured", 0.5))
    del out
    expected = cols * cols * 4 + solve_work_bytes(rows, cols, refit, admm)
    assert counter.peak == pytest.approx(expected, rel=0.35)
