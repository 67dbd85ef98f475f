"""The benchmark protocol's data, pinned to the bit: its calibration tokens (C4 sample, SmolLM2 tokenizer, 32 x 512,
seed 0) and its WikiText-2 perplexity (first 32 windows of 512 tokens, here on a tiny model with SmolLM2's
vocabulary). A change of tokenization, sampling or perplexity code that moves a single token or bit fails here."""

from __future__ import annotations

import hashlib

import pytest
import torch
from tinymodels import tiny_llama_for

from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity

C4_DIGESTS = {
    "all documents": (None, "8829ab9c11bd4c192ae36ca6f4bf9228a4fac637e3babb66c7df9debdc192097"),
    "dev split calibration": (range(0, 700), "7091e4ce45186d86063cd83bce969f468658c990e3c8676ac20cc8e15f6fbfa5"),
}
WIKITEXT2_PPL = "0x1.7da53fabec18dp+15"  # tiny_llama_for(SmolLM2 tokenizer, seed 0), 32 x 512 tokens


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b["input_ids"].numpy().tobytes())
        h.update(b["attention_mask"].numpy().tobytes())
        h.update(str(tuple(b["input_ids"].shape)).encode())
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(C4_DIGESTS))
def test_c4_calibration_tokens_are_pinned(case, shared_data, tokenizer):
    documents, digest = C4_DIGESTS[case]
    batches = get_calibration_dataset(shared_data / "c4_train_sample.jsonl", tokenizer, 32, 512, seed=0,
                                      documents=documents)
    assert _digest(batches) == digest


class _Spy:
    """The tokenizer, recording the length of every text it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.sizes = tokenizer, []

    def __call__(self, text, **kwargs):
        self.sizes.append(len(text))
        return self.tokenizer(text, **kwargs)


def test_wikitext2_perplexity_is_pinned(shared_data, tokenizer):
    ppl = perplexity(tiny_llama_for(tokenizer), tokenizer, shared_data / "wikitext2_test.txt", seq_len=512,
                     max_windows=32)
    assert float(ppl).hex() == WIKITEXT2_PPL


def test_wikitext2_windows_are_the_whole_texts_first_tokens_from_a_prefix(shared_data, tokenizer):
    """The 32 windows scored are the first 32 x 512 tokens of the whole text's tokenization, though the text given
    to the tokenizer is a prefix of it (1.3 MB in all)."""
    path = shared_data / "wikitext2_test.txt"
    model = tiny_llama_for(tokenizer)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"]),
                                             with_kwargs=True)
    spy = _Spy(tokenizer)
    try:
        perplexity(model, spy, path, seq_len=512, max_windows=32)
    finally:
        handle.remove()
    whole = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    assert torch.equal(torch.cat(seen, dim=1), whole[:, : 32 * 512])
    assert max(spy.sizes) < 300_000 < len(path.read_text(encoding="utf-8"))
