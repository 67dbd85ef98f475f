"""Memory bounded by construction, and the memory model that the CLI checks before a run.

The counters here are `LiveTensorBytes` (bytes of live tensors created by torch operations), not timings.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner, RuntimeOptions
from optimum_d2prune.architectures import AttentionInputs, get_adapter
from optimum_d2prune.architectures.base import MaskSpec, query_key_scores
from optimum_d2prune.calibration.batches import prepare_batches
from optimum_d2prune.calibration.statistics import InputStatistics, LinearStatistics
from optimum_d2prune.memory.estimate import MemoryBudgetError, RunShape, check_fits, estimate
from optimum_d2prune.methods.d2prune import attention as attention_module
from optimum_d2prune.methods.d2prune.attention import AttentionScorer
from optimum_d2prune.methods.solvers import inverse_hessian_cholesky
from optimum_d2prune.methods.solvers.base import SolverOutput
from optimum_d2prune.pipeline.engine import PruningEngine
from optimum_d2prune.testing.families import make_family
from optimum_d2prune.testing.memory_counter import LiveTensorBytes


def _capture_block(model, index: int, ids, mask=None):
    adapter = get_adapter(model)
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
        whole = attention_module.choose_unupdated_projection(
            AttentionScorer(adapter, attention, [inputs], 1.0, chunk_bytes=1 << 40), dense, updated, non_updated, 1)
        chunked = attention_module.choose_unupdated_projection(
            AttentionScorer(adapter, attention, [inputs], 1.0, chunk_bytes=1), dense, updated, non_updated, 1)
    assert all(whole.kls[c] > 0 for c in "qkv")
    for c in "qkv":
        assert chunked.kls[c] == pytest.approx(whole.kls[c], rel=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "bool4d", "float4d", "window"])
def test_query_rows_are_the_same_rows_of_the_full_attention(mask_kind):
    """The KL term on a subset of query positions sees exactly those rows of the full masked attention."""

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :3] = False
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    mask = {"none": None, "padding": padding, "window": None,
            "bool4d": causal[None, None] & padding[:, None, None, :],
            "float4d": torch.zeros(2, 1, 12, 12).masked_fill(~(causal[None, None] & padding[:, None, None, :]),
                                                              torch.finfo(torch.float32).min)}[mask_kind]
    scores = query_key_scores(q, k, 0.3, MaskSpec(mask, causal=True,
                                                  sliding_window=5 if mask_kind == "window" else None))
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
        sampled = attention_module.choose_unupdated_projection(
            AttentionScorer(adapter, attention, [inputs], 1.0, max_query_rows=6), dense, updated, non_updated, 1)
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


def _tensor_bytes(value) -> int:
    """Bytes of every tensor in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def _kl_phase_peaks(monkeypatch, batch: int, kl_samples: int = 2) -> tuple[list[int], list[int]]:
    """Peak live bytes of the q/k/v choice and bytes of the captured attention inputs, per block."""
    peaks, captured = [], []
    original = _CHOOSE

    def measured(scorer, *args, **kwargs):
        captured.append(sum(_tensor_bytes((one.args, one.kwargs)) for one in scorer.inputs))
        with LiveTensorBytes() as counter:
            record = original(scorer, *args, **kwargs)
        peaks.append(counter.peak)
        return record

    monkeypatch.setattr(attention_module, "choose_unupdated_projection", measured)
    ids = torch.cat(calib_batches(num=4, batch=2, length=32))  # the same 8 sequences, batched differently
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    D2Pruner(D2PruneConfig(method_options={"kl_samples": kl_samples})).prune(make_tiny("llama"), batches)
    return peaks, captured


def test_kl_memory_does_not_grow_with_the_loader_batch(monkeypatch):
    peaks_1, captured_1 = _kl_phase_peaks(monkeypatch, batch=1)
    peaks_8, captured_8 = _kl_phase_peaks(monkeypatch, batch=8)
    assert len(peaks_1) == len(peaks_8) == 2  # one choice per block
    assert captured_8 == captured_1  # exactly kl_num_samples sequences kept, whatever the batch
    for a, b in zip(peaks_1, peaks_8):
        assert b <= a * 1.05
    more_peaks, more_captured = _kl_phase_peaks(monkeypatch, batch=8, kl_samples=4)
    assert more_captured[0] == 2 * captured_1[0]  # the counter does see what kl_samples keeps


