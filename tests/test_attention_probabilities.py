"""The KL term's attention probabilities equal the model's own eager attention weights, on every tested family.

The attention module gets its captured mask exactly as the model gave it (SDPA's boolean mask, BLOOM's additive
one, MPT's boolean mask marking the *masked* entries), so the probabilities computed for candidate q/k weights are
those of a model holding these weights, run with eager attention.
"""

from __future__ import annotations

import pytest
import torch

from optimum_d2prune.architectures import AttentionInputs, GenericAdapter
from optimum_d2prune.architectures.base import read_rows, write_rows
from optimum_d2prune.architectures.generic import _attention_weights
from optimum_d2prune.testing.families import FAMILIES, VOCAB, make_family


def _inputs(family):
    """(model kwargs, per-sequence validity [B, T] or None): left padding in the second text sequence."""
    if FAMILIES[family].kind == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}, None
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, mask.bool()


def _candidate(module, refs, seed):
    """q/k rows with about half of their entries zeroed (a candidate of the dynamic choice)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in ("q", "k"):
        w = read_rows(module.get_submodule(refs[p].module), refs[p].rows).float()
        out[p] = w * (torch.rand(w.shape, generator=g) > 0.5)
    return out


def _run_capturing(model, attention, kwargs, output=False):
    """Run the model; return what `attention` received (and, with `output`, the weights it returned)."""
    seen = {}

    def before(module, args, kw):
        seen["inputs"] = AttentionInputs(args, dict(kw))

    def after(module, args, kw, out):
        seen["weights"] = _attention_weights(out)

    handles = [attention.register_forward_pre_hook(before, with_kwargs=True)]
    if output:
        handles.append(attention.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**kwargs, **({"output_attentions": True} if output else {}))
    finally:
        for h in handles:
            h.remove()
    return seen


def _compare(probs, expected, valid):
    if valid is None:
        torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)
        return
    for b in range(probs.shape[0]):
        keep = valid[b]
        torch.testing.assert_close(probs[b][:, keep][..., keep], expected[b][:, keep][..., keep],
                                   rtol=1e-4, atol=1e-5)
        if not keep.all():
            assert float(probs[b][:, keep][..., ~keep].abs().max()) == 0.0  # padded keys: no attention


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kl_probabilities_equal_the_eager_weights_of_a_model_holding_the_candidate(family):
    model = make_family(family)  # SDPA where transformers supports it, else eager
    implementation = model.config._attn_implementation
    adapter = GenericAdapter()
    adapter.validate(model)
    kwargs, valid = _inputs(family)
    checked = 0
    for index, block in enumerate(adapter.blocks(model)):
        for number, (attention, refs) in enumerate(adapter.attention_groups(block)):
            inputs = _run_capturing(model, attention, kwargs)["inputs"]
            candidate = _candidate(block, refs, seed=10 * index + number)
            with torch.no_grad():  # as the engine calls it
                scores = adapter.attention_scores(attention, inputs, candidate)
                probs = scores.probs(slice(0, scores.num_heads))
            saved = {p: read_rows(block.get_submodule(refs[p].module), refs[p].rows).clone() for p in ("q", "k")}
            for p in ("q", "k"):
                write_rows(block.get_submodule(refs[p].module), refs[p].rows, candidate[p])
            model.config._attn_implementation = "eager"
            try:
                expected = _run_capturing(model, attention, kwargs, output=True)["weights"].float()
            finally:
                model.config._attn_implementation = implementation
                for p in ("q", "k"):
                    write_rows(block.get_submodule(refs[p].module), refs[p].rows, saved[p])
            _compare(probs, expected, valid)
            checked += 1
    assert checked >= 2


def test_attention_weights_that_are_not_probabilities_per_query_are_refused_before_any_weight_changes():
    """Longformer's sliding-window attention returns `[B, T, heads, window]` weights: nothing the KL term can read.
    D²Prune's choice refuses it with a remedy at the first block, before a weight changes; "all" still prunes it."""
    from optimum_d2prune import D2PruneConfig, D2Pruner
    from optimum_d2prune.errors import UnsupportedModelError
    from optimum_d2prune.testing.families import build_case, calibration_batches, sweep_cases

    model = build_case(sweep_cases(["longformer"])[0])
    batches = calibration_batches(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=r"LongformerSelfAttention.*shape.*skip_update': 'none'"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, batches)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # its global-attention Linears never run without global tokens: left out
    config = D2PruneConfig(sparsity=0.5, method_options={"skip_update": "none"}, ignore=["_global"])
    D2Pruner(config).prune(model, batches)
    w = model.encoder.layer[1].attention.self.query.weight
    assert int((w == 0).sum()) == w.numel() // 2


def eager_attention_forward(module, query, key, value, attention_mask, scaling=1.0, dropout=0.0, **kwargs):
    """The toy family's eager function, without a key/value head repeat: it fails on grouped-query attention."""
    weights = torch.softmax(query @ key.transpose(-1, -2) * scaling, dim=-1)
    return (weights @ value).transpose(1, 2), weights


class _ToyGQAAttention(torch.nn.Module):
    """4 query heads, 2 key/value heads, dispatched through transformers' attention interface (SDPA runs it)."""

    def __init__(self, config):
        super().__init__()
        self.config, self.is_causal, self.num_key_value_groups = config, True, 2
        self.q_proj, self.k_proj = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)
        self.v_proj, self.o_proj = torch.nn.Linear(32, 16), torch.nn.Linear(32, 32)

    def forward(self, hidden_states, attention_mask=None):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, 4, 8).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, 2, 8).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, 2, 8).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, q, k, v, attention_mask, scaling=8**-0.5)
        return self.o_proj(out.reshape(b, t, 32))


class _ToyGQA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
        self.config._attn_implementation = "sdpa"
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.layers = torch.nn.ModuleList(_ToyGQABlock(self.config) for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


class _ToyGQABlock(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = _ToyGQAAttention(config)

    def forward(self, h):
        return h + self.self_attn(h)


def test_a_family_whose_eager_attention_fails_is_refused_before_any_weight_changes():
    """The KL term runs the family's own eager function; where that function fails on the module's queries and
    keys (a transformers eager path without the key/value head repeat), D²Prune's choice refuses with a remedy."""
    from tinymodels import calib_batches

    from optimum_d2prune import D2PruneConfig, D2Pruner
    from optimum_d2prune.errors import UnsupportedModelError

    torch.manual_seed(0)
    model = _ToyGQA().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=r"eager attention function of _ToyGQAAttention fails.*"
                                                    r"skip_update': 'none'"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    D2Pruner(D2PruneConfig(sparsity=0.5, method_options={"skip_update": "none"})).prune(model, calib_batches())
    w = model.layers[1].self_attn.k_proj.weight
    assert int((w == 0).sum()) == w.numel() // 2
