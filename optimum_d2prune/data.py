"""Calibration and evaluation text: Hub datasets through `datasets`, or local `.jsonl` / `.txt` files."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Union

import torch

logger = logging.getLogger(__name__)

C4_REPO = "allenai/c4"
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
WIKITEXT_REPO, WIKITEXT_CONFIG = "wikitext", "wikitext-2-raw-v1"
HUB_SOURCES = ("c4", "wikitext2")

_OFFLINE_HINT = (
    "Pass a local file instead: a .jsonl with a `text` field per line (e.g. a slice of C4 such as "
    "../shared/data/c4_train_sample.jsonl) or a .txt file (e.g. WikiText-2's test split)."
)


def _load_hub(source: str, split: str) -> list[str]:
    """Documents of a Hub dataset (`datasets.load_dataset`), with an actionable error when offline."""
    try:
        from datasets import load_dataset

        if source == "c4":
            data = load_dataset(C4_REPO, data_files={split: C4_TRAIN_SHARD}, split=split)
        else:
            data = load_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, split=split)
    except Exception as err:  # network, missing cache, hub errors: all mean "not available here"
        raise ConnectionError(f"Could not load {source!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
                              f"{_OFFLINE_HINT}") from err
    return list(data["text"])


def load_documents(source: Union[str, os.PathLike], split: str = "train") -> tuple[list[str], bool]:
    """`(documents, is_corpus)` of a source. A corpus (wikitext, .txt) is one running text to cut windows from;
    otherwise each document is sampled separately (C4 style)."""
    source_str = os.fspath(source)
    if source_str in HUB_SOURCES and not Path(source_str).exists():
        docs = _load_hub(source_str, split)
        return (["\n\n".join(docs)], True) if source_str == "wikitext2" else (docs, False)
    path = Path(source_str)
    if not path.is_file():
        raise FileNotFoundError(
            f"Calibration/evaluation source {source_str!r} is neither one of {HUB_SOURCES} nor an existing file."
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


def get_calibration_dataset(
    source: Union[str, os.PathLike],
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
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

    Returns:
        A list of `{"input_ids": LongTensor[1, seq_len], "attention_mask": ...}` batches, ready for `D2Pruner.prune`.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len` must be an integer >= 2, got {seq_len!r}.")
    docs, is_corpus = load_documents(source, split="train")
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
    logger.info("Calibration: %d x %d tokens from %s (seed %d).", num_samples, seq_len, source, seed)
    return [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in samples]