def test_factorisation_adds_one_matrix():
    """The sum becomes the damped H in place; the factor is the only `cols²` matrix kept, with one transient matrix
    inside the inversion."""
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
    D2Pruner(D2PruneConfig(runtime=RuntimeOptions(offload_activations=True))).prune(b, calib_batches())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def _llama_7b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
                       vocab_size=32000)


def _shape(num_samples: int = 128, seq_len: int = 2048, **kwargs) -> RunShape:
    return RunShape.of(D2PruneConfig(**kwargs), num_samples, seq_len)


def test_estimate_follows_what_the_engine_keeps():
    """Structural properties at 7B scale: the weights moved to an accelerator are resident; offloading the activations,
    KL query rows and a smaller KL chunk each lower what they bound; SparseGPT has no attention choice; the peak
    grows with the calibration tokens."""
    config = _llama_7b()
    base = estimate(config, _shape(), "cuda")
    assert base.resident > 0 and estimate(config, _shape(), "cpu").resident == 0
    offloaded = estimate(config, _shape(runtime={"offload_activations": True}), "cuda")
    assert offloaded.peak < base.peak - 3 * 2**30
    every_row = estimate(config, _shape(method_options={"kl_query_rows": None}), "cuda")
    assert base.components["KL chunk"] < every_row.components["KL chunk"]  # 64 of 2048 query rows
    small_chunk = estimate(config, _shape(method_options={"kl_query_rows": None}, runtime={"kl_chunk_mib": 16}),
                           "cuda")
    assert small_chunk.components["KL chunk"] < every_row.components["KL chunk"]
    sparsegpt = estimate(config, _shape(method="sparsegpt"), "cuda")
    assert "attention choice" not in sparsegpt.phases and sparsegpt.components["KL chunk"] == 0
    peaks = [estimate(config, _shape(n, t), "cuda").peak for n, t in ((32, 512), (32, 2048), (128, 2048))]
    assert peaks == sorted(peaks) and len(set(peaks)) == 3


def test_too_large_job_is_refused_with_the_estimate_and_suggestions(monkeypatch):
    import optimum_d2prune.memory.estimate as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 30 * 2**30)
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(_llama_7b(), _shape(), "cuda:0", model_bytes=27 * 2**30)
    message = str(err.value)
    assert "GiB are free" in message and "--offload-activations" in message and "--num-samples" in message
    assert "| statistics |" in message  # the per-phase table
    fits = check_fits(_llama_7b(), _shape(8, 512), "cuda:0", model_bytes=27 * 2**30)
    assert fits.peak + 27 * 2**30 <= 30 * 2**30


def _measured_phases(config: D2PruneConfig, num: int, length: int) -> dict[str, int]:
    """Per-phase peak live-tensor bytes of one engine run on the tiny LLaMA (batches of 2 sequences)."""
    model = make_tiny("llama")
    batches = prepare_batches(calib_batches(num=num, length=length), model)
    engine = PruningEngine(config, get_adapter(model))
    with LiveTensorBytes() as counter:
        engine.memory_counter = counter
        report = engine.run(model, batches, engine.plan(model), engine.make_method())
    assert report.peak_memory_kind == "live tensors"
    return report.phase_memory_bytes


#: run -> config; the estimate of every phase is within ESTIMATE_RANGE of the measured one, and its peak is at
#: least the measured peak (the check before a run must not let through a run that does not fit)
MEASURED_RUNS = {
    "d2prune": D2PruneConfig(sparsity=0.5),
    "sparsegpt": D2PruneConfig(sparsity=0.5, method="sparsegpt"),
    "reconstruction": D2PruneConfig(sparsity=0.5, reconstruction=True),
    "model reference": D2PruneConfig(sparsity=0.5, reconstruction=True, reconstruction_options={"reference": "model"}),
}
ESTIMATE_RANGE = (0.8, 1.4)  # estimate / measured


