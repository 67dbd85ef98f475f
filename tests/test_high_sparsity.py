"""Non-uniform budgets (OWL), the converged refit, block-level reconstruction and presets."""

from __future__ import annotations

import pytest
import torch
from tinymodels import calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import get_adapter
from optimum_d2prune.configuration import PRESETS
from optimum_d2prune.masks import lowest_k_mask
from optimum_d2prune.methods.registry import get_method
from optimum_d2prune.methods.solvers import OBSSolver
from optimum_d2prune.methods.solvers.admm import admm_support
from optimum_d2prune.methods.solvers.base import LayerProblem
from optimum_d2prune.methods.solvers.obs import refit_surviving_weights
from optimum_d2prune.patterns import SparsityPattern, round_half_up
from optimum_d2prune.pipeline.capture import CaptureOptions, capture_block_inputs
from optimum_d2prune.pipeline.engine import PruningEngine
from optimum_d2prune.pipeline.groups import execution_groups
from optimum_d2prune.refine.allocation import budget_zero_counts, outlier_ratio, owl_sparsities
from optimum_d2prune.refine.reconstruction import DenseOutputRecorder, output_projections, reconstruction_groups


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
    with pytest.raises(ValueError, match=r"lower `allocation_options\['deviation'\]`"):
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
    model, report = _prune(method=method, sparsity=0.7, allocation="owl",
                           allocation_options={"deviation": 0.1, "outlier_threshold": 2.0})
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
    flat, _ = _prune(sparsity=0.7, allocation="owl", allocation_options={"deviation": 0.0})
    for a, b in zip(uniform.state_dict().values(), flat.state_dict().values()):
        assert torch.equal(a, b)


ADMM_CASES = [{"sparsity": 0.6},
              {"sparsity": 0.6, "allocation": "owl", "allocation_options": {"outlier_threshold": 2.0}},
              {"mask_structure": "2:4"}]


@pytest.mark.parametrize("kwargs", ADMM_CASES, ids=["uniform", "owl", "2:4"])
def test_admm_keeps_every_count_and_changes_the_masks_in_the_engine(kwargs):
    """ADMM re-selects masks inside the engine (every weight-updated layer, D²Prune's attention choice included)
    and keeps the allocation's exact zero counts per matrix (N:M: N of every M)."""
    plain, _ = _prune(**kwargs)
    admm, _ = _prune(method_options={"admm_steps": 9}, **kwargs)
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
    start, pattern = w0.masked_fill(mask, 0), SparsityPattern(0.7)
    own, own_mask = admm_support(LayerProblem(w0, h, dead=dead), start, mask, pattern, 12)
    given, given_mask = admm_support(LayerProblem(torch.full_like(w0, float("nan")), h, target=w0 @ h, dead=dead),
                                     start, mask, pattern, 12)
    assert not torch.equal(own_mask, mask)  # the steps moved the support
    assert torch.equal(own_mask, given_mask) and torch.allclose(own, given, atol=1e-4)
    # `dead` is optional: none given is no input dead
    unset, unset_mask = admm_support(LayerProblem(w0, h), start, mask, pattern, 12)
    assert torch.equal(unset_mask, own_mask) and torch.equal(unset, own)


@pytest.mark.parametrize("kwargs", ADMM_CASES, ids=["uniform", "owl", "2:4"])
def test_block_reconstruction_reselects_the_output_projections_masks_on_the_block_objective(kwargs):
    """With the block reconstruction, o_proj/down_proj get their ADMM on the block objective instead of their own
    layer's: the layer solve stops after the sweep, the reconstruction moves their masks and keeps every count."""
    plain, _ = _prune(reconstruction=True, **kwargs)
    admm, report = _prune(reconstruction=True, method_options={"admm_steps": 9}, **kwargs)
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


def _criterion(w, w0, pruned, h) -> float:
    """The refit's stopping quantity at `w`: the preconditioned residual `Σ r² / diag(H)`, `r = (w0 − w) H` on the
    surviving entries."""
    r = ((w0 - w) @ h) * ~pruned
    return float((r.square() / torch.diagonal(h)).sum())


