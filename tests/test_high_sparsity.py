"""Non-uniform budgets (OWL), the converged refit, block-level reconstruction and presets (issue 14)."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.allocation import budget_zero_counts, outlier_ratio, owl_sparsities
from optimum_d2prune.configuration import PRESET_OWL_FROM, PRESETS
from optimum_d2prune.engine import PruningEngine, _sequential_groups
from optimum_d2prune.hooks import capture_block_inputs
from optimum_d2prune.masks import SparsityPattern, lowest_k_mask, round_half_up
from optimum_d2prune.reconstruction import DenseOutputRecorder, output_projections, reconstruction_groups
from optimum_d2prune.solvers.admm import admm_support
from optimum_d2prune.solvers.obs import refit_surviving_weights


def _prune(name: str = "llama4", **kwargs):
    model = make_tiny(name)
    pruner = D2Pruner(D2PruneConfig(**kwargs))
    pruner.prune(model, calib_batches())
    return model, pruner.report


def _linears(model) -> list[torch.Tensor]:
    return [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]


# ------------------------------------------------------------------ allocation maths
def test_owl_budgets_have_the_exact_weighted_mean_and_favour_outlier_blocks():
    ratios, sizes = [0.01, 0.05, 0.02, 0.03], [100, 300, 200, 400]
    budgets = owl_sparsities(ratios, sizes, 0.7, 0.08)
    assert sum(b * n for b, n in zip(budgets, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)
    assert budgets[1] == min(budgets) and budgets[0] == max(budgets)  # more outliers -> fewer zeros
    assert max(budgets) - min(budgets) == pytest.approx(0.16)
    assert owl_sparsities(ratios, sizes, 0.7, 0.0) == [0.7] * 4
    with pytest.raises(ValueError, match="owl_lambda"):
        owl_sparsities(ratios, sizes, 0.05, 0.2)


def test_budget_zero_counts_total_is_exact():
    g = torch.Generator().manual_seed(0)
    sizes = [[int(x) for x in torch.randint(5, 500, (3,), generator=g)] for _ in range(7)]
    totals = [sum(b) for b in sizes]
    budgets = owl_sparsities([float(x) for x in torch.rand(7, generator=g)], totals, 0.63, 0.1)
    counts = budget_zero_counts(budgets, sizes, 0.63)
    assert sum(map(sum, counts)) == round_half_up(0.63 * sum(totals))
    for block_counts, block_sizes, budget in zip(counts, sizes, budgets):
        for k, n in zip(block_counts, block_sizes):
            assert abs(k - budget * n) <= 1.0 + 1e-9


def test_outlier_ratio_counts_entries_above_m_times_the_mean():
    metric = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 25.0]])  # mean 4: one entry above 5 x 4
    assert outlier_ratio([metric], 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio([metric[:1], metric[1:]], 5.0) == pytest.approx(1 / 8)  # over the block, not per matrix


# ------------------------------------------------------------------ allocation in the engine
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "d2prune"])
def test_owl_mean_sparsity_is_exact_over_the_targeted_weights(method):
    model, report = _prune(method=method, sparsity=0.7, sparsity_allocation="owl", owl_lambda=0.1, owl_m=2.0)
    weights = _linears(model)
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round_half_up(0.7 * total)
    assert len(report.block_sparsity) == 4 and max(report.block_sparsity) - min(report.block_sparsity) > 0.05
    per_block = report.sparsity_by_block()
    for block, budget in enumerate(report.block_sparsity):
        assert per_block[block] == pytest.approx(budget, abs=1e-3)
    assert "budget" in report.block_table() and "non-uniform budgets" in report.summary()


def test_uniform_is_the_golden_per_matrix_count_and_owl_without_spread_is_uniform_bit_for_bit():
    uniform, report = _prune(sparsity=0.7)
    assert report.block_sparsity == []
    for w in _linears(uniform):  # every matrix rounds its own count (the rule of masks.py)
        assert int((w == 0).sum()) == round_half_up(0.7 * w.numel())
    flat, _ = _prune(sparsity=0.7, sparsity_allocation="owl", owl_lambda=0.0)
    for a, b in zip(uniform.state_dict().values(), flat.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.6}, {"sparsity": 0.6, "sparsity_allocation": "owl", "owl_m": 2.0},
                                    {"mask_structure": "2:4"}], ids=["uniform", "owl", "2:4"])
def test_admm_keeps_every_count_and_changes_the_masks_in_the_engine(kwargs):
    """ADMM re-selects masks inside the engine (every weight-updated layer, D²Prune's attention choice included)
    and keeps the allocation's exact zero counts per matrix (N:M: N of every M)."""
    plain, _ = _prune(**kwargs)
    admm, _ = _prune(admm_steps=9, **kwargs)
    for a, b in zip(_linears(plain), _linears(admm)):
        if "mask_structure" in kwargs:
            assert bool(((b == 0).reshape(b.shape[0], -1, 4).sum(-1) >= 2).all())
        else:
            assert int((a == 0).sum()) == int((b == 0).sum())
    assert sum(not torch.equal(a == 0, b == 0) for a, b in zip(_linears(plain), _linears(admm))) >= 4


def test_admm_with_the_layer_target_solves_the_layer_problem():
    """`target` is the objective's linear term: `w0·H` given explicitly reproduces the layer problem."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    h = x.t() @ x / 512 + 0.01 * torch.eye(64)
    w0 = torch.randn(24, 64, generator=g)
    mask = lowest_k_mask(w0.abs() * torch.diagonal(h).sqrt(), int(0.7 * w0.numel()))
    dead = torch.zeros(64, dtype=torch.bool)
    own, own_mask = admm_support(w0, w0.masked_fill(mask, 0), mask, h, SparsityPattern(0.7), 12, dead)
    given, given_mask = admm_support(torch.full_like(w0, float("nan")), w0.masked_fill(mask, 0), mask, h,
                                     SparsityPattern(0.7), 12, dead, target=w0 @ h)
    assert not torch.equal(own_mask, mask)  # the steps moved the support
    assert torch.equal(own_mask, given_mask) and torch.allclose(own, given, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.6}, {"sparsity": 0.6, "sparsity_allocation": "owl", "owl_m": 2.0},
                                    {"mask_structure": "2:4"}], ids=["uniform", "owl", "2:4"])
def test_block_reconstruction_reselects_the_output_projections_masks_on_the_block_objective(kwargs):
    """With the block reconstruction, o_proj/down_proj get their ADMM on the block objective instead of their own
    layer's: the layer solve stops after the sweep, the reconstruction moves their masks and keeps every count."""
    plain, _ = _prune(block_reconstruction=True, **kwargs)
    admm, report = _prune(block_reconstruction=True, admm_steps=9, **kwargs)
    outputs = {r.name for r in report.reconstruction}
    assert {r.name.rsplit(".", 1)[-1] for r in report.reconstruction} == {"o_proj", "down_proj"}
    for record in report.layers:
        assert ("+admm" in record.solver) != (record.name in outputs or not record.updated), record
    moved = 0
    for name, module in admm.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        a, b = plain.get_submodule(name).weight, module.weight
        if "mask_structure" in kwargs:
            assert bool(((b == 0).reshape(b.shape[0], -1, 4).sum(-1) >= 2).all())
        else:
            assert int((a == 0).sum()) == int((b == 0).sum()), name
        moved += name.endswith(("o_proj", "down_proj")) and not torch.equal(a == 0, b == 0)
    assert moved >= 2
    assert all(r.error_after <= r.error_before for r in report.reconstruction)


# ------------------------------------------------------------------ converged refit
def _refit_problem(seed: int = 0, rows: int = 16, cols: int = 48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    h = x.t() @ x / 256 + 0.01 * torch.eye(cols)
    w0 = torch.randn(rows, cols, generator=g)
    pruned = torch.rand(rows, cols, generator=g) < 0.6
    return w0, w0.masked_fill(pruned, 0), pruned, h


def _objective(w, w0, h) -> float:
    d = w0 - w
    return float(((d @ h) * d).sum())


def test_refine_tolerance_stops_early_at_the_converged_objective():
    w0, start, pruned, h = _refit_problem()
    converged = refit_surviving_weights(w0, start, pruned, h, 300)
    early = refit_surviving_weights(w0, start, pruned, h, 300, tolerance=1e-3)
    steps = next(k for k in range(300) if torch.equal(refit_surviving_weights(w0, start, pruned, h, k), early))
    assert 0 < steps < 300
    best, initial = _objective(converged, w0, h), _objective(start, w0, h)
    assert _objective(early, w0, h) - best <= 1e-3 * (initial - best)
    assert torch.equal(refit_surviving_weights(w0, start, pruned, h, 5, tolerance=0.0),
                       refit_surviving_weights(w0, start, pruned, h, 5))  # 0: fixed steps, as before
    assert bool((early[pruned] == 0).all())


def test_refit_with_a_target_solves_the_cross_covariance_problem():
    """`target = W_d C`, `hessian = G`: the masked least squares of W' X_p against W_d X_d."""
    g = torch.Generator().manual_seed(1)
    x_d = torch.randn(512, 24, generator=g)
    x_p = x_d + 0.3 * torch.randn(512, 24, generator=g)
    w_d = torch.randn(8, 24, generator=g)
    pruned = torch.rand(8, 24, generator=g) < 0.5
    gram, cross = x_p.t() @ x_p, x_d.t() @ x_p
    w = refit_surviving_weights(w_d, w_d.masked_fill(pruned, 0), pruned, gram, 200, target=w_d @ cross)
    for i in range(8):  # reference: ordinary least squares on each row's free columns
        free = ~pruned[i]
        ref = torch.linalg.lstsq(x_p[:, free], (x_d @ w_d[i]).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(w[i, free], ref, rtol=1e-3, atol=1e-3)


def test_refine_tolerance_is_used_by_the_solver():
    model_a, report_a = _prune(sparsity=0.6, refine_steps=64)
    model_b, report_b = _prune(sparsity=0.6, refine_steps=64, refine_tolerance=0.5)
    assert any(not torch.equal(a, b) for a, b in zip(_linears(model_a), _linears(model_b)))


# ------------------------------------------------------------------ block-level reconstruction
@pytest.mark.parametrize("name, expected, everything", [
    ("llama", ["self_attn.o_proj", "mlp.down_proj"], [["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                                      ["mlp.down_proj"]]),
    ("opt", ["self_attn.out_proj", "fc2"], [["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_output_projections_are_found_from_structure(name, expected, everything):
    model = make_tiny(name)
    config = D2PruneConfig()
    engine = PruningEngine(config, _adapter(model))
    blocks, _, targets = engine.plan(model)
    batch = capture_block_inputs(model, blocks[0], [{"input_ids": calib_batches(1)[0]}], torch.device("cpu"),
                                 torch.device("cpu"), engine.adapter.forward_model)[0]
    groups = _sequential_groups(blocks[0], targets[0], batch, torch.device("cpu"))
    outputs = output_projections(groups)
    assert len(outputs) == len(expected)
    assert all(t.name.endswith(f".0.{e}") for t, e in zip(outputs, expected))
    assert [[t.name for t in g] for g in reconstruction_groups(groups, "outputs")] == [[t.name] for t in outputs]
    prefix = outputs[0].name[: -len(expected[0])]
    assert [[t.name for t in g] for g in reconstruction_groups(groups, "all")] == [
        [prefix + n for n in group] for group in everything]


def _adapter(model):
    from optimum_d2prune.architectures import get_adapter

    return get_adapter(model)


def _first_block_output_error(model, dense) -> float:
    """Relative error of block 0's output against the dense block's, on the calibration tokens."""
    ids = torch.cat(calib_batches())
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states
        ref = dense(ids, output_hidden_states=True).hidden_states
    return float((ours[1] - ref[1]).square().sum() / (ref[1] - ref[0]).square().sum())


def test_block_reconstruction_lowers_the_block_output_error():
    dense = make_tiny("llama4")
    plain, _ = _prune(sparsity=0.7, refine_steps=0)
    refit, report = _prune(sparsity=0.7, refine_steps=0, block_reconstruction=True)
    assert _first_block_output_error(refit, dense) < 0.8 * _first_block_output_error(plain, dense)
    assert len(report.reconstruction) == 8
    assert all(r.error_after <= r.error_before for r in report.reconstruction)
    for a, b in zip(_linears(plain), _linears(refit)):  # same masks: only surviving weights move
        assert torch.equal(a == 0, b == 0) or int((b == 0).sum()) >= int((a == 0).sum())
    assert "block-level refit" in report.summary()
    wider, report = _prune(sparsity=0.7, refine_steps=0, block_reconstruction=True, reconstruction_targets="all")
    assert [r.name.split(".", 3)[-1] for r in report.reconstruction[:4]] == [
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert len(report.reconstruction) == 16 and all(r.error_after <= r.error_before for r in report.reconstruction)
    for a, b in zip(_linears(plain), _linears(wider)):
        assert torch.equal(a == 0, b == 0) or int((b == 0).sum()) >= int((a == 0).sum())


@pytest.mark.parametrize("name", ["llama4", "opt"])
def test_reconstruction_from_the_recorded_dense_outputs_matches_swapping_the_dense_weights_in(name, monkeypatch):
    """The dense outputs recorded in the statistics pass give the refit that re-running the dense block gives
    (OPT: output projections with biases, made non-zero here). Block 0 only: later blocks see inputs that differ
    by rounding, which can flip near-tied mask entries."""

    def prune():
        model = make_tiny(name)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        pruner = D2Pruner(D2PruneConfig(sparsity=0.7, block_reconstruction=True))
        pruner.prune(model, calib_batches())
        layers = model.model.decoder.layers if name == "opt" else model.model.layers
        return [m.weight for m in layers[0].modules() if isinstance(m, torch.nn.Linear)], pruner.report

    recorded, recorded_report = prune()
    seen = []
    original = DenseOutputRecorder.complete

    def without_recording(self, target: str, batches: int):
        seen.append(original(self, target, batches) is not None)
        return None  # force the swap path

    monkeypatch.setattr(DenseOutputRecorder, "complete", without_recording)
    swapped, swapped_report = prune()
    assert seen and all(seen)  # every output projection had a complete recording
    assert len(recorded_report.reconstruction) == len(swapped_report.reconstruction) > 0
    for a, b in zip(recorded, swapped):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # rounding of the bias subtraction
    for r, s in zip(recorded_report.reconstruction[:2], swapped_report.reconstruction[:2]):
        assert r.error_after == pytest.approx(s.error_after, rel=1e-3)
        assert r.error_after < r.error_before


def _block_outputs(model, batches) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        states = [model(batch, output_hidden_states=True).hidden_states for batch in batches]
    return tuple(torch.cat([s[i] for s in states]) for i in range(1, len(states[0])))


@pytest.mark.parametrize("name", ["llama4", "opt"])
def test_model_reference_brings_the_block_outputs_closer_to_the_dense_models(name):
    """`reconstruction_reference="model"` refits each block's last projection to the dense model's block output,
    "block" to the dense block's on the pruned activations: on the calibration data the blocks' outputs are closer
    to the dense model's with "model" (relative squared error, measured: llama4 0.0085 vs 0.0114 after block 0 and
    0.0082 vs 0.0247 after block 3; OPT 0.0329 vs 0.0339 and 0.0410 vs 0.0527)."""
    batches = calib_batches()
    dense = _block_outputs(make_tiny(name), batches)
    errors = {}
    for reference in ("block", "model"):
        model = _prune(name, sparsity=0.6, block_reconstruction=True, reconstruction_reference=reference)[0]
        errors[reference] = [float((a - b).square().sum() / b.square().sum())
                             for a, b in zip(_block_outputs(model, batches), dense)]
    assert all(m < b for m, b in zip(errors["model"], errors["block"])), errors
    assert errors["model"][-1] < 0.85 * errors["block"][-1], errors  # the error the next layers see


def test_model_reference_keeps_the_dense_block_target_for_post_norm_blocks(caplog):
    """OPT-350m-style blocks (layer norm after the residual add) are not "residual plus last projection": the
    "model" reference falls back to the dense block's output there, giving the "block" run's model exactly."""

    def prune(reference: str):
        model = make_tiny("opt")
        model.config.do_layer_norm_before = False
        for layer in model.model.decoder.layers:
            layer.do_layer_norm_before = False
        pruner = D2Pruner(D2PruneConfig(sparsity=0.6, block_reconstruction=True, reconstruction_reference=reference))
        pruner.prune(model, calib_batches())
        return model, pruner.report

    block, _ = prune("block")
    with caplog.at_level("WARNING"):
        model, report = prune("model")
    assert caplog.text.count("post-norm") == 1  # once per run, not once per block
    fallen = {r.block for r in report.reconstruction if r.reference_fallback}
    assert fallen == set(range(len(model.model.decoder.layers)))
    for a, b in zip(block.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ configuration and presets
@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity_allocation": "owl", "mask_structure": "2:4"}, "N:M"),
    ({"sparsity_allocation": "layerwise"}, "sparsity_allocation"),
    ({"owl_lambda": 0.7}, "owl_lambda"),
    ({"owl_lambda": -0.1}, "owl_lambda"),
    ({"owl_m": 0}, "owl_m"),
    ({"refine_tolerance": 1.5}, "refine_tolerance"),
    ({"refine_tolerance": "tight"}, "refine_tolerance"),
    ({"block_reconstruction": "yes"}, "block_reconstruction"),
    ({"reconstruction_targets": "everything"}, "reconstruction_targets"),
    ({"reconstruction_reference": "dense"}, "reconstruction_reference"),
    ({"preset": "fast"}, "preset"),
    ({"kl_query_rows": 0}, "kl_query_rows"),
    ({"kl_query_rows": 64.0}, "kl_query_rows"),
    ({"measure_flips": "yes"}, "measure_flips"),
    ({"admm_steps": -1}, "admm_steps"),
    ({"admm_steps": 2.5}, "admm_steps"),
    ({"method": "wanda", "admm_steps": 10}, "weight-updating"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D2PruneConfig(**kwargs)


def test_presets_resolve_defaults_explicit_values_win_and_round_trip(tmp_path):
    default = D2PruneConfig()
    assert (default.lambda1, default.activation_scale, default.attention_update, default.sparsity_allocation,
            default.refine_tolerance, default.block_reconstruction, default.refine_steps) == \
        (1.0, "auto", "dynamic", "uniform", 0.15, False, None)
    paper = D2PruneConfig(preset="paper")
    assert (paper.activation_scale, paper.lambda1, paper.lambda2, paper.attention_update, paper.refine_steps) == \
        (1500.0, 1.0, 0.0, "v", 0)
    mine = D2PruneConfig(preset="paper", attention_update="k", activation_scale="auto")
    assert mine.attention_update == "k" and mine.activation_scale == "auto" and mine.refine_steps == 0
    best = D2PruneConfig(preset="max_quality", sparsity=0.8)
    for key, value in PRESETS["max_quality"].items():
        assert getattr(best, key) == value
    assert D2PruneConfig(preset="max_quality", mask_structure="2:4").sparsity_allocation == "uniform"
    # the preset's OWL budgets start at PRESET_OWL_FROM; below it uniform, unless asked for explicitly
    below = D2PruneConfig(preset="max_quality", sparsity=0.5)
    assert below.sparsity_allocation == "uniform" and below.block_reconstruction and below.admm_steps
    assert D2PruneConfig(preset="max_quality", sparsity=PRESET_OWL_FROM).sparsity_allocation == "owl"
    assert D2PruneConfig(preset="max_quality", sparsity=0.5, sparsity_allocation="owl").sparsity_allocation == "owl"
    assert below.replace(preset="max_quality", sparsity=0.8).sparsity_allocation == "owl"
    # the preset's ADMM steps are for the methods that update weights; the others take the rest of the preset
    assert [D2PruneConfig(preset="max_quality", method=m).admm_steps for m in ("sparsegpt", "wanda", "magnitude")] \
        == [PRESETS["max_quality"]["admm_steps"], 0, 0]
    path = tmp_path / "config.json"
    mine.to_json_file(path)
    again = D2PruneConfig.from_json_file(path)
    assert again == mine and again.to_dict()["preset"] == "paper"
    switched = mine.replace(preset="max_quality")
    assert not mine.block_reconstruction and switched.block_reconstruction
    assert switched.attention_update == "dynamic"  # re-resolved: the new preset does not set it


def test_nm_patterns_update_every_projection_unless_told_otherwise():
    """At N:M the default leaves no q/k/v un-updated (dev-split choice); an explicit value or the paper preset's fixed
    v is kept, unstructured sparsity keeps the attention-aware choice, and the resolved value round-trips."""
    assert D2PruneConfig(mask_structure="2:4").attention_update == "all"
    assert D2PruneConfig(mask_structure="4:8", preset="max_quality").attention_update == "all"
    assert D2PruneConfig(mask_structure="2:4", attention_update="dynamic").attention_update == "dynamic"
    assert D2PruneConfig(mask_structure="2:4", preset="paper").attention_update == "v"
    assert D2PruneConfig(sparsity=0.5).attention_update == "dynamic"
    config = D2PruneConfig(mask_structure="2:4")
    assert D2PruneConfig.from_dict(config.to_dict()) == config
    default, report = _prune(mask_structure="2:4")
    explicit, _ = _prune(mask_structure="2:4", attention_update="all")
    assert not report.attention  # no projection was chosen to stay un-updated
    assert all(torch.equal(a, b) for a, b in zip(_linears(default), _linears(explicit)))
    _, dynamic = _prune(mask_structure="2:4", attention_update="dynamic")
    assert dynamic.attention  # the control: asked for, the choice is made and recorded


def test_paper_preset_is_the_published_algorithm():
    a, _ = _prune(sparsity=0.5, preset="paper")
    b, _ = _prune(sparsity=0.5, activation_scale=1500.0, lambda1=1.0, lambda2=0.0, attention_update="v",
                  refine_steps=0)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
