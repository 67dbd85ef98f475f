"""Calibration sampling and perplexity on local files; Hub sources fail fast offline."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from tinymodels import make_tiny
from transformers import BatchEncoding

from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity


class CharTokenizer:
    """A stand-in tokenizer: one token per character (ids modulo the tiny vocab)."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[ord(c) % 96 for c in text]])
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@pytest.fixture
def jsonl(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "docs.jsonl"
    docs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 120))) for _ in range(40)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return path, docs


def reference_c4_sampling(docs, tokenizer, n, seq_len, seed):
    """SparseGPT's get_c4 loop with a seeded RNG."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        while True:
            i = rng.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i]).input_ids
            if enc.shape[1] > seq_len:
                break
        i = rng.randint(0, enc.shape[1] - seq_len - 1)
        out.append(enc[:, i : i + seq_len])
    return out


def test_calibration_from_jsonl_is_sparsegpt_sampling(jsonl):
    path, docs = jsonl
    tok = CharTokenizer()
    state_py, state_torch = random.getstate(), torch.get_rng_state()
    batches = get_calibration_dataset(path, tok, num_samples=6, seq_len=50, seed=3)
    assert random.getstate() == state_py and torch.equal(torch.get_rng_state(), state_torch)
    expected = reference_c4_sampling(docs, tok, 6, 50, 3)
    assert len(batches) == 6
    for b, e in zip(batches, expected):
        assert b["input_ids"].shape == (1, 50) and torch.equal(b["input_ids"], e)
        assert bool(b["attention_mask"].all())
    again = get_calibration_dataset(path, tok, num_samples=6, seq_len=50, seed=3)
    other = get_calibration_dataset(path, tok, num_samples=6, seq_len=50, seed=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))


def test_calibration_from_txt_cuts_windows(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world, " * 50)
    batches = get_calibration_dataset(path, CharTokenizer(), num_samples=3, seq_len=40)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(1, 40)] * 3


def test_calibration_errors(jsonl, tmp_path):
    path, _ = jsonl
    with pytest.raises(ValueError, match="No document .* more than `seq_len`=500"):
        get_calibration_dataset(path, CharTokenizer(), num_samples=2, seq_len=500)
    with pytest.raises(FileNotFoundError, match="neither one of"):
        get_calibration_dataset(tmp_path / "missing.jsonl", CharTokenizer())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="no string field `text`"):
        get_calibration_dataset(bad, CharTokenizer())
    with pytest.raises(ValueError, match="`num_samples` must be a positive integer"):
        get_calibration_dataset(path, CharTokenizer(), num_samples=0)


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_hub_source_offline_names_the_local_alternative(source, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the Hub while offline"))
    with pytest.raises(ConnectionError, match=r"cannot be reached .*Use a local \.jsonl file"):
        get_calibration_dataset(source, CharTokenizer(), num_samples=1, seq_len=8)


def test_hub_source_uses_datasets_with_the_c4_shard(monkeypatch):
    import datasets

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["x" * 100] * 3}

    import optimum_d2prune.io.hub as io_hub

    monkeypatch.setattr(io_hub, "hub_offline_reason", lambda timeout=3.0: None)  # "the Hub is reachable"
    monkeypatch.setattr(datasets, "load_dataset", fake)
    get_calibration_dataset("c4", CharTokenizer(), num_samples=2, seq_len=10)
    assert calls[0][0] == ("allenai/c4",)
    assert calls[0][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_perplexity_is_exp_of_mean_window_nll(tmp_path):
    model = make_tiny("llama")
    path = tmp_path / "test.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    tok = CharTokenizer()
    ids = tok(path.read_text()).input_ids
    losses = []
    with torch.no_grad():
        for w in range(3):
            x = ids[:, w * 32 : (w + 1) * 32]
            losses.append(float(model(x, labels=x).loss))
    assert perplexity(model, tok, path, seq_len=32, max_windows=3) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, path, seq_len=10_000)


@pytest.mark.parametrize(
    "raised, expected",
    [
        (ValueError("BuilderConfig 'en' not found"), ValueError),  # a real error: not disguised as "offline"
        (ConnectionError("Couldn't reach 'allenai/c4' on the Hub"), ConnectionError),
    ],
)
def test_only_network_failures_read_as_offline(raised, expected, monkeypatch):
    import datasets

    import optimum_d2prune.io.hub as io_hub
    from optimum_d2prune.calibration import HubUnavailableError, load_documents

    monkeypatch.setattr(io_hub, "hub_offline_reason", lambda timeout=3.0: None)  # "the Hub is reachable"

    def load_dataset(*args, **kwargs):
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(expected) as info:
        load_documents("c4")
    assert isinstance(info.value, HubUnavailableError) == (expected is ConnectionError)
    if expected is ValueError:
        assert info.value is raised


def test_perplexity_says_what_it_scored(tmp_path):
    import pickle

    path = tmp_path / "test.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    ppl = perplexity(make_tiny("llama"), CharTokenizer(), path, seq_len=32, max_windows=3)
    assert (ppl.windows, ppl.tokens) == (3, 3 * 31)
    assert json.loads(json.dumps({"ppl": ppl}))["ppl"] == float(ppl) and f"{ppl:.3f}" == f"{float(ppl):.3f}"
    again = pickle.loads(pickle.dumps(ppl))
    assert (again, again.windows, again.tokens) == (ppl, 3, 93)


def test_one_perplexity_for_windows_and_padded_batches():
    from optimum_d2prune.evaluation import perplexity_of_batches

    model = make_tiny("llama")
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 96, (1, 24), generator=g) for _ in range(3)]
    nll = 0.0
    with torch.no_grad():
        for w in windows:  # the papers' WikiText-2 loop: exp of the mean window loss
            logits = model(input_ids=w).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    assert perplexity_of_batches(model, batches) == math.exp(nll / 3)  # to the last bit
    # padded batches: the token-weighted NLL of the unmasked targets (transformers' loss with -100 labels)
    ids = torch.randint(0, 96, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    short = torch.randint(0, 96, (1, 10), generator=g)
    padded = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": short}]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in padded:
            batch_mask = batch.get("attention_mask")
            ids = batch["input_ids"]
            labels = ids if batch_mask is None else ids.masked_fill(batch_mask == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, attention_mask=batch_mask, labels=labels).loss) * n
            count += n
    ppl = perplexity_of_batches(model, padded)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-6) and (ppl.windows, ppl.tokens) == (2, 23 + 14 + 9)
