"""Document ranges of .jsonl sources (the BENCH.md v1.1 dev split): calibration on some documents, perplexity on
others, with errors that say what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from test_data_eval import CharTokenizer, reference_c4_sampling
from tinymodels import FIXTURES, make_tiny

from optimum_d2prune.calibration import get_calibration_dataset, load_documents, select_documents
from optimum_d2prune.evaluation import perplexity

NOTES = FIXTURES / "pruning_notes.jsonl"


def notes() -> list[str]:
    return [json.loads(line)["text"] for line in NOTES.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("documents, expected", [
    (range(0, 5), slice(0, 5)),
    (range(5, 8), slice(5, 8)),
    (slice(5, None), slice(5, 8)),
    (slice(None, 3), slice(0, 3)),
    (None, slice(None)),
])
def test_load_documents_keeps_the_range(documents, expected):
    docs, is_corpus = load_documents(NOTES, documents=documents)
    assert not is_corpus and docs == notes()[expected]


def test_calibration_samples_only_the_range_with_sparsegpt_sampling():
    tok = CharTokenizer()
    batches = get_calibration_dataset(NOTES, tok, num_samples=6, seq_len=300, seed=2, documents=range(0, 5))
    expected = reference_c4_sampling(notes()[:5], tok, 6, 300, 2)
    assert all(torch.equal(b["input_ids"], e) for b, e in zip(batches, expected))
    # every window lies inside one of the first five documents
    texts = notes()[:5]
    for b in batches:
        window = b["input_ids"][0].tolist()
        assert any(_contains(tok(t).input_ids[0].tolist(), window) for t in texts)


def _contains(seq: list[int], window: list[int]) -> bool:
    n = len(window)
    return any(seq[i : i + n] == window for i in range(len(seq) - n + 1))


def test_perplexity_on_a_range_is_the_range_joined_by_blank_lines(tmp_path):
    model = make_tiny("llama")
    tok = CharTokenizer()
    joined = tmp_path / "held_out.txt"
    joined.write_text("\n\n".join(notes()[5:8]), encoding="utf-8")
    on_range = perplexity(model, tok, NOTES, seq_len=64, max_windows=4, documents=range(5, 8))
    assert on_range == pytest.approx(perplexity(model, tok, joined, seq_len=64, max_windows=4), rel=1e-6)
    assert on_range != pytest.approx(perplexity(model, tok, NOTES, seq_len=64, max_windows=4), rel=1e-6)


@pytest.mark.parametrize("documents, message", [
    (range(0, 9), r"\[0, 9\) goes past the 8 documents"),
    (slice(6, 20), r"\[6, 20\) goes past the 8 documents"),
    (range(0, 8, 2), "contiguous"),
    (range(3, 3), "at least one document"),
    (slice(-2, None), "non-negative"),
    ((0, 5), "range or slice"),
    (slice(0.5, 3), "slice start must be an integer"),
])
def test_bad_ranges_say_what_is_wrong(documents, message):
    with pytest.raises(ValueError, match=message):
        get_calibration_dataset(NOTES, CharTokenizer(), num_samples=1, seq_len=50, documents=documents)


def test_a_range_needs_documents_not_a_running_text():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="one running text; drop `documents` or pass a .jsonl file"):
        perplexity(model, CharTokenizer(), FIXTURES / "pruning_notes.txt", seq_len=32, documents=range(0, 2))
    with pytest.raises(ValueError, match="not of given token sequences"):
        perplexity(model, CharTokenizer(), [{"input_ids": torch.zeros(1, 8, dtype=torch.long)}], documents=range(1))


def test_select_documents_is_a_plain_slice():
    assert select_documents(list("abcdef"), range(2, 4)) == ["c", "d"]
    assert select_documents(list("abcdef"), None) == list("abcdef")


# ------------------------------------------------------------------ the real dev split
def test_dev_split_of_the_c4_sample(shared_data, tokenizer_dir):
    """BENCH.md v1.1: 700 calibration documents, and documents 700-799 give at least 32 windows of 512 tokens."""
    from transformers import AutoTokenizer

    c4 = shared_data / "c4_train_sample.jsonl"
    calibration, _ = load_documents(c4, documents=range(0, 700))
    held_out, _ = load_documents(c4, documents=range(700, 800))
    everything, _ = load_documents(c4)
    assert len(everything) == 800 and calibration + held_out == everything
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer("\n\n".join(held_out), return_tensors="pt").input_ids.shape[1] >= 32 * 512
