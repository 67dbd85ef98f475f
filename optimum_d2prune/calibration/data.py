"""Calibration and evaluation text: Hub datasets through `datasets`, or local `.jsonl` / `.txt` files.

Local files are resolved and checked in one streaming pass (`sources.resolve_data_source`): documents are read back
by seek when sampled, and a running text is tokenized no further than it is needed (`text.py`).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch

from ..errors import InputError
from . import sources
from .sources import (
    LOCAL_HINT,
    DataSource,
    FileChunks,
    FileDocuments,
    resolve_data_source,
)
from .text import encode, prefix_ids, running_text, whole_ids

logger = logging.getLogger(__name__)

C4_REPO = "allenai/c4"
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
WIKITEXT_REPO, WIKITEXT_CONFIG = "wikitext", "wikitext-2-raw-v1"

#: a contiguous selection of documents: `range(0, 700)` or `slice(700, None)` (step 1)
DocumentRange = Union[range, slice]
Source = Union[str, os.PathLike, DataSource]


class HubUnavailableError(ConnectionError):
    """A Hub dataset was asked for while the Hub cannot be reached."""


def _hub_error_is_network(err: BaseException) -> bool:
    """True when `err` (or what caused it) means "the Hub could not be reached", not a bug or a bad argument."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    network = (ConnectionError, TimeoutError, LocalEntryNotFoundError, OfflineModeIsEnabled)
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, network) or type(seen).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _load_hub(source: str, split: str) -> list[str]:
    """Documents of a Hub dataset (`datasets.load_dataset`); says at once, with the alternatives, when offline."""
    from ..io.hub import hub_offline_reason

    offline = hub_offline_reason()
    if offline is not None:
        raise HubUnavailableError(f"{source!r} comes from the Hugging Face Hub, which cannot be reached ({offline}). "
                                  f"Use {LOCAL_HINT} instead (or `self` to calibrate on text the model generates).")
    from datasets import load_dataset

    try:
        if source == "c4":
            data = load_dataset(C4_REPO, data_files={split: C4_TRAIN_SHARD}, split=split)
        else:
            data = load_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, split=split)
    except Exception as err:
        if not _hub_error_is_network(err):
            raise
        raise HubUnavailableError(f"Could not download {source!r} from the Hugging Face Hub ({type(err).__name__}: "
                                  f"{err}). Use {LOCAL_HINT} instead.") from err
    return list(data["text"])


def document_range(documents: Optional[DocumentRange], count: int, source: object = "the source") -> range:
    """The contiguous range of document indices `documents` selects among `count` (all when None), checked.

    `documents` is a `range` or `slice` with step 1 (e.g. `range(0, 700)`, `slice(700, None)`). The range must lie
    inside the `count` documents and select at least one.
    """
    if documents is None:
        return range(count)
    if not isinstance(documents, (range, slice)):
        raise InputError(f"`documents` must be a range or slice of document indices (e.g. range(0, 700)), "
                         f"got {documents!r}.")
    if isinstance(documents, slice):
        for part in ("start", "stop", "step"):
            value = getattr(documents, part)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise InputError(f"`documents` slice {part} must be an integer or None, got {value!r}.")
        start = 0 if documents.start is None else documents.start
        stop = count if documents.stop is None else documents.stop
        step = 1 if documents.step is None else documents.step
    else:
        start, stop, step = documents.start, documents.stop, documents.step
    if step != 1:
        raise InputError(f"`documents` must be contiguous (step 1), got step {step}.")
    if start < 0 or stop <= start:
        raise InputError(f"`documents` must select at least one document with non-negative indices, got "
                         f"[{start}, {stop}).")
    if stop > count:
        raise InputError(f"`documents` [{start}, {stop}) goes past the {count} documents of {source}.")
    return range(start, stop)


def select_documents(docs: list[str], documents: Optional[DocumentRange], source: object = "the source") -> list[str]:
    """`docs[documents]` for a contiguous range of document indices, with an error that says what is wrong."""
    if documents is None:
        return docs
    chosen = document_range(documents, len(docs), source)
    return docs[chosen.start : chosen.stop]


def _check_range_source(source: DataSource, documents: Optional[DocumentRange]) -> None:
    if documents is not None and source.is_corpus:
        raise InputError(f"`documents` selects documents of a .jsonl file or \"c4\", but {source.name!r} is one "
                         "running text; drop `documents` or pass a .jsonl file.")


def _documents(source: DataSource, split: str, documents: Optional[DocumentRange]) -> Sequence:
    """The (selected) documents of a document source, read on demand for a file."""
    if source.kind == "hub":
        return select_documents(_load_hub(source.name, split), documents, source.name)
    chosen = document_range(documents, source.documents, source.path)
    return FileDocuments(source, chosen.start, chosen.stop)


