"""Calibration and evaluation text: Hub datasets through `datasets`, or local `.jsonl` / `.txt` files."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

C4_REPO = "allenai/c4"
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
WIKITEXT_REPO, WIKITEXT_CONFIG = "wikitext", "wikitext-2-raw-v1"
HUB_SOURCES = ("c4", "wikitext2")

_LOCAL_HINT = "a local .jsonl file (one JSON object with a `text` field per line) or a .txt file"

#: a contiguous selection of documents: `range(0, 700)` or `slice(700, None)` (step 1)
DocumentRange = Union[range, slice]


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
    from .io.hub import hub_offline_reason

    offline = hub_offline_reason()
    if offline is not None:
        raise HubUnavailableError(f"{source!r} comes from the Hugging Face Hub, which cannot be reached ({offline}). "
                                  f"Use {_LOCAL_HINT} instead (or `self` to calibrate on text the model generates).")
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
                                  f"{err}). Use {_LOCAL_HINT} instead.") from err
    return list(data["text"])


def select_documents(docs: list[str], documents: Optional[DocumentRange], source: object = "the source") -> list[str]:
    """`docs[documents]` for a contiguous range of document indices, with an error that says what is wrong.

    `documents` is a `range` or `slice` with step 1 (e.g. `range(0, 700)`, `slice(700, None)`); None keeps all.
    The range must lie inside the `len(docs)` documents and select at least one.
    """
    if documents is None:
        return docs
    if not isinstance(documents, (range, slice)):
        raise ValueError(f"`documents` must be a range or slice of document indices (e.g. range(0, 700)), "
                         f"got {documents!r}.")
    if isinstance(documents, slice):
        for part in ("start", "stop", "step"):
            value = getattr(documents, part)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"`documents` slice {part} must be an integer or None, got {value!r}.")
        start = 0 if documents.start is None else documents.start
        stop = len(docs) if documents.stop is None else documents.stop
        step = 1 if documents.step is None else documents.step
    else:
        start, stop, step = documents.start, documents.stop, documents.step
    if step != 1:
        raise ValueError(f"`documents` must be contiguous (step 1), got step {step}.")
    if start < 0 or stop <= start:
        raise ValueError(f"`documents` must select at least one document with non-negative indices, got "
                         f"[{start}, {stop}).")
    if stop > len(docs):
        raise ValueError(f"`documents` [{start}, {stop}) goes past the {len(docs)} documents of {source}.")
    return docs[start:stop]


def load_documents(
    source: Union[str, os.PathLike], split: str = "train", documents: Optional[DocumentRange] = None
) -> tuple[list[str], bool]:
    """`(documents, is_corpus)` of a source. A corpus (wikitext, .txt) is one running text to cut windows from;
    otherwise each document is sampled separately (C4 style).

    `documents` keeps only that contiguous range of document indices (e.g. `range(0, 700)`: the first 700 lines of
    a .jsonl file); it needs a source made of documents (.jsonl, "c4"), not a running corpus.
    """
    docs, is_corpus = _load_all_documents(source, split)
    if documents is not None:
        if is_corpus:
            raise ValueError(f"`documents` selects documents of a .jsonl file or \"c4\", but "
                             f"{os.fspath(source)!r} is one running text; drop `documents` or pass a .jsonl file.")
        docs = select_documents(docs, documents, os.fspath(source))
    return docs, is_corpus


def _load_all_documents(source: Union[str, os.PathLike], split: str) -> tuple[list[str], bool]:
    source_str = os.fspath(source)
    if source_str in HUB_SOURCES and not Path(source_str).exists():
        docs = _load_hub(source_str, split)
        return (["\n\n".join(docs)], True) if source_str == "wikitext2" else (docs, False)
    path = Path(source_str)
    if not path.is_file():
        raise FileNotFoundError(
            f"Calibration/evaluation source {source_str!r} is neither one of {HUB_SOURCES} nor an existing file: "
            f"pass {_LOCAL_HINT}."
        )
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no} is not valid JSON: {err}.") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{line_no} has no string field `text`.")
                docs.append(record["text"])
        if not docs:
            raise ValueError(f"{path} holds no documents.")
        return docs, False
    if path.suffix in (".txt", ".raw", ".text", ""):
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{path} is empty.")
        return [text], True
    raise ValueError(f"Unsupported file type {path.suffix!r} for {path}: use .jsonl (field `text`) or .txt.")


def check_text_source(
    source: Union[str, os.PathLike],
    tokenizer,
    seq_len: int,
    purpose: str = "calibration",
    flag: str = "source",
    length_flag: str = "seq_len",
) -> None:
    """Raise a `ValueError` now if `source` cannot give what `purpose` needs, so that a run does not fail later.

    Calibration needs a document (or a running corpus) of more than `seq_len` tokens; evaluation needs one window
    of `seq_len` tokens from the joined documents. Reading and tokenizing a local file takes seconds; the model is
    not needed, only its tokenizer.
    """
    try:
        docs, is_corpus = load_documents(source, split="train" if purpose == "calibration" else "test")
    except (OSError, UnicodeDecodeError) as err:
        if isinstance(err, (FileNotFoundError, ConnectionError)):
            raise
        raise ValueError(f"{flag} {os.fspath(source)!r}: cannot read it ({err}).") from None
    if purpose == "calibration" and not is_corpus:
        if not any(len(tokenizer(doc).input_ids) > seq_len for doc in docs):
            raise ValueError(f"{flag} {os.fspath(source)!r}: no document has more than {length_flag}={seq_len} "
                             f"tokens; lower {length_flag} or use a file with longer documents.")
        return
    count = len(tokenizer("\n\n".join(docs)).input_ids)
    needed = seq_len + 1 if purpose == "calibration" else seq_len
    if count < needed:
        raise ValueError(f"{flag} {os.fspath(source)!r} has {count} tokens, fewer than the {needed} that one "
                         f"{length_flag}={seq_len} window needs; lower {length_flag} or use a longer file.")


def get_calibration_dataset(
    source: Union[str, os.PathLike],
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    documents: Optional[DocumentRange] = None,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches sampled as SparseGPT does, with a local RNG (global RNGs are untouched).

    For each sample: pick a random document whose token count exceeds `seq_len` (retry otherwise) and take a
    random window of `seq_len` tokens. For a running corpus (WikiText-2, a .txt file), windows are cut from the
    whole tokenized text.

    Args:
        source: "c4" (allenai/c4, shard en/c4-train.00000-of-01024), "wikitext2", or a local .jsonl/.txt path.
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
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len` must be an integer >= 2, got {seq_len!r}.")
    docs, is_corpus = load_documents(source, split="train", documents=documents)
    rng = random.Random(seed)
    samples = []
    if is_corpus:
        ids = tokenizer(docs[0], return_tensors="pt").input_ids
        if ids.shape[1] <= seq_len:
            raise ValueError(f"{source} has {ids.shape[1]} tokens, not more than `seq_len`={seq_len}.")
        for _ in range(num_samples):
            i = rng.randint(0, ids.shape[1] - seq_len - 1)
            samples.append(ids[:, i : i + seq_len])
    else:
        too_short: set[int] = set()
        for _ in range(num_samples):
            while True:
                if len(too_short) == len(docs):
                    raise ValueError(f"No document of {source} has more than `seq_len`={seq_len} tokens; lower "
                                     "`seq_len` or use a source with longer documents.")
                d = rng.randint(0, len(docs) - 1)
                if d in too_short:
                    continue
                enc = tokenizer(docs[d], return_tensors="pt").input_ids
                if enc.shape[1] > seq_len:
                    break
                too_short.add(d)
            i = rng.randint(0, enc.shape[1] - seq_len - 1)
            samples.append(enc[:, i : i + seq_len])
    where = "" if documents is None else f" documents {_describe(documents)} of"
    logger.info("Calibration: %d x %d tokens from%s %s (seed %d).", num_samples, seq_len, where, source, seed)
    return [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in samples]


def _describe(documents: DocumentRange) -> str:
    if isinstance(documents, range):
        return f"[{documents.start}, {documents.stop})"
    return f"[{documents.start or 0}, {'end' if documents.stop is None else documents.stop})"
