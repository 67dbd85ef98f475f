"""The generic adapter on tiny random models of many families (random weights: structure tests only).

Each family checks: sparsity 0 keeps the logits, 50 % and 2:4 give the exact
pattern on every targeted matrix, the dynamic choice runs and reports, the generic attention probabilities equal
transformers' `output_attentions=True` (with padding), and a save -> `from_pretrained` round trip keeps the zeros.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import assert_nm_pattern, calib_batches

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import AttentionInputs, GenericAdapter, get_adapter
from optimum_d2prune.pipeline.engine import PruningEngine
from optimum_d2prune.testing.families import CAUSAL_FAMILIES, EAGER_ONLY, VOCAB, make_family

FAMILIES = sorted(CAUSAL_FAMILIES)


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def target_weights(model, config=None):
    engine = PruningEngine(config or D2PruneConfig(), get_adapter(model))
    return {t.name: t.weight() for t in engine.plan(model).targets()}


def _probs(adapter, attention, inputs, weights):
    """The attention probabilities of every head with the q/k `weights`."""
    scores = adapter.attention_scores(attention, inputs, weights)
    return scores.probs(slice(0, scores.num_heads))


def prune_generic(model, config, batches=None):
    pruner = D2Pruner(config)
    pruner.prune(model, batches or calib_batches(), adapter=GenericAdapter())
    return pruner


def padded_inputs():
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second sequence
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_probs_equal_output_attentions_with_padding(family):
    model = make_family(family, attn_implementation="sdpa")
    ids, mask = padded_inputs()
    adapter = get_adapter(model)
    for index, block in enumerate(adapter.blocks(model)):  # both blocks: layer types may alternate
        # SDPA: the probabilities must come from the captured call alone
        attention, inputs = _capture(model, index, lambda: model(ids, attention_mask=mask, use_cache=False))
        refs = adapter.projections(block)
        dense = {p: adapter_rows(block, refs[p]) for p in ("q", "k")}
        probs = _probs(adapter, attention, inputs, dense)
        implementation = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions[index]
        model.config._attn_implementation = implementation
        expected = expected.float()
        valid = mask.bool()
        torch.testing.assert_close(probs[0], expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(probs[1][:, valid[1]][..., valid[1]], expected[1][:, valid[1]][..., valid[1]],
                                   rtol=1e-4, atol=1e-5)
        assert float(probs[1][:, valid[1]][..., ~valid[1]].abs().max().detach()) == 0.0  # padded keys get no attention


@pytest.mark.parametrize("family", FAMILIES + ["qwen3-moe"])
def test_generic_query_row_subset_equals_the_rows_of_the_full_probabilities(family):
    """The KL term's query subset is taken before the family's eager function (mask rows with it): the same
    log-probabilities as the full ones' rows, for every family (sliding windows, softcapping, sinks, padding)."""
    model = make_family(family, attn_implementation="sdpa")
    ids, mask = padded_inputs()
    adapter = get_adapter(model)
    rows = torch.tensor([0, 4, 5, 11])
    for index, block in enumerate(adapter.blocks(model)):
        attention, inputs = _capture(model, index, lambda: model(ids, attention_mask=mask, use_cache=False))
        refs = adapter.projections(block)
        scores = adapter.attention_scores(attention, inputs, {p: adapter_rows(block, refs[p]) for p in ("q", "k")})
        for heads in scores.chunks(scores.group):
            full = scores.probs(heads).clamp_min(1e-12).log()
            torch.testing.assert_close(scores.log_probabilities(heads, rows), full[:, :, rows], rtol=1e-5, atol=1e-5)