@pytest.mark.parametrize("tolerance", [0.3, 0.1, 0.01])
def test_refit_tolerance_stops_at_the_first_step_meeting_the_residual_criterion(tolerance):
    """With a tolerance the refit stops after exactly the steps a fixed-step refit needs to bring the residual below
    `tolerance²` times the initial one, and gives that fixed-step refit's weights."""
    w0, start, pruned, h = _refit_problem()
    problem = LayerProblem(w0, h)
    fixed = [refit_surviving_weights(problem, start, pruned, k) for k in range(301)]
    goal = tolerance**2 * _criterion(start, w0, pruned, h)
    residuals = [_criterion(w, w0, pruned, h) for w in fixed]
    first = next(k for k, r in enumerate(residuals) if r <= goal)
    assert 0 < first < 300 and residuals[first - 1] > goal
    early = refit_surviving_weights(problem, start, pruned, 300, tolerance)
    assert torch.equal(early, fixed[first])
    assert torch.equal(refit_surviving_weights(problem, start, pruned, 5, 0.0), fixed[5])  # 0: fixed steps
    assert bool((early[pruned] == 0).all())
    best, initial = _objective(fixed[300], w0, h), _objective(start, w0, h)
    assert best < _objective(early, w0, h) < initial


def test_refit_with_a_target_solves_the_cross_covariance_problem():
    """`target = W_d C`, `hessian = G`: the masked least squares of W' X_p against W_d X_d."""
    g = torch.Generator().manual_seed(1)
    x_d = torch.randn(512, 24, generator=g)
    x_p = x_d + 0.3 * torch.randn(512, 24, generator=g)
    w_d = torch.randn(8, 24, generator=g)
    pruned = torch.rand(8, 24, generator=g) < 0.5
    gram, cross = x_p.t() @ x_p, x_d.t() @ x_p
    w = refit_surviving_weights(LayerProblem(w_d, gram, target=w_d @ cross), w_d.masked_fill(pruned, 0), pruned, 200)
    for i in range(8):  # reference: ordinary least squares on each row's free columns
        free = ~pruned[i]
        ref = torch.linalg.lstsq(x_p[:, free], (x_d @ w_d[i]).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(w[i, free], ref, rtol=1e-3, atol=1e-3)


def test_refit_tolerance_of_the_config_stops_the_solvers_refit_early():
    """The method built from the config refits for as many steps as the fixed-step solver whose weights it gives,
    fewer than `refit_steps`: not the full `refit_steps` refit."""
    from test_solvers import correlated_inputs, make_stats

    config = D2PruneConfig(method="sparsegpt", sparsity=0.6,
                           method_options={"refit_steps": 64, "refit_tolerance": 0.5, "refit_budget": False})
    method = get_method(config.method)(config.method_options, config.pattern)
    method.setup(300)
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    stats = make_stats(w, correlated_inputs(9))
    early = method.solver.prune(w, stats, config.pattern)
    fixed = {k: OBSSolver(refit_steps=k).prune(w, stats, config.pattern).weight for k in range(1, 65)}
    same = [k for k, weight in fixed.items() if torch.equal(weight, early.weight)]
    assert same and same[0] < 64 and not torch.equal(early.weight, fixed[64])


# ------------------------------------------------------------------ block-level reconstruction
@pytest.mark.parametrize("name, expected, everything", [
    ("llama", ["self_attn.o_proj", "mlp.down_proj"], [["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                                      ["mlp.down_proj"]]),
    ("opt", ["self_attn.out_proj", "fc2"], [["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_output_projections_are_found_from_structure(name, expected, everything):
    model = make_tiny(name)
    engine = PruningEngine(D2PruneConfig(), get_adapter(model))
    stack = engine.plan(model).stacks[0]
    cpu = torch.device("cpu")
    batch = capture_block_inputs(model, stack.blocks[0], [{"input_ids": calib_batches(1)[0]}],
                                 CaptureOptions(cpu, cpu, engine.adapter.forward_model))[0]
    groups = execution_groups(stack.blocks[0], stack.targets[0], batch, cpu)
    outputs = output_projections(groups)
    assert len(outputs) == len(expected)
    assert all(t.name.endswith(f".0.{e}") for t, e in zip(outputs, expected))
    assert [[t.name for t in g] for g in reconstruction_groups(groups, "outputs")] == [[t.name] for t in outputs]
    prefix = outputs[0].name[: -len(expected[0])]
    assert [[t.name for t in g] for g in reconstruction_groups(groups, "all")] == [
        [prefix + n for n in group] for group in everything]


def _first_block_output_error(model, dense) -> float:
    """Relative error of block 0's output against the dense block's, on the calibration tokens."""
    ids = torch.cat(calib_batches())
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states
        ref = dense(ids, output_hidden_states=True).hidden_states
    return float((ours[1] - ref[1]).square().sum() / (ref[1] - ref[0]).square().sum())


def _assert_refit_moves_only_surviving_weights(plain, refit, refit_names: set, sparsity: float) -> None:
    """Every matrix keeps its exact zero count; in block 0 (same inputs in both runs) the matrices the block
    reconstruction refit keep the plain run's mask with other surviving weights, and every other one is the plain
    run's bit for bit. Later blocks see other inputs in the two runs, so only their counts compare."""
    modules = dict(refit.named_modules())
    for name, module in plain.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        a, b = module.weight, modules[name].weight
        assert int((a == 0).sum()) == int((b == 0).sum()) == round_half_up(sparsity * a.numel()), name
        if ".layers.0." not in name:
            continue
        if name in refit_names:
            assert torch.equal(a == 0, b == 0) and not torch.equal(a, b), name
        else:
            assert torch.equal(a, b), name


def test_block_reconstruction_lowers_the_block_output_error():
    dense = make_tiny("llama4")
    no_refit = {"refit_steps": 0}
    plain, _ = _prune(sparsity=0.7, method_options=no_refit)
    refit, report = _prune(sparsity=0.7, method_options=no_refit, reconstruction=True)
    assert _first_block_output_error(refit, dense) < 0.8 * _first_block_output_error(plain, dense)
    assert len(report.reconstruction) == 8
    assert all(r.error_after <= r.error_before for r in report.reconstruction)
    _assert_refit_moves_only_surviving_weights(plain, refit, {r.name for r in report.reconstruction}, 0.7)
    assert "block-level refit" in report.summary()
    wider, report = _prune(sparsity=0.7, method_options=no_refit, reconstruction=True,
                           reconstruction_options={"targets": "all"})
    assert [r.name.split(".", 3)[-1] for r in report.reconstruction[:4]] == [
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert len(report.reconstruction) == 16 and all(r.error_after <= r.error_before for r in report.reconstruction)
    _assert_refit_moves_only_surviving_weights(plain, wider, {r.name for r in report.reconstruction}, 0.7)


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
        pruner = D2Pruner(D2PruneConfig(sparsity=0.7, reconstruction=True))
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
    """`reconstruction_options={"reference": "model"}` refits each block's last projection to the dense model's block
    output, "block" to the dense block's on the pruned activations: on the calibration data the blocks' outputs are
    closer to the dense model's with "model" (relative squared error, measured: llama4 0.0085 vs 0.0114 after block
    0 and 0.0082 vs 0.0247 after block 3; OPT 0.0329 vs 0.0339 and 0.0410 vs 0.0527)."""
    batches = calib_batches()
    dense = _block_outputs(make_tiny(name), batches)
    errors = {}
    for reference in ("block", "model"):
        model = _prune(name, sparsity=0.6, reconstruction=True, reconstruction_options={"reference": reference})[0]
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
        pruner = D2Pruner(D2PruneConfig(sparsity=0.6, reconstruction=True,
                                        reconstruction_options={"reference": reference}))
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


# ------------------------------------------------------------------ presets
MAX_QUALITY = PRESETS["max_quality"]
OWL_FROM = MAX_QUALITY.allocation_options["min_sparsity"]


@pytest.mark.parametrize("sparsity", [OWL_FROM - 0.05, OWL_FROM, 0.8])
def test_max_quality_runs_what_its_table_says(sparsity):
    """Against the default run at the same sparsity: block reconstruction of the output projections, ADMM in the
    solve of every other weight-updated matrix (the refit projections run theirs on the block objective), and OWL
    budgets from the table's `min_sparsity` on, uniform budgets below it."""
    assert MAX_QUALITY.reconstruction and MAX_QUALITY.allocation == "owl"
    assert MAX_QUALITY.method_options["d2prune"]["admm_steps"] > 0
    _, default = _prune(sparsity=sparsity)
    model, report = _prune(sparsity=sparsity, preset="max_quality")
    assert default.reconstruction == [] and default.block_sparsity == []
    assert not any("+admm" in r.solver for r in default.layers)
    refit = {r.name for r in report.reconstruction}
    assert len(refit) == 8 and {n.rsplit(".", 1)[-1] for n in refit} == {"o_proj", "down_proj"}
    for record in report.layers:
        assert ("+admm" in record.solver) == (record.updated and record.name not in refit), record
    weights = _linears(model)
    if sparsity >= OWL_FROM:
        deviation = MAX_QUALITY.allocation_options.get("deviation", 0.08)
        assert len(report.block_sparsity) == 4
        assert max(report.block_sparsity) - min(report.block_sparsity) == pytest.approx(2 * deviation)
        total = sum(w.numel() for w in weights)
        assert sum(int((w == 0).sum()) for w in weights) == round_half_up(sparsity * total)
    else:
        assert report.block_sparsity == []
        for w in weights:
            assert int((w == 0).sum()) == round_half_up(sparsity * w.numel())


def test_paper_preset_is_the_published_algorithm():
    """The preset's run is the run of its options given explicitly: v pruned without update in every block, no
    refit (the default run refits)."""
    a, report = _prune(sparsity=0.5, preset="paper")
    b, _ = _prune(sparsity=0.5, method_options={"activation_scale": 1500.0, "lambda1": 1.0, "lambda2": 0.0,
                                                "skip_update": "v", "refit_steps": 0})
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert {(r.chosen, r.strategy) for r in report.attention} == {("v", "fixed")} and len(report.attention) == 4
    assert {r.solver for r in report.layers} == {"d2-sparsegpt", "d2-wanda"}
    _, default = _prune(sparsity=0.5)
    assert "d2-sparsegpt+refit" in {r.solver for r in default.layers}


def test_explicit_values_win_over_the_preset_and_a_new_preset_re_resolves(tmp_path):
    mine = D2PruneConfig(preset="paper", method_options={"skip_update": "k", "activation_scale": "auto"})
    assert (mine.method_options.skip_update, mine.method_options.activation_scale) == ("k", "auto")
    assert mine.method_options.refit_steps == 0  # the rest comes from the preset
    assert D2PruneConfig(preset="max_quality", mask_structure="2:4").allocation == "uniform"
    without = D2PruneConfig(preset="max_quality", sparsity=0.8, reconstruction=False)
    assert without.reconstruction is False and without.reconstruction_options is None and without.allocation == "owl"
    wanda = D2PruneConfig(preset="max_quality", method="wanda", sparsity=0.8)  # no ADMM: the rest of the preset
    assert wanda.reconstruction and wanda.allocation == "owl" and not hasattr(wanda.method_options, "admm_steps")
    path = tmp_path / "config.json"
    mine.to_json_file(path)
    again = D2PruneConfig.from_json_file(path)
    assert again == mine and again.to_dict()["preset"] == "paper"
    switched = mine.replace(preset="max_quality")
    assert not mine.reconstruction and switched.reconstruction
    assert switched.method_options.skip_update == "dynamic"  # re-resolved: the new preset does not set it


def test_nm_patterns_update_every_projection_unless_told_otherwise():
    """At N:M the default leaves no q/k/v un-updated (dev-split choice); an explicit value or the paper preset's fixed
    v is kept, unstructured sparsity keeps the attention-aware choice, and the resolved value round-trips."""

    def skip_update(**kwargs) -> str:
        return D2PruneConfig(**kwargs).method_options.skip_update

    assert skip_update(mask_structure="2:4") == "none"
    assert skip_update(mask_structure="4:8", preset="max_quality") == "none"
    assert skip_update(mask_structure="2:4", method_options={"skip_update": "dynamic"}) == "dynamic"
    assert skip_update(mask_structure="2:4", preset="paper") == "v"
    assert skip_update(sparsity=0.5) == "dynamic"
    config = D2PruneConfig(mask_structure="2:4")
    assert D2PruneConfig.from_dict(config.to_dict()) == config
    default, report = _prune(mask_structure="2:4")
    explicit, _ = _prune(mask_structure="2:4", method_options={"skip_update": "none"})
    assert not report.attention  # no projection was chosen to stay un-updated
    assert all(torch.equal(a, b) for a, b in zip(_linears(default), _linears(explicit)))
    _, dynamic = _prune(mask_structure="2:4", method_options={"skip_update": "dynamic"})
    assert dynamic.attention  # the control: asked for, the choice is made and recorded
