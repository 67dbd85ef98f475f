"""Each family's fused q/k/v layout (`FUSED_LAYOUTS`), proven against the family's own eager attention.

For the rows the adapter calls v, a perturbation must leave the attention probabilities of the model unchanged;
for the rows it calls q, and those it calls k, it must change them. A fused layer whose rows cannot be split is
never read: the attention-aware choice refuses the model with a remedy, the baselines prune it whole.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import calib_batches

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import GenericAdapter
from optimum_d2prune.architectures.base import read_rows, write_rows
from optimum_d2prune.errors import UnsupportedModelError
from optimum_d2prune.testing.families import FUSED_FAMILIES, VOCAB, make_family


def _eager_attentions(model, ids):
    with torch.no_grad():
        return model(ids, output_attentions=True, use_cache=False).attentions


def _perturbed(module, rows, seed):
    """The module with `rows` of its weight (and bias) replaced by other random values; returns a restore."""
    g = torch.Generator().manual_seed(seed)
    original = read_rows(module, rows).detach().clone()
    write_rows(module, rows, torch.randn(original.shape, generator=g))
    bias = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
    if bias is not None:
        module.bias.data[rows] += 1.0

    def restore():
        write_rows(module, rows, original)
        if bias is not None:
            module.bias.data.copy_(bias)

    return restore


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_rows_called_v_do_not_move_the_attention_and_q_k_do(family):
    model = make_family(family, attn_implementation="eager")
    model.config._attn_implementation = "eager"
    adapter = GenericAdapter()
    adapter.validate(model)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for block in adapter.blocks(model):  # unit-scale fused weights: far from uniform attention (GPT-1's init is)
        for name, module in block.named_modules():
            if name.rsplit(".", 1)[-1] in ("c_attn", "qkv_proj", "query_key_value", "Wqkv"):
                write_rows(module, None, torch.randn(read_rows(module).shape, generator=g) * 0.2)
    dense = _eager_attentions(model, ids)
    for index, block in enumerate(adapter.blocks(model)):
        groups = adapter.attention_groups(block)
        assert len(groups) == 1
        _, refs = groups[0]
        assert len({r.module for r in refs.values()}) == 1 and all(r.rows is not None for r in refs.values())
        fused = block.get_submodule(refs["q"].module)
        sizes = {p: read_rows(fused, r.rows).shape[0] for p, r in refs.items()}
        assert sum(sizes.values()) == read_rows(fused).shape[0]  # a partition of the rows
        all_rows = torch.cat([torch.arange(read_rows(fused).shape[0])[r.rows] for r in refs.values()])
        assert sorted(all_rows.tolist()) == list(range(read_rows(fused).shape[0]))
        for seed, p in enumerate(("q", "k", "v")):
            restore = _perturbed(fused, refs[p].rows, seed + 100 * (index + 1))
            try:
                moved = _eager_attentions(model, ids)[index]
            finally:
                restore()
            change = float((moved - dense[index]).abs().max())
            if p == "v":
                assert change < 1e-6, f"{family}: the rows called v move the attention by {change}"
            else:
                assert change > 1e-3, f"{family}: the rows called {p} do not move the attention"


class _Toy(torch.nn.Module):
    """Blocks whose fused `query_key_value` holds 100 rows: no head layout of the config (4 heads of 8) splits
    them."""

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(num_attention_heads=4, hidden_size=32)
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.layers = torch.nn.ModuleList(_ToyBlock() for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


class _ToyAttention(torch.nn.Module):
    """A softmax attention whose fused `query_key_value` holds 100 rows (q, k, v of 32 and 4 more)."""

    def __init__(self):
        super().__init__()
        self.query_key_value = torch.nn.Linear(32, 100)
        self.dense = torch.nn.Linear(32, 32)

    def forward(self, h):
        q, k, v = self.query_key_value(h)[..., :96].split(32, dim=-1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)
        return self.dense(probs @ v)


class _ToyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _ToyAttention()

    def forward(self, h):
        return h + self.attn(h)


def test_a_fused_layout_that_cannot_be_split_is_refused_by_the_aware_choice_only():
    model = _Toy().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=r"query_key_value.*skip_update': 'none'"):
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib_batches())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any work
    D2Pruner(D2PruneConfig(sparsity=0.5, method="sparsegpt")).prune(model, calib_batches())
    for block in model.layers:
        w = block.attn.query_key_value.weight
        assert int((w == 0).sum()) == w.numel() // 2