def _refuse_self(source: DataSource) -> None:
    if source.kind == "self":
        raise InputError("`self` means text generated by the model: use `self_generated_calibration(model, "
                         "tokenizer, ...)` (optimum_d2prune.calibration) for it.")


def load_documents(
    source: Source, split: str = "train", documents: Optional[DocumentRange] = None
) -> tuple[list[str], bool]:
    """`(documents, is_corpus)` of a source, held in memory. A corpus (wikitext, .txt) is one running text to cut
    windows from; otherwise each document is sampled separately (C4 style).

    `documents` keeps only that contiguous range of document indices (e.g. `range(0, 700)`: the first 700 records
    of a .jsonl file); it needs a source made of documents (.jsonl, "c4"), not a running corpus. Sampling and
    perplexity do not need this (they read what they use); it is for looking at the data.
    """
    src = resolve_data_source(source)
    _refuse_self(src)
    _check_range_source(src, documents)
    if src.kind == "hub":
        docs = _load_hub(src.name, split)
        return (["\n\n".join(docs)], True) if src.is_corpus else (select_documents(docs, documents, src.name), False)
    if src.is_corpus:
        return [src.path.read_text(encoding="utf-8")], True
    return list(_documents(src, split, documents)), False


def check_text_source(
    source: Source,
    tokenizer: Any,
    seq_len: int,
    purpose: str = "calibration",
    flag: str = "source",
    length_flag: str = "seq_len",
) -> DataSource:
    """Raise now if `source` cannot give what `purpose` needs, so that a run does not fail later; return the
    resolved `DataSource` (give it to `get_calibration_dataset` / `perplexity` to skip a second pass).

    Calibration needs a document of more than `seq_len` tokens (or a running text of more than `seq_len`); evaluation
    needs one window of `seq_len` tokens of the joined documents. A local file is read once, in constant memory
    (UTF-8, every record, every record tokenized: see `resolve_data_source`); a running text is tokenized no further
    than the tokens checked. The model is not needed, only its tokenizer.
    """
    name = os.fspath(source.name if isinstance(source, DataSource) else source)
    try:
        src = resolve_data_source(source, tokenizer)
        _refuse_self(src)
        if src.kind == "hub" and not src.is_corpus:
            docs = _load_hub(src.name, "train" if purpose == "calibration" else "test")
            long_enough = any(len(tokenizer(doc).input_ids) > seq_len for doc in docs)  # the Hub's data: no pass
            src = DataSource("hub", src.name, documents=len(docs), longest_document=seq_len + long_enough)
    except (FileNotFoundError, ConnectionError, InputError):
        raise
    except OSError as err:
        raise InputError(f"{flag} {name!r}: cannot read it ({err.strerror or err}).") from None
    if purpose == "calibration" and src.chat:
        return src  # conversations are packed to `seq_len` tokens: any conversation will do
    if purpose == "calibration" and not src.is_corpus:
        if (src.longest_document or 0) <= seq_len:
            raise InputError(f"{flag} {name!r}: no document has more than {length_flag}={seq_len} tokens; lower "
                             f"{length_flag} or use a file with longer documents.")
        return src
    hub_docs = _load_hub(src.name, "train" if purpose == "calibration" else "test") if src.kind == "hub" else None
    pieces, _ = running_text(src, hub_docs, tokenizer=tokenizer)
    needed = seq_len + 1 if purpose == "calibration" else seq_len
    count = prefix_ids(pieces, tokenizer, needed, name).shape[1]
    if count < needed:
        raise InputError(f"{flag} {name!r} has {count} tokens, fewer than the {needed} that one "
                         f"{length_flag}={seq_len} window needs; lower {length_flag} or use a longer file.")
    return src


def get_calibration_dataset(
    source: Source,
    tokenizer: Any,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    documents: Optional[DocumentRange] = None,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches sampled as SparseGPT does, with a local RNG (global RNGs are untouched).

    Documents (C4, a .jsonl file): for each sample, pick a random document whose token count exceeds `seq_len`
    (retry otherwise) and take a random window of `seq_len` tokens. Each chosen document is read back (by seek) and
    tokenized once. A running text (WikiText-2, a .txt file) up to `EXACT_TEXT_BYTES` (16 MiB) is tokenized whole and
    windows are cut from it at random; a larger one is cut into chunks of about 1 MiB at line ends, which are
    sampled as documents (memory: the chunks drawn, not the corpus). Conversations (`messages` records) are
    rendered with the tokenizer's chat template and packed: each sample is conversations drawn at random, end to
    end, cut at `seq_len` tokens (every sample starts at the start of a conversation).

    Args:
        source: "c4" (allenai/c4, shard en/c4-train.00000-of-01024), "wikitext2", a local .jsonl/.txt path, or a
            `DataSource` from `check_text_source` / `resolve_data_source`.
        tokenizer: a transformers tokenizer.
        num_samples: number of sequences.
        seq_len: tokens per sequence.
        seed: seed of the local RNG.
        documents: sample only from this contiguous range of documents of a .jsonl file or "c4" (e.g.
            `range(0, 700)`: the calibration half of a dev split whose held-out documents are scored with
            `perplexity(..., documents=range(700, 800))`). None: every document.

    Returns:
        A list of `{"input_ids": LongTensor[1, seq_len], "attention_mask": ...}` batches, ready for `D2Pruner.prune`.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise InputError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"`seq_len` must be an integer >= 2, got {seq_len!r}.")
    src = resolve_data_source(source)
    _refuse_self(src)
    _check_range_source(src, documents)
    rng = random.Random(seed)
    if src.is_corpus:
        samples = _sample_corpus(src, tokenizer, num_samples, seq_len, rng)
    elif src.chat:
        samples = _sample_conversations(_documents(src, "train", documents), tokenizer, num_samples, seq_len, rng)
    else:
        docs = _documents(src, "train", documents)
        samples = _sample_documents(docs, _tokenize_document(docs, tokenizer), num_samples, seq_len, rng, src.name)
    where = "" if documents is None else f" documents {_describe(documents)} of"
    logger.info("Calibration: %d x %d tokens from%s %s (seed %d).", num_samples, seq_len, where, src.name, seed)
    return [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in samples]


