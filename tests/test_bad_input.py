"""Bad input fails early with a clear error, and the model is left untouched (bad configuration values:
test_configuration.py)."""

from __future__ import annotations

import pytest
import torch
from tinymodels import calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.errors import D2PruneError, ModelStateError


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "loader,match",
    [
        ([], "yielded no batches"),
        ([torch.randint(0, 96, (2, 1))], "at least 2 tokens"),
        ([torch.randint(0, 96, (2, 0))], "at least 2 tokens"),
        ([{"input_ids": torch.randint(0, 96, (1, 8)), "attention_mask": torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]])}],
         "fewer than 2 attended tokens"),
        ([{"input_ids": torch.randint(0, 96, (1, 8)), "attention_mask": torch.ones(1, 5)}], "does not match"),
        ([{"labels": torch.zeros(2)}],
         r"has none of input_ids, pixel_values, input_features, input_values \(keys: \[.labels.\]\)"),
        (["some text"], "expected a LongTensor"),
        (torch.randint(0, 96, (2, 8)), "not a single Tensor"),
        (42, "must be an iterable"),
    ],
)
def test_bad_calibration_data(loader, match):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(D2PruneError, match=match):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, loader)
    assert_untouched(model, before)


def test_unsupported_architecture_says_how_to_add_one():
    model = torch.nn.Sequential(torch.nn.Embedding(96, 32), torch.nn.Linear(32, 96)).eval()  # no block list
    before = snapshot(model)
    with pytest.raises(D2PruneError, match=r"Could not find the transformer blocks.*register_adapter"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    assert_untouched(model, before)


def test_nm_incompatible_width_fails_before_work():
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(D2PruneError, match="not a multiple of M=6"):
        D2Pruner(D2PruneConfig(mask_structure="2:6")).prune(model, calib_batches())
    assert_untouched(model, before)


def test_nothing_to_prune():
    model = make_tiny("llama")
    with pytest.raises(D2PruneError, match="No Linear layer matches"):
        D2Pruner(D2PruneConfig(targets=["nonexistent"])).prune(model, calib_batches())


def test_config_and_kwargs_are_exclusive():
    with pytest.raises(D2PruneError, match="either a D2PruneConfig or keyword"):
        D2Pruner(D2PruneConfig(), sparsity=0.5)
    assert D2Pruner(sparsity=0.6).config.sparsity == 0.6


def test_error_mid_run_restores_model_state():
    """A failure inside the run leaves no hooks behind and restores use_cache and the training flag."""
    model = make_tiny("llama")
    model.train()
    model.config.use_cache = True
    block = model.model.layers[1]

    def boom(module, args):
        if not module.training:
            raise RuntimeError("boom")

    handle = block.mlp.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    handle.remove()
    assert model.training and model.config.use_cache is True
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("failing_block,partly_pruned", [(0, False), (1, True)])
def test_a_failed_run_says_whether_the_model_must_be_reloaded(failing_block, partly_pruned):
    """A failure before any weight changed leaves a model that prunes again as a fresh one; a failure after block 0
    was written refuses the next `prune` on that model with the remedy."""
    model = make_tiny("llama")

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.model.layers[failing_block].mlp.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    handle.remove()
    if partly_pruned:
        with pytest.raises(ModelStateError, match="partly pruned.*Reload the model"):
            D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
        return
    D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    fresh = make_tiny("llama")
    D2Pruner(D2PruneConfig(sparsity=0.5)).prune(fresh, calib_batches())
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_global_search_needs_data_to_hold_out():
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_sequence = [torch.randint(0, 96, (1, 16))]
    with pytest.raises(D2PruneError, match="at least 2 samples"):
        D2Pruner(D2PruneConfig(method_options={"strategy": "global"})).prune(model, one_sequence)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