def test_generic_kl_chunk_holds_only_the_query_rows():
    """Memory of one head chunk with 8 of 256 query rows: well under one full `[B, h, T, T]` tensor (only the rows
    asked for are computed)."""
    from optimum_d2prune.testing.memory_counter import LiveTensorBytes

    model = make_family("qwen3-moe", attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (1, 256), generator=torch.Generator().manual_seed(2))
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    attention, inputs = _capture(model, 0, lambda: model(ids, use_cache=False))
    refs = adapter.projections(block)
    scores = adapter.attention_scores(attention, inputs, {p: adapter_rows(block, refs[p]) for p in ("q", "k")})
    heads = slice(0, scores.num_heads)
    full_bytes = scores.num_heads * 256 * 256 * 4
    with LiveTensorBytes() as counter:
        log = scores.log_probabilities(heads, torch.arange(0, 256, 32))
    assert log.shape[2] == 8 and counter.peak < full_bytes / 4, (counter.peak, full_bytes)


def adapter_rows(block, ref):
    from optimum_d2prune.architectures.base import read_rows

    return read_rows(block.get_submodule(ref.module), ref.rows).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_keeps_logits(family):
    model = make_family(family)
    ids, mask = padded_inputs()
    before = logits(model, ids, mask)
    prune_generic(model, D2PruneConfig(sparsity=0.0))
    torch.testing.assert_close(logits(model, ids, mask), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["d2prune", "sparsegpt", "wanda", "magnitude"])
def test_half_sparsity_is_exact_on_every_target(family, method):
    model = make_family(family)
    pruner = prune_generic(model, D2PruneConfig(sparsity=0.5, method=method))
    weights = target_weights(model)
    assert len(weights) >= 2 * 4
    for name, w in weights.items():
        assert int((w == 0).sum()) == w.numel() // 2, name
    assert {r.name for r in pruner.report.layers} == set(weights)
    assert torch.isfinite(logits(model, torch.randint(0, VOCAB, (1, 8)))).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_two_four_on_every_target_and_dynamic_choice_reports(family):
    model = make_family(family)
    pruner = prune_generic(model, D2PruneConfig(mask_structure="2:4", method_options={"skip_update": "dynamic"}))
    assert_nm_pattern(target_weights(model))
    records = pruner.report.attention
    assert [a.block for a in records] == [0, 1]
    for record in records:
        assert record.chosen in ("q", "k", "v") and set(record.kls) == {"q", "k", "v"}
        assert all(v >= 0 for v in record.kls.values()) and max(record.kls.values()) > 0
        unupdated = [r for r in pruner.report.layers if r.block == record.block and not r.updated]
        assert len(unupdated) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_plain_reload_keep_the_zeros(family, tmp_path):
    import transformers

    model = make_family(family)
    prune_generic(model, D2PruneConfig(sparsity=0.5, method="wanda"))
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, w in target_weights(reloaded).items():
        assert int((w == 0).sum()) == w.numel() // 2, name
    ids, mask = padded_inputs()
    torch.testing.assert_close(logits(reloaded, ids, mask), logits(model, ids, mask))


def _capture(model, block_index, run):
    """The `AttentionInputs` block `block_index`'s attention module received during `run()`."""
    adapter = get_adapter(model)
    attention = adapter.attention_module(adapter.blocks(model)[block_index])
    seen = {}

    def keep(module, args, kwargs):
        seen["inputs"] = AttentionInputs(args, dict(kwargs))

    handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return attention, seen["inputs"]


def _pruned_qk(block, refs, seed=0):
    """q/k rows with about half of the entries zeroed (a stand-in for a candidate of the dynamic choice)."""
    g = torch.Generator().manual_seed(seed)
    return {p: adapter_rows(block, refs[p]) * (torch.rand(adapter_rows(block, refs[p]).shape, generator=g) > 0.5)
            for p in ("q", "k")}


