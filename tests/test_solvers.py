"""Solver maths on bare random layers, against straightforward reference implementations of SparseGPT and Wanda."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from optimum_d2prune import D2PruneConfig
from optimum_d2prune.calibration.statistics import GRAM_BLOCK, InputStatistics, LinearStatistics
from optimum_d2prune.methods.registry import get_method
from optimum_d2prune.methods.solvers import DualTaylor, MagnitudeSolver, OBSSolver, WandaSolver
from optimum_d2prune.patterns import SparsityPattern, round_half_up

ROWS, COLS = 64, 256


def correlated_inputs(seed: int, batches: int = 4, tokens: int = 300, cols: int = COLS) -> list[torch.Tensor]:
    """Inputs with correlated features and uneven scales, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 3 + 0.1
    return [(torch.randn(tokens, cols, generator=g) @ mix) * scale for _ in range(batches)]


def make_stats(weight: torch.Tensor, xs: list[torch.Tensor], level: str = "hessian", seq_len: int = 300):
    inputs = InputStatistics(weight.shape[1], level, torch.device("cpu"))
    stats = LinearStatistics(inputs, seq_len)
    for x in xs:
        inputs.add(x)
        stats.add_output(x @ weight.t())
    return stats


# ------------------------------------------------------------------ references
def reference_sparsegpt(W, xs, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """SparseGPT's algorithm as published (running-mean Hessian, column loop), selecting exactly k per block."""
    W = W.clone().float()
    rows, cols = W.shape
    H = torch.zeros(cols, cols)
    n = 0
    for x in xs:
        t = x.shape[0]
        H *= n / (n + t)
        n += t
        inp = math.sqrt(2 / n) * x.t().float()
        H += inp @ inp.t()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    masks = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if prunen == 0:
            tmp = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(round(tmp.numel() * sparsity))
            mask1.view(-1)[torch.argsort(tmp.flatten(), stable=True)[:k]] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / torch.diag(Hinv1)[i : i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.argsort(tmp, dim=1, stable=True)[:, :prunen], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        masks[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, masks


def reference_wanda(W, xs, sparsity, prunen=0, prunem=0):
    """Wanda as published: |W| * sqrt(mean x²), lowest per row (or per N:M group)."""
    n = sum(x.shape[0] for x in xs)
    scaler = sum(x.float().square().sum(0) for x in xs) / n
    metric = W.abs() * scaler.sqrt()
    mask = torch.zeros_like(W, dtype=torch.bool)
    if prunen:
        for c in range(0, W.shape[1], prunem):
            tmp = metric[:, c : c + prunem]
            mask.scatter_(1, c + torch.argsort(tmp, dim=1, stable=True)[:, :prunen], True)
    else:
        idx = torch.argsort(metric, dim=1, stable=True)[:, : int(W.shape[1] * sparsity)]
        mask.scatter_(1, idx, True)
    out = W.clone()
    out[mask] = 0
    return out, mask


CASES = [("unstructured", 0.5, 0, 0), ("2:4", 0.5, 2, 4), ("4:8", 0.5, 4, 8), ("unstructured", 0.75, 0, 0)]


@pytest.mark.parametrize("structure,sparsity,n,m", CASES)
def test_sparsegpt_matches_reference(structure, sparsity, n, m):
    torch.manual_seed(0)
    W = torch.randn(ROWS, COLS)
    xs = correlated_inputs(1)
    pattern = SparsityPattern.parse(structure, sparsity)
    out = OBSSolver().prune(W, make_stats(W, xs), pattern)
    ref_w, ref_mask = reference_sparsegpt(W, xs, sparsity, n, m)
    assert torch.equal(out.mask, ref_mask)
    torch.testing.assert_close(out.weight, ref_w, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("structure,sparsity,n,m", CASES)
def test_d2prune_with_zero_lambdas_is_exactly_sparsegpt_and_wanda(structure, sparsity, n, m):
    torch.manual_seed(0)
    W = torch.randn(ROWS, COLS)
    xs = correlated_inputs(2)
    config = D2PruneConfig(method="d2prune", mask_structure=structure, sparsity=sparsity,
                           method_options={"lambda1": 0.0, "lambda2": 0.0, "refit_steps": 0})
    method = get_method(config.method)(config.method_options, config.pattern)
    method.setup(300)
    update, non_update = method.solvers()
    stats = make_stats(W, xs)
    out = update.prune(W, stats, config.pattern)
    base = OBSSolver().prune(W, stats, config.pattern)
    assert torch.equal(out.mask, base.mask) and torch.equal(out.weight, base.weight)
    ref_w, ref_mask = reference_wanda(W, xs, sparsity, n, m)
    out = non_update.prune(W, stats, config.pattern)
    assert torch.equal(out.mask, ref_mask)
    assert torch.equal(out.weight, ref_w)


@pytest.mark.parametrize("structure,sparsity,n,m", CASES)
def test_wanda_matches_reference_with_diagonal_statistics(structure, sparsity, n, m):
    torch.manual_seed(0)
    W = torch.randn(ROWS, COLS)
    xs = correlated_inputs(3)
    out = WandaSolver().prune(W, make_stats(W, xs, level="diag"), SparsityPattern.parse(structure, sparsity))
    ref_w, ref_mask = reference_wanda(W, xs, sparsity, n, m)
    assert torch.equal(out.mask, ref_mask)
    assert torch.equal(out.weight, ref_w)


def test_obs_error_below_wanda_and_magnitude():
    torch.manual_seed(0)
    W = torch.randn(ROWS, COLS)
    xs = correlated_inputs(4)
    stats = make_stats(W, xs)
    pattern = SparsityPattern.parse("unstructured", 0.6)
    errors = {s.name: s.prune(W, stats, pattern).error for s in (OBSSolver(), WandaSolver(), MagnitudeSolver())}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]
    # the reported error is the real output error
    out = OBSSolver().prune(W, stats, pattern)
    x = torch.cat(xs)
    direct = ((x @ (W - out.weight).t()).square().sum() / (x @ W.t()).square().sum()).item()
    assert out.error == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("solver", [OBSSolver(), OBSSolver(DualTaylor(1.0, -0.5, 20.0)), WandaSolver(), MagnitudeSolver()],
                         ids=["sparsegpt", "d2-sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("rows,cols,sparsity", [(37, 129, 0.3), (16, 200, 0.55), (5, 7, 0.5), (64, 256, 0.0)])
def test_exact_unstructured_sparsity(solver, rows, cols, sparsity):
    torch.manual_seed(rows)
    W = torch.randn(rows, cols)
    out = solver.prune(W, make_stats(W, correlated_inputs(5, cols=cols)), SparsityPattern.parse("unstructured", sparsity))
    expected = round_half_up(sparsity * rows * cols)
    assert int(out.mask.sum()) == expected
    assert int((out.weight == 0).sum()) == expected
    assert torch.equal(out.weight == 0, out.mask)


@pytest.mark.parametrize("solver", [OBSSolver(), OBSSolver(DualTaylor(1.0, 0.0, 20.0)), WandaSolver(), MagnitudeSolver()],
                         ids=["sparsegpt", "d2-sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("nm", ["2:4", "4:8", "3:4", "1:2"])
def test_nm_pattern_exact(solver, nm):
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    pattern = SparsityPattern.parse(nm, 0.0)
    out = solver.prune(W, make_stats(W, correlated_inputs(6, cols=64)), pattern)
    zeros = (out.weight == 0).reshape(24, 64 // pattern.m, pattern.m).sum(-1)
    assert bool((zeros == pattern.n).all())


def _layer_problem(structure: str, sparsity: float):
    """A weight, its statistics on correlated inputs (seed 9) and a pattern: the refit and ADMM tests' problem."""
    torch.manual_seed(0)
    W = torch.randn(ROWS, COLS)
    return W, make_stats(W, correlated_inputs(9)), SparsityPattern.parse(structure, sparsity)


@pytest.mark.parametrize("structure,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_refit_keeps_the_mask_and_lowers_the_error(structure, sparsity):
    W, stats, pattern = _layer_problem(structure, sparsity)
    plain = OBSSolver().prune(W, stats, pattern)
    refit = OBSSolver(refit_steps=16).prune(W, stats, pattern)
    assert torch.equal(plain.mask, refit.mask)
    assert torch.equal(refit.weight == 0, refit.mask)
    assert refit.error < 0.95 * plain.error
    # converged: the gradient of the output error on the surviving weights vanishes
    x = torch.cat(correlated_inputs(9))
    grad = ((refit.weight - W) @ (x.t() @ x)) * ~refit.mask
    assert grad.abs().max() < 2e-2 * ((W @ (x.t() @ x)).abs().max())


@pytest.mark.parametrize("structure,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_admm_moves_the_mask_to_a_lower_error_with_the_same_pattern(structure, sparsity):
    W, stats, pattern = _layer_problem(structure, sparsity)
    refit = OBSSolver(refit_steps=16).prune(W, stats, pattern)
    admm = OBSSolver(refit_steps=16, admm_steps=30).prune(W, stats, pattern)
    assert torch.equal(admm.weight == 0, admm.mask)
    if pattern.is_nm:
        zeros = admm.mask.reshape(ROWS, COLS // pattern.m, pattern.m).sum(-1)
        assert bool((zeros == pattern.n).all())
    else:
        assert int(admm.mask.sum()) == int(refit.mask.sum())
    assert not torch.equal(admm.mask, refit.mask)
    assert admm.error < 0.97 * refit.error
    # the candidate path (solve without the refit, then `refit`) gives the same result as one solve
    solver = OBSSolver(refit_steps=16, admm_steps=30)
    late = solver.refit(W, solver.without_refit().prune(W, stats, pattern), stats, pattern)
    assert torch.equal(late.mask, admm.mask)


def test_admm_prunes_dead_inputs_first():
    torch.manual_seed(0)
    xs = correlated_inputs(4, cols=64)
    for x in xs:
        x[:, :5] = 0.0  # five inputs never active
    W = torch.randn(16, 64)
    pattern = SparsityPattern.parse("unstructured", 0.5)
    out = OBSSolver(refit_steps=8, admm_steps=12).prune(W, make_stats(W, xs), pattern)
    assert bool(out.mask[:, :5].all())
    assert int(out.mask.sum()) == 16 * 32


@pytest.mark.parametrize("solver", [OBSSolver(DualTaylor(1.0, 0.0, 50.0), refit_steps=4), WandaSolver()],
                         ids=["d2-sparsegpt+refit", "wanda"])
def test_solves_are_deterministic_and_the_comparison_sees_other_inputs(solver):
    W = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(7))
    pattern = SparsityPattern.parse("unstructured", 0.5)
    a, b = (solver.prune(W, make_stats(W, correlated_inputs(7)), pattern) for _ in range(2))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    other = solver.prune(W, make_stats(W, correlated_inputs(8)), pattern)  # the same check on other inputs fails
    assert not torch.equal(a.mask, other.mask) and not torch.equal(a.weight, other.weight)


def test_dual_taylor_terms_change_the_mask_and_are_counted():
    torch.manual_seed(0)
    W = torch.randn(ROWS, COLS)
    xs = correlated_inputs(8)
    stats = make_stats(W, xs)
    pattern = SparsityPattern.parse("unstructured", 0.5)
    base = OBSSolver().prune(W, stats, pattern)
    weak = OBSSolver(DualTaylor(1.0, 0.0, 1e6), measure_flips=True).prune(W, stats, pattern)
    strong = OBSSolver(DualTaylor(1.0, 0.0, 5.0), measure_flips=True).prune(W, stats, pattern)
    assert torch.equal(weak.mask, base.mask) and weak.flipped == 0
    assert strong.flipped > 0 and not torch.equal(strong.mask, base.mask)
    assert int(strong.mask.sum()) == int(base.mask.sum())
    # the count is a diagnostic: without it the solve is the same, and nothing is reported
    unmeasured = OBSSolver(DualTaylor(1.0, 0.0, 5.0)).prune(W, stats, pattern)
    assert unmeasured.flipped is None and torch.equal(unmeasured.weight, strong.weight)


def test_statistics_do_not_depend_on_batching():
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    x = torch.randn(400, 32)
    one = make_stats(W, [x])
    many = make_stats(W, list(x.split(37)))
    torch.testing.assert_close(one.inputs.hessian(), many.inputs.hessian())
    torch.testing.assert_close(one.x_norm(), many.x_norm())
    torch.testing.assert_close(one.y_norm(), many.y_norm())


@pytest.mark.parametrize("cols", [GRAM_BLOCK - 1, GRAM_BLOCK + 1, 2 * GRAM_BLOCK + 77])
def test_blocked_gram_accumulation_equals_the_full_product(cols):
    """Only the upper block rows of X Xᵀ are accumulated; reading it gives the full symmetric sum, also when
    batches are added after a read."""
    torch.manual_seed(0)
    x = torch.randn(300, cols, dtype=torch.float64).float()
    inputs = InputStatistics(cols, "hessian", torch.device("cpu"))
    inputs.add(x[:100])
    inputs.gram()
    inputs.add(x[100:])
    expected = x.double().t() @ x.double()
    torch.testing.assert_close(inputs.gram().double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(inputs.gram(), inputs.gram().t())


def test_cholesky_failure_retries_with_more_damping(caplog):
    W = torch.randn(4, 3)
    inputs = InputStatistics(3, "hessian", torch.device("cpu"))
    inputs.num_tokens = 2
    inputs.xtx = torch.diag(torch.tensor([1.0, 1.0, -0.5]))  # indefinite: a damping of 1% cannot fix it
    stats = LinearStatistics(inputs, 1, y_sq=torch.ones(4))
    with caplog.at_level(logging.WARNING):
        out = OBSSolver().prune(W, stats, SparsityPattern.parse("unstructured", 0.5))
    assert "Cholesky failed" in caplog.text
    assert int(out.mask.sum()) == 6


def test_cholesky_failure_that_damping_cannot_fix_raises():
    W = torch.randn(4, 3)
    inputs = InputStatistics(3, "hessian", torch.device("cpu"))
    inputs.num_tokens = 2
    inputs.xtx = torch.diag(torch.tensor([1.0, 1.0, -1e9]))  # negative mean diagonal: damping only makes it worse
    stats = LinearStatistics(inputs, 1, y_sq=torch.ones(4), name="block.0.fc")
    with pytest.raises(RuntimeError, match="Hessian of `block.0.fc` is not positive definite"):
        OBSSolver().prune(W, stats, SparsityPattern.parse("unstructured", 0.5))
