"""The generic adapter on tiny random models of many families (random weights: structure tests only).

Each family checks the 'done when' list of issue 10: sparsity 0 keeps the logits, 50 % and 2:4 give the exact
pattern on every targeted matrix, the dynamic choice runs and reports, the generic attention probabilities equal
transformers' `output_attentions=True` (with padding), and a save -> `from_pretrained` round trip keeps the zeros.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_nm_pattern, calib_batches
from families import CAUSAL_FAMILIES, VOCAB, make_family
from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import AttentionInputs, GenericAdapter, get_adapter
from optimum_d2prune.engine import PruningEngine

FAMILIES = sorted(CAUSAL_FAMILIES)


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def target_weights(model, config=None):
    engine = PruningEngine(config or D2PruneConfig(), get_adapter(model, generic=True))
    return {t.name: t.weight() for block in engine.plan(model)[2] for t in block}


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
    adapter = get_adapter(model, generic=True)
    for index, block in enumerate(adapter.blocks(model)):  # both blocks: layer types may alternate
        attention = adapter.attention_module(block)
        seen = {}

        def keep(module, args, kwargs):
            seen["inputs"] = AttentionInputs(args, dict(kwargs))

        handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                model(ids, attention_mask=mask, use_cache=False)  # SDPA: the probabilities must come from the captured call alone
        finally:
            handle.remove()
        refs = adapter.projections(block)
        dense = {p: adapter_rows(block, refs[p]) for p in ("q", "k")}
        probs = adapter.attention_probs(attention, seen["inputs"], dense)
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
        assert float(probs[1][:, valid[1]][..., ~valid[1]].abs().max()) == 0.0  # padded keys get no attention


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
    pruner = prune_generic(model, D2PruneConfig(mask_structure="2:4", attention_update="dynamic"))
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
