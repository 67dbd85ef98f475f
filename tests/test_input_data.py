"""Calibration/evaluation files: refused in one pass before any work (with file, line and byte), read in bounded
memory, sampled without re-reading or re-tokenizing, and recorded with their provenance."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
from test_data_eval import CharTokenizer, reference_c4_sampling
from tinymodels import FIXTURES, make_tiny

from optimum_d2prune.calibration import check_text_source, get_calibration_dataset, resolve_data_source
from optimum_d2prune.errors import InputError


class RecordingTokenizer(CharTokenizer):
    """One token per character (a list of ids, or a `[1, n]` tensor with `return_tensors="pt"`, as transformers'
    tokenizers return them); records the length of every text it is given, and refuses texts holding `refuse`."""

    def __init__(self, refuse: str | None = None) -> None:
        self.sizes: list[int] = []
        self.refuse = refuse

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        self.sizes.append(len(text))
        if self.refuse and self.refuse in text:
            raise ValueError("this text cannot be encoded")
        encoding = super().__call__(text, return_tensors)
        if return_tensors is None:
            encoding["input_ids"] = encoding["input_ids"][0].tolist()
        return encoding


LONG_RECORD = (json.dumps({"text": "a long enough first document. " * 4}) + "\n").encode()  # 120 tokens
LONG_LINES = b"a long enough first line of text\n" * 4

# case -> (file name, bytes, the error's text). Each file starts with something long enough for --seq-len 50, so
# a check that stops at the first good document or tokenizes only the start would accept it.
BAD_FILES = {
    "txt not UTF-8 at line 5": ("corpus.txt", LONG_LINES + b"caf\xe9 au lait\n",
                                "corpus.txt:5: byte 135 (0xe9) is not UTF-8"),
    "txt ends inside a character": ("corpus.txt", LONG_LINES + b"na\xc3",
                                    "corpus.txt:5: byte 134 (0xc3) is not UTF-8"),
    "jsonl not UTF-8 at line 2": ("docs.jsonl", LONG_RECORD + b'{"text": "caf\xe9"}\n',
                                  f"docs.jsonl:2: byte {len(LONG_RECORD) + 13} (0xe9) is not UTF-8"),
    "jsonl nested too deeply": ("docs.jsonl", LONG_RECORD + b"[" * 100_000 + b"\n", "docs.jsonl:2 nests JSON"),
    "jsonl not JSON": ("docs.jsonl", LONG_RECORD + b'{"text": "unterminated}\n', "docs.jsonl:2 is not valid JSON"),
    "jsonl record without text": ("docs.jsonl", LONG_RECORD + b'{"content": "x"}\n',
                                  "docs.jsonl:2 has no string field `text`"),
    "jsonl lone surrogate": ("docs.jsonl", LONG_RECORD + b'{"text": "a \\ud800 b"}\n',
                             "docs.jsonl:2: `text` holds '\\ud800' at character 2, a lone surrogate"),
    "jsonl record the tokenizer refuses": ("docs.jsonl", LONG_RECORD + b'{"text": "fine, then BOOM"}\n',
                                           "docs.jsonl:2: the tokenizer cannot encode this record"),
    "jsonl mixing text and messages": ("docs.jsonl",
                                       LONG_RECORD + b'{"messages": [{"role": "user", "content": "hi"}]}\n',
                                       "docs.jsonl:2: records mix `text` and `messages`"),
    "jsonl of blank lines": ("docs.jsonl", b"\n  \n", "holds no documents"),
    "txt of whitespace": ("corpus.txt", b" \n\t\n", "is empty"),
}
#: the cases found by reading alone (no tokenizer): `get_calibration_dataset` refuses them the same way
FOUND_WITHOUT_TOKENIZER = sorted(set(BAD_FILES) - {"jsonl record the tokenizer refuses"})


def _write(tmp_path: Path, case: str) -> tuple[Path, str]:
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    return path, message


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_the_pre_check_refuses_a_bad_file_naming_where(case, tmp_path):
    path, message = _write(tmp_path, case)
    with pytest.raises(InputError, match=re.escape(message)) as info:
        check_text_source(path, RecordingTokenizer(refuse="BOOM"), 50, "calibration", "--calibration", "--seq-len")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", FOUND_WITHOUT_TOKENIZER)
def test_sampling_refuses_a_bad_file_naming_it(case, tmp_path):
    path, message = _write(tmp_path, case)
    with pytest.raises(InputError, match=re.escape(message)):
        get_calibration_dataset(path, CharTokenizer(), num_samples=2, seq_len=50)


# ------------------------------------------------------------------ bounded memory
@pytest.fixture
def big_text(tmp_path) -> Path:
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i} of a corpus far larger than any window asked for\n" for i in range(40_000)))
    return path  # 2.4 MB


def _small_limits(monkeypatch) -> None:
    """A running text above 256 KiB counts as large (chunks of 64 KiB), so that a 2.4 MB file takes that path."""
    from optimum_d2prune.calibration import sources

    monkeypatch.setattr(sources, "EXACT_TEXT_BYTES", 256 * 2**10)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64 * 2**10)


def _calibrate_large(path, tok):
    return get_calibration_dataset(path, tok, num_samples=3, seq_len=64)


def _stream_all_windows(path, tok):
    from optimum_d2prune.calibration.text import running_text, token_windows

    source = resolve_data_source(path)
    pieces, size = running_text(source)
    found, count = token_windows(pieces, size, tok, 64, None, str(path))
    ids = torch.cat(list(found), dim=1)
    assert count is None and torch.equal(ids, CharTokenizer()(path.read_text()).input_ids[:, : ids.shape[1]])
    assert ids.shape[1] == path.stat().st_size // 64 * 64  # every full window, in order


def _perplexity_first_windows(path, tok):
    from optimum_d2prune.evaluation import perplexity

    perplexity(make_tiny("llama"), tok, path, seq_len=32, max_windows=2)


# case -> (call, largest text the tokenizer may see, whether the text counts as large); the whole file is 2.4 MB
BOUNDED = {
    "calibration pre-check": (lambda p, tok: check_text_source(p, tok, 64, "calibration"), 16_384, False),
    "evaluation pre-check": (lambda p, tok: check_text_source(p, tok, 64, "evaluation"), 16_384, False),
    "perplexity on the first windows": (_perplexity_first_windows, 16_384, False),
    "calibration windows from a large text": (_calibrate_large, 80 * 2**10, True),
    "all evaluation windows of a large text": (_stream_all_windows, 80 * 2**10, True),
}


@pytest.mark.parametrize("case", sorted(BOUNDED))
def test_a_large_text_is_never_tokenized_whole(case, big_text, monkeypatch):
    call, largest, large = BOUNDED[case]
    if large:
        _small_limits(monkeypatch)
    tok = RecordingTokenizer()
    call(big_text, tok)
    assert tok.sizes and max(tok.sizes) <= largest, max(tok.sizes)


def test_sampling_holds_only_the_documents_it_draws(tmp_path):
    """20 MB of documents: sampling reads back the few it draws; it never holds them all."""
    path = tmp_path / "many.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(20_000):
            f.write(json.dumps({"text": f"document {i}: " + "x" * 1000}) + "\n")
    tok = RecordingTokenizer()
    tracemalloc.start()
    try:
        batches = get_calibration_dataset(path, tok, num_samples=4, seq_len=100, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(batches) == 4 and len(tok.sizes) <= 4
    assert peak < 4 * 2**20, peak


def test_each_drawn_document_is_tokenized_once_with_the_same_samples(tmp_path):
    docs = ["short", "x" * 80 + "first long document", "y" * 90 + "second long document", "tiny"]
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok = RecordingTokenizer()
    batches = get_calibration_dataset(path, tok, num_samples=12, seq_len=50, seed=5)
    expected = reference_c4_sampling(docs, CharTokenizer(), 12, 50, 5)
    assert all(torch.equal(b["input_ids"], e) for b, e in zip(batches, expected))
    assert len(tok.sizes) <= len(docs)


# ------------------------------------------------------------------ names, shadowing, provenance
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fixture, documents", [("pruning_notes.jsonl", 8), ("pruning_notes.txt", None)])
def test_a_file_source_carries_its_provenance(fixture, documents):
    path = FIXTURES / fixture
    record = resolve_data_source(str(path)).to_record()
    assert record == {"source": fixture, "kind": "file", "path": str(path.resolve()), "sha256": _digest(path),
                      "size": path.stat().st_size, "format": "jsonl" if documents else "text",
                      "documents": documents, "chat": False}


@pytest.mark.parametrize("name, what", [("c4", "the Hub dataset 'c4'"), ("wikitext2", "the Hub dataset 'wikitext2'"),
                                        ("self", "text generated by the model")])
def test_a_local_file_named_like_a_source_is_that_file(name, what, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes((FIXTURES / "pruning_notes.txt").read_bytes())
    with caplog.at_level(logging.WARNING):
        source = resolve_data_source(name)
    assert (source.kind, source.path, source.sha256) == ("file", (tmp_path / name).resolve(), _digest(tmp_path / name))
    said = [r.getMessage() for r in caplog.records if "is a file in the working folder" in r.getMessage()]
    assert len(said) == 1 and what in said[0]


TINY_CLI = ["--num-samples", "2", "--seq-len", "16", "--device", "cpu", "--method", "magnitude", "--no-report"]


@pytest.mark.parametrize("name", ["c4", "self"])
def test_the_cli_calibrates_on_a_shadowing_file_and_records_it(name, tiny_checkpoint, tmp_path, monkeypatch, caplog):
    import optimum_d2prune.calibration as calibration
    from optimum_d2prune.commands import main

    monkeypatch.chdir(tmp_path)
    data = tmp_path / name
    data.write_bytes((FIXTURES / "pruning_notes.txt").read_bytes())
    monkeypatch.setattr(calibration, "self_generated_calibration", lambda *a, **k: pytest.fail("generated text"))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(["--model", str(tiny_checkpoint), "--output-dir", str(out), "--calibration", name,
                     "--eval", "none", *TINY_CLI])
    assert code == 0
    record = json.loads((out / "d2prune_config.json").read_text())["calibration"]
    assert {k: record[k] for k in ("source", "kind", "path", "sha256", "size")} == {
        "source": name, "kind": "file", "path": str(data.resolve()), "sha256": _digest(data),
        "size": data.stat().st_size}
    assert sum("is a file in the working folder" in r.getMessage() for r in caplog.records) == 1


def test_the_cli_metric_says_how_many_windows_it_scored(tiny_checkpoint, tmp_path):
    """On CPU an --eval file is scored on its first 32 windows by default, and the metric's name says so."""
    from optimum_d2prune.commands import main

    out = tmp_path / "out"
    code = main(["--model", str(tiny_checkpoint), "--output-dir", str(out), "--calibration", "self",
                 "--eval", str(FIXTURES / "pruning_notes.txt"), "--eval-seq-len", "8", *TINY_CLI])
    assert code == 0
    evaluation = json.loads((out / "d2prune_config.json").read_text())["evaluation"]
    assert list(evaluation) == ["perplexity (pruning_notes.txt, 32 x 8 tokens)"]
    assert set(evaluation["perplexity (pruning_notes.txt, 32 x 8 tokens)"]) == {"dense", "pruned"}