@pytest.mark.parametrize("num,length", [(4, 24), (8, 48)])
@pytest.mark.parametrize("run", sorted(MEASURED_RUNS))
def test_estimate_matches_the_measured_phases(run, num, length):
    config = MEASURED_RUNS[run]
    measured = _measured_phases(config, num, length)
    estimated = estimate(make_tiny("llama").config, RunShape.of(config, 2 * num, length, batch_size=2), "cpu")
    assert set(estimated.phases) == set(measured)
    low, high = ESTIMATE_RANGE
    for phase, value in measured.items():
        assert low * value <= estimated.phases[phase] <= high * value, (phase, value, estimated.phases[phase])
    peak = max(measured.values())
    assert peak <= estimated.peak <= high * peak


def test_live_tensor_counter_attributes_each_phase():
    """With a live-tensor counter the per-phase peaks are exact bytes: the statistics phase holds at least every
    Hessian sum of a block (q/k/v, o, gate/up inputs: hidden²; down: intermediate²), and no phase exceeds the run."""
    model = make_tiny("llama")
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    batches = prepare_batches(calib_batches(), model)
    engine = PruningEngine(D2PruneConfig(method="sparsegpt", sparsity=0.5), get_adapter(model))
    with LiveTensorBytes() as counter:
        engine.memory_counter = counter
        report = engine.run(model, batches, engine.plan(model), engine.make_method())
    assert report.peak_memory_kind == "live tensors"
    phases = report.phase_memory_bytes
    assert {"inputs", "statistics", "solve", "propagate"} <= phases.keys()
    assert phases["statistics"] >= (3 * hidden * hidden + inter * inter) * 4
    assert max(phases.values()) == report.memory_increase_bytes


def test_estimate_models_the_block_reconstruction():
    """What the reconstruction adds (dense weight copy, recorded dense outputs, the down projection's refit; with
    the model reference a second copy of the activations), measured by the live-tensor counter on a tiny LLaMA,
    against what the estimate adds for the same runs; offloading or sequential calibration records no outputs."""
    configs = {"plain": MEASURED_RUNS["d2prune"], "rebuild": MEASURED_RUNS["reconstruction"],
               "reference": MEASURED_RUNS["model reference"]}
    measured = {name: _measured_phases(config, 4, 24) for name, config in configs.items()}
    tiny = make_tiny("llama").config
    estimated = {name: estimate(tiny, RunShape.of(config, 8, 24, batch_size=2), "cpu").phases
                 for name, config in configs.items()}
    assert "reconstruction" not in estimated["plain"] and "reconstruction" not in measured["plain"]
    for more, less in (("rebuild", "plain"), ("reference", "rebuild")):
        held = measured[more]["statistics"] - measured[less]["statistics"]
        assert held > 0
        assert held == pytest.approx(estimated[more]["statistics"] - estimated[less]["statistics"], rel=0.2)
    big = _llama_7b()
    rebuild = estimate(big, _shape(reconstruction=True), "cuda")
    for cheaper in ({"runtime": {"offload_activations": True}}, {"sequential": True}):
        other = estimate(big, _shape(reconstruction=True, **cheaper), "cuda")
        assert other.components["reconstruction targets"] < rebuild.components["reconstruction targets"], cheaper


@pytest.mark.parametrize("rows,cols", [(32, 512), (256, 128)])
@pytest.mark.parametrize("refit,admm", [(False, False), (True, False), (True, True)])
def test_solve_work_matches_a_measured_solve(rows, cols, refit, admm):
    """One layer solve's memory (the estimate's `solve_work_bytes` plus the Cholesky factor) against the live-tensor
    counter: the OBS sweep, the refit and ADMM's eigendecomposition and iterates, wide and tall matrices."""
    from optimum_d2prune.memory.estimate import solve_work_bytes
    from optimum_d2prune.methods.solvers import OBSSolver
    from optimum_d2prune.patterns import SparsityPattern

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g)
    inputs = InputStatistics(cols, "hessian", torch.device("cpu"))
    stats = LinearStatistics(inputs, 64)
    x = torch.randn(4 * cols, cols, generator=g)
    inputs.add(x)
    stats.add_output(x @ weight.t())
    solver = OBSSolver(refit_steps=8 if refit else 0, admm_steps=6 if admm else 0)
    with LiveTensorBytes() as counter:
        out = solver.prune(weight, stats, SparsityPattern.parse("unstructured", 0.5))
    del out
    expected = cols * cols * 4 + solve_work_bytes(rows, cols, refit, admm)
    assert counter.peak == pytest.approx(expected, rel=0.35)
