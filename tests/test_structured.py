"""Structured shrinking: every mode saves a standard checkpoint that plain `from_pretrained` reloads with the same
logits; the compensation is the least-squares optimum; impossible requests are refused before any work."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

from optimum_d2prune.errors import ConfigError, InputError, UnsupportedModelError
from optimum_d2prune.structured import StructuredConfig, save_shrunk, shrink, valid_ratios
from optimum_d2prune.structured.compensation import bias_shift, least_squares_refit, output_error
from optimum_d2prune.structured.saliency import obs_select
from optimum_d2prune.structured.statistics import ConsumerStatistics
from optimum_d2prune.testing.families import FAMILIES, VOCAB, make_family


def _batches(family: str, num: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    if FAMILIES[family].kind == "image":
        return [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g)} for _ in range(num)]
    batches = []
    for _ in range(num):
        ids = torch.randint(3, VOCAB, (2, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # left padding: statistics must leave it out
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _ratio(model, mode: str, position: int) -> float:
    """An exactly expressible ratio: the `position`-th of the mode's valid ratios."""
    return valid_ratios(model, mode)[position]


# family, mode, position in the valid ratios, method, config fields expected after the shrink
MODE_CASES = [
    ("llama", "channels", 20, "d2prune", {"intermediate_size": 107}),
    ("llama", "heads", 0, "d2prune", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    ("llama", "blocks", 0, "block_influence", {"num_hidden_layers": 1}),
    ("llama", "channels", 40, "flap", {"intermediate_size": 87, "mlp_bias": True}),
    ("llama", "channels", 10, "magnitude", {"intermediate_size": 117}),
    ("llama", "heads", 0, "wanda", {"num_attention_heads": 2, "num_key_value_heads": 1}),
    ("qwen3-mixed", "channels", 30, "d2prune", {"intermediate_size": 97}),
    ("qwen3-mixed", "heads", 0, "d2prune", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    ("gemma3-text", "heads", 0, "d2prune", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    ("gemma3-text", "blocks", 0, "block_influence", {"num_hidden_layers": 1}),
    ("gemma3-text", "channels", 30, "wanda", {"intermediate_size": 97}),
    ("gpt2", "channels", 40, "d2prune", {"n_inner": 215}),
    ("gpt2", "blocks", 0, "angular", {"num_hidden_layers": 1}),
    ("qwen3-moe", "experts", 0, "reap", {"num_experts": 4}),
    ("qwen3-moe", "heads", 0, "d2prune", {"num_attention_heads": 2, "num_key_value_heads": 1}),
    ("mixtral", "experts", 1, "reap", {"num_local_experts": 3}),
    ("mixtral", "experts", 0, "frequency", {"num_local_experts": 4}),
    ("vit", "channels", 10, "d2prune", {"intermediate_size": 53}),
    ("vit", "heads", 1, "d2prune", {"num_attention_heads": 2, "head_dim": 8}),
    ("vit", "blocks", 0, "block_influence", {"num_hidden_layers": 1}),
]


@pytest.mark.parametrize("family,mode,position,method,fields", MODE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in MODE_CASES])
def test_shrunk_checkpoint_reloads_with_plain_from_pretrained(tmp_path, family, mode, position, method, fields):
    torch.manual_seed(0)
    model = make_family(family)
    batches = _batches(family)
    ratio = _ratio(model, mode, position)
    before = sum(p.numel() for p in model.parameters())
    report = shrink(model, batches, StructuredConfig(mode=mode, ratio=ratio, saliency=method))
    assert report.achieved_ratio == pytest.approx(ratio)
    assert report.params_after < before and report.params_after == sum(p.numel() for p in model.parameters())
    assert before - report.params_after == pytest.approx(ratio * report.block_params_before,
                                                         abs=0.01 * report.block_params_before)
    path = save_shrunk(model, tmp_path / "shrunk", report)
    auto = AutoModelForImageClassification if FAMILIES[family].kind == "image" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(path).eval()
    reloaded.config._attn_implementation = model.config._attn_implementation
    config = reloaded.config.get_text_config()
    for key, value in fields.items():
        assert getattr(config, key) == value, key
    assert sum(p.numel() for p in reloaded.parameters()) == report.params_after
    inputs = {k: v for k, v in batches[0].items()}
    with torch.no_grad():
        expected = model(**inputs).logits
        got = reloaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    card = (path / "README.md").read_text()
    assert "Removed" in card and mode in card


LAYER_TYPES_CASES = [
    # family, the block whose output equals its input (it must be the one removed), layer_types after
    ("gemma3-text", 0, ["full_attention"]),
    ("gemma3-text", 1, ["sliding_attention"]),
    ("qwen3-mixed", 0, ["sliding_attention"]),
]


def _make_identity(block: torch.nn.Module) -> None:
    """Zero the block's output projections: its residual branches add nothing, so output == input."""
    for name, module in block.named_modules():
        if name.endswith(("o_proj", "down_proj", "c_proj")):
            module.weight.data.zero_()


@pytest.mark.parametrize("family,identity,layer_types", LAYER_TYPES_CASES)
def test_blocks_mode_removes_the_identity_block_and_updates_layer_types(tmp_path, family, identity, layer_types):
    model = make_family(family)
    _make_identity(model.model.layers[identity])
    report = shrink(model, _batches(family), StructuredConfig(mode="blocks", ratio=0.5))
    assert report.removed_blocks == [identity]
    assert report.block_scores[identity] == pytest.approx(0.0, abs=1e-6)
    assert model.config.layer_types == layer_types
    reloaded = AutoModelForCausalLM.from_pretrained(save_shrunk(model, tmp_path / "s", report)).eval()
    assert reloaded.config.layer_types == layer_types


@pytest.mark.parametrize("method,expected", [("block_influence", [1, 3]), ("angular", [3, 4])])
def test_block_metrics_choose_the_blocks_that_change_least(method, expected):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    # block 1 is an identity, blocks 3 and 4 nearly (3 closer than 4): ShortGPT takes the two blocks of least
    # influence (1, 3); the angular distance takes the most similar span of two consecutive blocks (3-4)
    for index, noise in ((1, 0.0), (3, 1e-3), (4, 1e-2)):
        _make_identity(model.model.layers[index])
        model.model.layers[index].mlp.down_proj.weight.data.normal_(0, noise)
    report = shrink(model, _batches("llama"), StructuredConfig(mode="blocks", ratio=2 / 6, saliency=method))
    assert report.removed_blocks == expected


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_experts_mode_removes_an_expert_that_adds_nothing_and_its_router_row(family):
    model = make_family(family)
    experts = model.model.layers[0].mlp.experts
    router = model.model.layers[0].mlp.gate
    experts.down_proj.data[3].zero_()  # expert 3 of block 0 outputs zeros: REAP score 0
    kept_router = torch.cat([router.weight.data[:3], router.weight.data[4:]])
    report = shrink(model, _batches(family), StructuredConfig(mode="experts", ratio=valid_ratios(model, "experts")[0]))
    assert report.units[0].removed == [3]
    torch.testing.assert_close(model.model.layers[0].mlp.gate.weight.data, kept_router)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4


def test_compensation_lowers_the_consumer_error(tmp_path):
    model = make_family("llama")
    batches = _batches("llama")
    ratio = _ratio(model, "channels", 40)
    compensated = shrink(copy.deepcopy(model), batches, StructuredConfig(mode="channels", ratio=ratio))
    masked = shrink(model, batches, StructuredConfig(mode="channels", ratio=ratio, compensation="none"))
    for with_ls, without in zip(compensated.units, masked.units, strict=True):
        assert with_ls.error < with_ls.error_masked
        assert without.error == pytest.approx(without.error_masked)


def test_flap_adds_the_mean_of_the_removed_inputs_to_a_new_bias():
    model = make_family("llama")
    report = shrink(model, _batches("llama"), StructuredConfig(mode="channels", ratio=_ratio(model, "channels", 40),
                                                                saliency="flap"))
    assert report.added_biases and model.config.mlp_bias is True
    down = model.model.layers[0].mlp.down_proj
    assert down.bias is not None and float(down.bias.detach().abs().max()) > 0
    assert float(model.model.layers[0].mlp.gate_proj.bias.detach().abs().max()) == 0  # only the consumer's bias moves


# ------------------------------------------------------------------------------------ the least-squares optimum
def _correlated(tokens: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64)
    return torch.randn(tokens, features, generator=g, dtype=torch.float64) @ mix + 0.3


@pytest.mark.parametrize("with_bias", [False, True])
def test_least_squares_refit_is_the_closed_form_optimum(with_bias):
    x = _correlated(400, 12, seed=1)  # [tokens, features]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    stats = ConsumerStatistics(12, torch.device("cpu"), dtype=torch.float64)
    stats.add(x[:150])
    stats.add(x[150:])
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    if with_bias:
        used, gram = torch.cat([w, b[:, None]], 1), stats.augmented_gram()
        keep_used = torch.cat([keep, torch.tensor([12])])
        design = torch.cat([x[:, keep], torch.ones(400, 1, dtype=torch.float64)], 1)
        target = x @ w.t() + b
    else:
        used, gram, keep_used, design, target = w, stats.gram, keep, x[:, keep], x @ w.t()
    refit = least_squares_refit(used, gram, keep_used, damp_percent=0.0, features=12)
    optimum = torch.linalg.lstsq(design, target).solution.t()
    torch.testing.assert_close(refit, optimum, rtol=1e-7, atol=1e-8)
    masked = torch.zeros_like(used)
    masked[:, keep_used] = used[:, keep_used]
    compensated = torch.zeros_like(used)
    compensated[:, keep_used] = refit
    assert output_error(used - compensated, gram) < 0.9 * output_error(used - masked, gram)


def test_bias_shift_removes_the_mean_output_error():
    x = _correlated(300, 8, seed=3)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    removed = torch.tensor([1, 4, 6])
    kept = torch.tensor([0, 2, 3, 5, 7])
    shift = bias_shift(w, x.mean(0), removed)
    residual = x @ w.t() - (x[:, kept] @ w[:, kept].t() + shift)
    torch.testing.assert_close(residual.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("group_size", [1, 3])
def test_obs_selection_first_choice_is_the_exact_best_group(group_size):
    x = _correlated(500, 12, seed=5)
    w = torch.randn(6, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    gram = x.t() @ x
    groups = torch.arange(12).view(-1, group_size)
    errors = []
    for g in range(groups.shape[0]):
        keep = torch.tensor([c for c in range(12) if c not in set(groups[g].tolist())])
        new = torch.zeros_like(w)
        new[:, keep] = least_squares_refit(w, gram, keep, damp_percent=0.0)
        errors.append(output_error(w - new, gram))
    chosen = obs_select(w, gram, groups, count=1, rounds=1)
    assert chosen.tolist() == [min(range(len(errors)), key=errors.__getitem__)]


# ------------------------------------------------------------------------------------------------- refusals
REFUSALS = [
    # family, config, batches?, error, words in the message
    ("gpt2", dict(mode="heads", ratio=0.1, ratio_tolerance=1.0), True, UnsupportedModelError, "head size"),
    ("llama", dict(mode="heads", ratio=0.1), True, ConfigError, "0.1661"),
    ("llama", dict(mode="heads", ratio=0.4), True, ConfigError, "nearest valid"),
    ("llama", dict(mode="blocks", ratio=0.3), True, ConfigError, "0.5000 (1 blocks)"),
    ("mixtral", dict(mode="channels", ratio=0.1), True, UnsupportedModelError, "mode='experts'"),
    ("llama", dict(mode="experts", ratio=0.1), True, UnsupportedModelError, "experts module"),
    ("qwen3-mixed", dict(mode="channels", ratio=0.1, saliency="flap"), True, ConfigError, "mlp_bias"),
    ("llama", dict(mode="channels", ratio=0.1), False, InputError, "calibration batches"),
]


@pytest.mark.parametrize("family,settings,with_data,error,words", REFUSALS,
                         ids=[f"{r[0]}-{r[1]['mode']}-{r[1]['ratio']}" for r in REFUSALS])
def test_impossible_requests_are_refused_before_any_work(family, settings, with_data, error, words):
    model = make_family(family)
    state = copy.deepcopy(model.state_dict())
    config_before = model.config.to_dict()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        shrink(model, _batches(family) if with_data else None, StructuredConfig(**settings))
    assert model.config.to_dict() == config_before
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


BAD_CONFIGS = [
    (dict(mode="width"), "`mode`"),
    (dict(ratio=1.0), "`ratio`"),
    (dict(ratio=0), "`ratio`"),
    (dict(mode="channels", saliency="reap"), "does not apply"),
    (dict(mode="blocks", compensation="least_squares"), "compensation='none'"),
    (dict(compensation="lstsq"), "`compensation`"),
    (dict(compensation="none", add_bias=True), "add_bias"),
    (dict(channel_multiple=0), "channel_multiple"),
    (dict(damp_percent=-1.0), "damp_percent"),
]


@pytest.mark.parametrize("settings,words", BAD_CONFIGS, ids=[w for _, w in BAD_CONFIGS])
def test_invalid_config_is_refused(settings, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        StructuredConfig(**settings)


def test_magnitude_needs_no_data_and_channel_multiple_is_kept(tmp_path):
    model = make_family("llama")
    config = StructuredConfig(mode="channels", ratio=valid_ratios(model, "channels",
                                                                    StructuredConfig(channel_multiple=32))[1],
                              saliency="magnitude", channel_multiple=32)
    report = shrink(model, None, config)
    assert model.config.intermediate_size == 64
    assert report.units[0].error is None


def test_save_refuses_a_folder_it_did_not_make(tmp_path):
    from optimum_d2prune.errors import OutputPathError

    model = make_family("llama")
    report = shrink(model, None, StructuredConfig(mode="channels", ratio=valid_ratios(model, "channels")[5],
                                                  saliency="magnitude"))
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="overwrite=True"):
        save_shrunk(model, folder, report)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    card = (save_shrunk(model, tmp_path / "new", report) / "README.md").read_text()
    assert "`intermediate_size` 128 → 122" in card and "convert_hf_to_gguf.py" in card


def test_a_failure_after_a_cut_block_says_the_model_must_be_reloaded(monkeypatch):
    from optimum_d2prune.errors import ModelStateError
    from optimum_d2prune.structured import pipeline as shrink_module

    calls = []
    original = shrink_module.least_squares_refit

    def failing_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated solver failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(shrink_module, "least_squares_refit", failing_second_time)
    model = make_family("llama")
    with pytest.raises(ModelStateError, match="reload the model"):
        shrink(model, _batches("llama"), StructuredConfig(mode="channels", ratio=valid_ratios(model, "channels")[5]))


@pytest.mark.parametrize("mode,options", [("channels", {}), ("heads", {"saliency": "wanda"}), ("blocks", {})])
def test_shrink_method_through_the_pruner_is_the_structured_shrink(tmp_path, mode, options):
    """`D2PruneConfig(method="shrink")` shrinks exactly as `structured.shrink` does, and `D2Pruner.save` writes the
    shrunk checkpoint and its record."""
    from optimum_d2prune import D2PruneConfig, D2Pruner

    torch.manual_seed(0)
    model = make_family("llama")
    direct = copy.deepcopy(model)
    batches = _batches("llama")
    ratio = _ratio(model, mode, 0)
    pruner = D2Pruner(D2PruneConfig(method="shrink", sparsity=ratio, method_options={"mode": mode, **options}))
    pruner.prune(model, batches)
    shrink(direct, batches, StructuredConfig(mode=mode, ratio=ratio, **options))
    assert model.state_dict().keys() == direct.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    path = pruner.save(model, tmp_path / "out")
    assert (path / "structured_shrink.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in reloaded.parameters()) == pruner.report.params_after