@pytest.mark.parametrize("family", ["phi3", "gpt-neox", "gpt2", "gemma3-text", "qwen2"])
def test_swapped_candidate_weights_equal_a_model_holding_them(family):
    """The candidate q/k rows are swapped into the right rows (fused layouts included) and restored afterwards."""
    from optimum_d2prune.architectures.base import write_rows

    model = make_family(family)
    ids, mask = padded_inputs()
    adapter = get_adapter(model)
    block = adapter.blocks(model)[1]
    refs = adapter.projections(block)
    candidate = _pruned_qk(block, refs)
    attention, inputs = _capture(model, 1, lambda: model(ids, attention_mask=mask, use_cache=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probs = _probs(adapter, attention, inputs, candidate)
    dense = _probs(adapter, attention, inputs, {p: adapter_rows(block, refs[p]) for p in ("q", "k")})
    assert not torch.allclose(probs, dense)  # the candidate really changed the probabilities
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was not restored"
    assert model.config._attn_implementation == ("eager" if family in EAGER_ONLY else "sdpa")
    for p in ("q", "k"):
        write_rows(block.get_submodule(refs[p].module), refs[p].rows, candidate[p])
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions[1].float()
    valid = mask.bool()
    torch.testing.assert_close(probs[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs[1][:, valid[1]][..., valid[1]], expected[1][:, valid[1]][..., valid[1]],
                               rtol=1e-4, atol=1e-5)


def _tiny_vision(kind):
    import transformers

    config = getattr(transformers, {"vit": "ViTConfig", "deit": "DeiTConfig", "dinov2": "Dinov2Config"}[kind])(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=6)
    cls = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification",
           "dinov2": "Dinov2ForImageClassification"}[kind]
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).eval()


@pytest.mark.parametrize("family", ["qwen3-mixed", "gemma3-text"])
def test_blocks_of_different_layer_types_get_their_own_arguments(family):
    """Sliding-window and full-attention blocks receive different masks; the capture keeps each block's own."""
    from optimum_d2prune.calibration.hooks import calibration_context
    from optimum_d2prune.pipeline.capture import capture_block_arguments

    model = make_family(family)
    ids, mask = padded_inputs()
    blocks = get_adapter(model).blocks(model)
    real = {}

    def keep(index):
        def hook(module, args, kwargs):
            real[index] = kwargs["attention_mask"]

        return hook

    handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    with calibration_context(model):
        captured = capture_block_arguments(model, blocks, [{"input_ids": ids, "attention_mask": mask}],
                                           torch.device("cpu"))
    assert captured is not None
    masks = [kwargs["attention_mask"] for _, kwargs in captured[0]]
    assert not torch.equal(masks[0], masks[1])
    for i in range(2):
        torch.testing.assert_close(masks[i], real[i])


def test_uniform_blocks_share_block_zero_arguments():
    from optimum_d2prune.calibration.hooks import calibration_context
    from optimum_d2prune.pipeline.capture import capture_block_arguments

    model = make_family("llama")
    blocks = get_adapter(model).blocks(model)
    with calibration_context(model):
        assert capture_block_arguments(model, blocks, [{"input_ids": padded_inputs()[0]}], torch.device("cpu")) is None


class _NoAttention(torch.nn.Module):
    """Blocks without q/k/v (an MLP-mixer-like toy): found by the ModuleList search."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.layers_of_mixers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)) for _ in range(2))
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers_of_mixers:
            h = h + layer(h)
        return self.head(h)


def test_model_without_qkv_gets_one_clear_error_and_baselines_still_run():
    model = _NoAttention().eval()
    with pytest.raises(ValueError, match=r"needs the blocks' q/k/v.*'skip_update': 'none'.*targets.*qkv_names"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    assert all(int((p == 0).sum()) == 0 for p in model.parameters())  # refused before any work
    for method in ("sparsegpt", "wanda", "magnitude"):
        pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method=method))
        pruner.prune(model, calib_batches())
        assert len(pruner.report.layers) == 4
    model = _NoAttention().eval()
    D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": "none"})).prune(model, calib_batches())
    w = model.layers_of_mixers[1][2].weight
    assert int((w == 0).sum()) == w.numel() // 2


def test_model_without_blocks_names_the_fix():
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB))
    with pytest.raises(ValueError, match=r"Could not find the transformer blocks.*block_paths"):
        D2Pruner(D2PruneConfig(sparsity=0.5, method="wanda")).prune(model, calib_batches())


def test_a_small_adapter_can_name_the_blocks():
    from optimum_d2prune.architectures import GenericAdapter

    class Mixers(GenericAdapter):
        block_paths = ("layers_of_mixers",)

    model = _NoAttention().eval()
    assert Mixers().blocks(model) is model.layers_of_mixers


# ------------------------------------------------------------------------------------ vision through the generic path
VISION = ["vit", "deit", "dinov2"]


def _images(num=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(num)]


def _class_logits(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def _vision_targets(model):
    engine = PruningEngine(D2PruneConfig(method="wanda"), get_adapter(model))
    return {t.name: t.weight() for t in engine.plan(model).targets()}


@pytest.mark.parametrize("kind", VISION)
def test_vision_generic_path(kind, tmp_path):
    """ViT, DeiT, Dinov2 through the generic path: sparsity 0, 50 %, 2:4, dynamic choice, probabilities equal
    `output_attentions=True`, and a plain reload keeps the zeros."""
    import transformers

    pixels = torch.randn(2, 3, 16, 16)
    model = _tiny_vision(kind)
    before = _class_logits(model, pixels)
    D2Pruner(D2PruneConfig(sparsity=0.0)).prune(model, _images(), adapter=GenericAdapter())
    torch.testing.assert_close(_class_logits(model, pixels), before, rtol=0, atol=1e-5)

    attention, inputs = _capture(model, 1, lambda: model(pixel_values=pixels))
    adapter = get_adapter(model)
    block = adapter.blocks(model)[1]
    refs = adapter.projections(block)
    probs = _probs(adapter, attention, inputs, {p: adapter_rows(block, refs[p]) for p in ("q", "k")})
    model.config._attn_implementation = "eager"
    expected = model(pixel_values=pixels, output_attentions=True).attentions[1].float()
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)

    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": "dynamic", "strategy": "layer"}))
    pruner.prune(model, _images(), adapter=GenericAdapter())
    assert [a.block for a in pruner.report.attention] == [0, 1]
    assert all(max(a.kls.values()) > 0 for a in pruner.report.attention)
    weights = _vision_targets(model)
    for name, w in weights.items():
        assert int((w == 0).sum()) == w.numel() // 2, name
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    for name, w in _vision_targets(reloaded).items():
        assert int((w == 0).sum()) == w.numel() // 2, name

    model = _tiny_vision(kind)
    D2Pruner(D2PruneConfig(mask_structure="2:4", method="sparsegpt")).prune(model, _images(),
                                                                           adapter=GenericAdapter())
    assert_nm_pattern(_vision_targets(model))


def test_flash_style_padding_mask_is_converted_for_eager():
    """A `[B, T]` padding mask (what flash attention receives) gives the same probabilities as the 4D mask."""
    model = make_family("qwen2")
    ids, mask = padded_inputs()
    attention, inputs = _capture(model, 1, lambda: model(ids, attention_mask=mask, use_cache=False))
    adapter = get_adapter(model)
    block = adapter.blocks(model)[1]
    refs = adapter.projections(block)
    dense = {p: adapter_rows(block, refs[p]) for p in ("q", "k")}
    reference = _probs(adapter, attention, inputs, dense)
    flat = AttentionInputs(inputs.args, {**inputs.kwargs, "attention_mask": mask})
    probs = _probs(adapter, attention, flat, dense)
    keep = mask.bool()
    torch.testing.assert_close(probs[0], reference[0])
    torch.testing.assert_close(probs[1][:, keep[1]][..., keep[1]], reference[1][:, keep[1]][..., keep[1]])


def test_recording_pass_runs_no_block_code_and_restores_hooks():
    """The per-block argument pass runs neither the blocks nor their hooks, and leaves both as they were."""
    from optimum_d2prune.calibration.hooks import calibration_context
    from optimum_d2prune.pipeline.capture import capture_block_arguments

    model = make_family("gemma3-text")
    blocks = get_adapter(model).blocks(model)
    calls = []
    handle = blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
    forward = blocks[1].forward
    with calibration_context(model):
        assert capture_block_arguments(model, blocks, [{"input_ids": padded_inputs()[0]}], torch.device("cpu"))
    assert calls == [] and blocks[1].forward == forward and "forward" not in vars(blocks[1])
    with torch.no_grad():
        model(padded_inputs()[0])
    assert calls == [1]
    handle.remove()


def test_swin_stages_through_the_generic_path(tmp_path):
    """Swin: the blocks found are the stages (patch merging between them is inside a stage); each stage gets its
    own input resolution; a stage holds two attention modules and the dynamic choice is made for each; the generic
    probabilities of a windowed, shifted attention equal `output_attentions`."""
    import transformers

    from optimum_d2prune.architectures.generic import find_qkv
    from optimum_d2prune.testing.families import make_family

    pixels = torch.randn(2, 3, 16, 16)
    images = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = make_family("swin")
    before = _class_logits(model, pixels)
    D2Pruner(D2PruneConfig(sparsity=0.0, method="sparsegpt")).prune(model, images)
    torch.testing.assert_close(_class_logits(model, pixels), before, rtol=0, atol=1e-5)
    pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": "dynamic", "strategy": "layer"}))
    pruner.prune(make_family("swin"), images)
    records = pruner.report.attention
    assert [(a.block, a.attention) for a in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(a.chosen in ("q", "k", "v") and max(a.kls.values()) > 0 for a in records)
    unupdated = [r.name for r in pruner.report.layers if not r.updated]
    assert len(unupdated) == 4 and len({n.rsplit(".", 2)[0] for n in unupdated}) == 4  # one per attention
    assert "| 0.1 |" in pruner.report.attention_table()

    attention = model.swin.encoder.layers[0].blocks[1].attention  # shifted windows, with a mask
    _, refs = find_qkv(attention)
    seen = {}

    def keep(module, args, kwargs):
        seen["inputs"] = AttentionInputs(args, dict(kwargs))

    handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_attentions=True).attentions[0].float()
    model.config._attn_implementation = "sdpa"
    handle.remove()
    dense = {p: attention.get_submodule(refs[p].module).weight.float() for p in ("q", "k")}
    probs = _probs(GenericAdapter(), attention, seen["inputs"], dense)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)

    for method, structure in (("sparsegpt", "unstructured"), ("wanda", "2:4"), ("d2prune", "unstructured")):
        model = make_family("swin")
        extra = {"method_options": {"skip_update": "none"}} if method == "d2prune" else {}
        config = D2PruneConfig(sparsity=0.5, method=method, mask_structure=structure, **extra)
        D2Pruner(config).prune(model, images)
        weights = _vision_targets(model)
        assert len(weights) == 2 * 2 * 6 + 1  # 2 stages x 2 blocks x 6 Linears + the first stage's patch merging
        if structure == "2:4":
            assert_nm_pattern(weights)
        else:
            for name, w in weights.items():
                assert int((w == 0).sum()) == w.numel() // 2, name
    model.save_pretrained(tmp_path)
    reloaded = transformers.SwinForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_class_logits(reloaded, pixels), _class_logits(model, pixels))


def test_per_sequence_split_gives_the_whole_batch_kl():
    """The KL term is computed one sequence at a time (memory); the sum over sequences equals the batch's."""
    from optimum_d2prune.methods.d2prune.attention import attention_kl, split_sequences

    model = make_family("qwen2")
    ids, mask = padded_inputs()
    attention, captured = _capture(model, 1, lambda: model(ids, attention_mask=mask, use_cache=False))
    inputs = AttentionInputs(captured.args, captured.kwargs, mask.bool())
    adapter = get_adapter(model)
    block = adapter.blocks(model)[1]
    refs = adapter.projections(block)
    dense = {p: adapter_rows(block, refs[p]) for p in ("q", "k")}
    candidate = _pruned_qk(block, refs)

    def kl(one):
        reference = _probs(adapter, attention, one, dense).clamp_min(1e-12).log()
        return attention_kl(_probs(adapter, attention, one, candidate), reference, one.token_mask)

    parts = [kl(one) for one in split_sequences(inputs)]
    total, rows = kl(inputs)
    assert len(parts) == 2 and sum(n for _, n in parts) == rows == 4 * (12 + 9)
    assert sum(t for t, _ in parts) == pytest.approx(total, rel=1e-5) and total > 0