def _tokenize_document(docs: Sequence, tokenizer: Any) -> Callable[[int], torch.Tensor]:
    def tokenize(index: int) -> torch.Tensor:
        where = docs.where(index) if hasattr(docs, "where") else f"document {index}"
        return encode(tokenizer, docs[index], where)

    return tokenize


def _sample_documents(docs: Sequence, tokenize: Callable[[int], torch.Tensor], num_samples: int, seq_len: int,
                      rng: random.Random, name: str) -> list[torch.Tensor]:
    """SparseGPT's C4 loop (the same RNG calls), each document tokenized at most once."""
    too_short: set[int] = set()
    cache: dict[int, torch.Tensor] = {}
    samples = []
    for _ in range(num_samples):
        while True:
            if len(too_short) == len(docs):
                raise InputError(f"No document of {name} has more than `seq_len`={seq_len} tokens; lower `seq_len` "
                                 "or use a source with longer documents.")
            d = rng.randint(0, len(docs) - 1)
            if d in too_short:
                continue
            enc = cache.get(d)
            if enc is None:
                enc = tokenize(d)
            if enc.shape[1] > seq_len:
                cache[d] = enc
                break
            too_short.add(d)
        i = rng.randint(0, enc.shape[1] - seq_len - 1)
        samples.append(enc[:, i : i + seq_len].clone())
    return samples


def _sample_corpus(src: DataSource, tokenizer: Any, num_samples: int, seq_len: int,
                   rng: random.Random) -> list[torch.Tensor]:
    """Random windows of a running text: of the whole text up to `EXACT_TEXT_BYTES`, else of its chunks."""
    hub_docs = _load_hub(src.name, "train") if src.kind == "hub" else None
    pieces, size = running_text(src, hub_docs)
    if size > sources.EXACT_TEXT_BYTES and src.kind == "file":
        chunks = FileChunks(src)
        return _sample_documents(chunks, _tokenize_document(chunks, tokenizer), num_samples, seq_len, rng, src.name)
    ids = whole_ids(pieces, tokenizer, src.name)
    if ids.shape[1] <= seq_len:
        raise InputError(f"{src.name} has {ids.shape[1]} tokens, not more than `seq_len`={seq_len}.")
    samples = []
    for _ in range(num_samples):
        i = rng.randint(0, ids.shape[1] - seq_len - 1)
        samples.append(ids[:, i : i + seq_len].clone())
    return samples


def _sample_conversations(docs: Sequence, tokenizer: Any, num_samples: int, seq_len: int,
                          rng: random.Random) -> list[torch.Tensor]:
    """Conversations drawn at random, rendered with the chat template, packed end to end into `seq_len` tokens."""
    from .chat import render_conversation, require_chat_template

    require_chat_template(tokenizer, "calibrating on `messages` records")
    cache: dict[int, torch.Tensor] = {}
    samples = []
    for _ in range(num_samples):
        parts, have = [], 0
        while have < seq_len:
            d = rng.randint(0, len(docs) - 1)
            if d not in cache:
                where = docs.where(d) if hasattr(docs, "where") else f"conversation {d}"
                cache[d] = encode(tokenizer, render_conversation(tokenizer, docs[d]), where, special=False)
                if cache[d].shape[1] == 0:
                    raise InputError(f"{where}: the conversation renders to no token.")
            parts.append(cache[d])
            have += cache[d].shape[1]
        samples.append(torch.cat(parts, dim=1)[:, :seq_len].clone())
    return samples


def _describe(documents: DocumentRange) -> str:
    if isinstance(documents, range):
        return f"[{documents.start}, {documents.stop})"
    return f"[{documents.start or 0}, {'end' if documents.stop is None else documents.stop})"
