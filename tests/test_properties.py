"""Property tests (hypothesis) of the mask rules on random shapes, sparsities, N:M patterns, dead inputs and dtypes.

- exact count: every solver leaves exactly `round_half_up(s · numel)` zeros, dead inputs included;
- N:M: exactly N zeros in every group of M consecutive inputs of every row;
- λ1 = λ2 = 0: D²Prune's update solver picks SparseGPT's mask (the published algorithm, `test_solvers`);
- the OBS update never makes the layer error worse than zeroing the same mask without update (up to the
  1 % margin that keeps near-ties stable across data-parallel ranks).
Shapes are small and `max_examples` low so the file runs in seconds.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
import torch  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from optimum_d2prune import D2PruneConfig  # noqa: E402
from optimum_d2prune.calibration.statistics import InputStatistics, LinearStatistics  # noqa: E402
from optimum_d2prune.masks import kth_smallest, lowest_k_mask  # noqa: E402
from optimum_d2prune.methods.registry import get_method  # noqa: E402
from optimum_d2prune.methods.solvers import DualTaylor, MagnitudeSolver, OBSSolver, WandaSolver  # noqa: E402
from optimum_d2prune.methods.solvers.base import relative_error  # noqa: E402
from optimum_d2prune.methods.solvers.obs import MASKING_MARGIN  # noqa: E402
from optimum_d2prune.patterns import SparsityPattern, group_zero_counts, round_half_up  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NM = ((1, 2), (2, 4), (4, 8), (3, 4), (2, 6), (1, 3))


@st.composite
def layers(draw, nm=None, dead=True):
    """(weight, stats, pattern, block_size): a random Linear with random calibration inputs."""
    rows = draw(st.integers(1, 12))
    if nm is None:
        cols = draw(st.integers(2, 80))
        pattern = SparsityPattern.parse("unstructured", draw(st.floats(0.0, 0.95)))
        block_size = draw(st.sampled_from((4, 16, 32, 128)))
    else:
        n, m = draw(st.sampled_from(NM))
        cols = m * draw(st.integers(1, 10))
        pattern = SparsityPattern.parse(f"{n}:{m}", 0.5)
        block_size = m * draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=g) + 0.01).to(dtype)
    weight[weight == 0] = 1.0  # no zeros before pruning: every zero counted is one the solver made
    dead_cols = draw(st.sets(st.integers(0, cols - 1), max_size=cols // 2)) if dead else set()
    x = torch.randn(max(4 * cols, 32), cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    x[:, sorted(dead_cols)] = 0
    inputs = InputStatistics(cols, "hessian", torch.device("cpu"))
    inputs.add(x)
    stats = LinearStatistics(inputs, seq_len=x.shape[0])
    stats.add_output(x @ weight.float().t())
    return weight, stats, pattern, block_size, x


def _solvers(block_size: int):
    return [
        OBSSolver(block_size=block_size),
        OBSSolver(dual_taylor=DualTaylor(1.0, -0.5, 50.0), block_size=block_size),
        OBSSolver(block_size=block_size, refit_steps=3),
        WandaSolver(),
        WandaSolver(dual_taylor=DualTaylor(1.0, 0.0, 50.0)),
        MagnitudeSolver(),
    ]


@SETTINGS
@given(layers())
def test_exact_count_for_every_solver(layer):
    weight, stats, pattern, block_size, _ = layer
    expected = round_half_up(pattern.sparsity * weight.numel())
    for solver in _solvers(block_size):
        out = solver.prune(weight, stats, pattern)
        assert int(out.mask.sum()) == expected, solver.name
        assert int((out.weight == 0).sum()) == expected, solver.name
        assert torch.equal(out.weight == 0, out.mask), solver.name


@SETTINGS
@given(layers(nm=True))
def test_nm_invariant_for_every_solver(layer):
    weight, stats, pattern, block_size, _ = layer
    rows, cols = weight.shape
    for solver in _solvers(block_size):
        out = solver.prune(weight, stats, pattern)
        zeros = (out.weight == 0).reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        assert bool((zeros == pattern.n).all()), solver.name


@SETTINGS
@given(st.floats(0.0, 0.99), st.lists(st.integers(1, 300), min_size=1, max_size=12))
def test_group_counts_add_up_and_stay_within_one(sparsity, sizes):
    counts = group_zero_counts(sparsity, sizes)
    assert sum(counts) == round_half_up(sparsity * sum(sizes))
    assert all(abs(c - sparsity * s) <= 1 + 1e-9 and 0 <= c <= s for c, s in zip(counts, sizes))


@SETTINGS
@given(st.integers(1, 4000), st.floats(0.0, 1.0), st.floats(-2.0, 3.0), st.booleans(), st.integers(0, 2**16))
def test_kth_smallest_from_a_guess_is_the_exact_kth_value(numel, fraction, guess_offset, ties, seed):
    """The guessed band (ADMM's projection passes the previous step's threshold) changes the cost, never the value
    or the mask: guesses inside, far below and far above the answer, zero, ties and -inf (dead inputs)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.rand(numel, generator=gen)
    if ties:
        flat = (flat * 8).floor()
    flat[torch.rand(numel, generator=gen) < 0.05] = float("-inf")
    k = max(1, min(numel, round(fraction * numel)))
    exact = torch.kthvalue(flat, k).values
    guess = exact + guess_offset * (float(exact.abs()) if torch.isfinite(exact) else 1.0)
    found = kth_smallest(flat, k, near=guess)
    assert torch.equal(found, exact)
    if k < numel:
        assert torch.equal(lowest_k_mask(flat, k, found), lowest_k_mask(flat, k))


