"""Bad input fails early with a clear error, and the model is left untouched."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import calib_batches, make_tiny
from optimum_d2prune import D2PruneConfig, D2Pruner


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, r"`sparsity` must be a number in \[0, 1\)"),
        ({"sparsity": "half"}, r"`sparsity` must be a number"),
        ({"mask_structure": "5:4"}, r"0 < N < M"),
        ({"mask_structure": "2-4"}, r"\"N:M\""),
        ({"method": "obc"}, r"`method` must be one of"),
        ({"attention_update": "o"}, r"`attention_update` must be one of"),
        ({"dynamic_strategy": "ppl"}, r"`dynamic_strategy` must be one of"),
        ({"activation_scale": 0}, r"`activation_scale` must be a positive number"),
        ({"activation_scale": "big"}, r"`activation_scale`"),
        ({"damp_percent": 0}, r"`damp_percent` must be in \(0, 1\)"),
        ({"block_size": 0}, r"`block_size` must be a positive integer"),
        ({"kl_weight": -1}, r"`kl_weight` must be >= 0"),
        ({"ignore": "mlp"}, r"`ignore` must be a list"),
        ({"targets": ["("]}, r"invalid regex"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D2PruneConfig(**kwargs)


def test_config_round_trips(tmp_path):
    config = D2PruneConfig(mask_structure="4:8", method="d2prune", lambda2=-0.5, activation_scale="auto",
                           ignore=["lm_head"], kl_weight=0.5)
    assert config.sparsity == 0.5
    assert D2PruneConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "c.json"
    config.to_json_file(path)
    assert D2PruneConfig.from_json_file(path) == config
    assert json.loads(path.read_text())["mask_structure"] == "4:8"
    with pytest.raises(ValueError, match="Unknown D2PruneConfig field"):
        D2PruneConfig.from_dict({"sparsity": 0.5, "sparsityy": 0.2})


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
        ([{"labels": torch.zeros(2)}], "neither `input_ids` nor `pixel_values`"),
        (["some text"], "expected a LongTensor"),
        (torch.randint(0, 96, (2, 8)), "not a single Tensor"),
        (42, "must be an iterable"),
    ],
)
def test_bad_calibration_data(loader, match):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, loader)
    assert_untouched(model, before)


def test_unsupported_architecture_says_how_to_add_one():
    model = torch.nn.Sequential(torch.nn.Embedding(96, 32), torch.nn.Linear(32, 96)).eval()  # no block list
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Could not find the transformer blocks.*register_adapter"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    assert_untouched(model, before)


def test_nm_incompatible_width_fails_before_work():
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a multiple of M=6"):
        D2Pruner(D2PruneConfig(mask_structure="2:6")).prune(model, calib_batches())
    assert_untouched(model, before)


def test_nothing_to_prune():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="No Linear layer matches"):
        D2Pruner(D2PruneConfig(targets=["nonexistent"])).prune(model, calib_batches())


def test_config_and_kwargs_are_exclusive():
    with pytest.raises(ValueError, match="either a D2PruneConfig or keyword"):
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


def test_global_search_needs_data_to_hold_out():
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_sequence = [torch.randint(0, 96, (1, 16))]
    with pytest.raises(ValueError, match="at least 2 samples"):
        D2Pruner(D2PruneConfig(dynamic_strategy="global")).prune(model, one_sequence)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