@SETTINGS
@given(st.data())
def test_zero_lambdas_give_sparsegpt_mask(data):
    from test_solvers import reference_sparsegpt

    nm = data.draw(st.booleans())
    weight, stats, pattern, _, x = data.draw(layers(nm=True if nm else None, dead=False))
    weight = weight.float()
    cols = weight.shape[1]
    # one column block: the published algorithm rounds each block with Python's round (ties to even)
    assume(pattern.is_nm or abs(pattern.sparsity * weight.numel() % 1 - 0.5) > 1e-6)
    config = D2PruneConfig(method="d2prune", mask_structure=pattern.structure, sparsity=pattern.sparsity,
                           method_options={"lambda1": 0.0, "lambda2": 0.0, "refit_steps": 0,
                                           "block_size": cols if pattern.is_nm else 128})
    method = get_method(config.method)(config.method_options, config.pattern)
    method.setup(x.shape[0])
    update = method.solver
    out = update.prune(weight, stats, pattern)
    _, ref_mask = reference_sparsegpt(weight, [x], pattern.sparsity, pattern.n, pattern.m, blocksize=cols)
    assert torch.equal(out.mask, ref_mask)


@SETTINGS
@given(st.data())
def test_obs_update_never_worse_than_mask_only(data):
    weight, stats, pattern, block_size, _ = data.draw(layers(nm=data.draw(st.sampled_from((None, True)))))
    for solver in (OBSSolver(block_size=block_size), OBSSolver(DualTaylor(1.0, 0.0, 50.0), block_size=block_size),
                   OBSSolver(block_size=block_size, refit_steps=2)):
        out = solver.prune(weight, stats, pattern)
        masked = weight.float().masked_fill(out.mask, 0)
        mask_only = relative_error(weight, masked, stats)
        assert out.error <= mask_only * (1 + MASKING_MARGIN + 1e-5) + 1e-7, (solver.name, out.error, mask_only)


@pytest.mark.parametrize("structure", ["2:6", "unstructured"])
def test_obs_update_never_worse_than_mask_only_on_small_layers(structure):
    """Small 3x12 layers, where the plain sweep ends worse than masking on a few percent of the seeds."""
    pattern = SparsityPattern.parse(structure, 0.5)
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(3, 12, generator=g)
        x = torch.randn(48, 12, generator=g) * (torch.rand(12, generator=g) * 2 + 0.1)
        inputs = InputStatistics(12, "hessian", torch.device("cpu"))
        inputs.add(x)
        stats = LinearStatistics(inputs, seq_len=48)
        stats.add_output(x @ weight.t())
        out = OBSSolver(block_size=6 if pattern.is_nm else 128).prune(weight, stats, pattern)
        mask_only = relative_error(weight, weight.masked_fill(out.mask, 0), stats)
        assert out.error <= mask_only * (1 + MASKING_MARGIN + 1e-5), (seed, out.error, mask_only)
