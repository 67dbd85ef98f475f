"""Perplexity on non-overlapping windows of a text corpus (the LLM-pruning papers' WikiText-2 protocol)."""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import DocumentRange, load_documents
from ..calibration.hooks import calibration_context

logger = logging.getLogger(__name__)


def perplexity(
    model: nn.Module,
    tokenizer,
    source: Union[str, os.PathLike, Sequence[dict[str, torch.Tensor]]] = "wikitext2",
    seq_len: int = 2048,
    max_windows: Optional[int] = None,
    split: str = "test",
    desc: str = "perplexity",
    documents: Optional[DocumentRange] = None,
) -> float:
    """`exp(mean NLL over predicted tokens)` on consecutive non-overlapping `seq_len`-token windows.

    The corpus is tokenized once; documents of a .jsonl source are joined with blank lines. With equal window
    lengths this equals `exp(mean window loss)`. `source` may also be token sequences already made (the batches of
    `self_generated_calibration`, e.g. held-out text sampled from the dense model): each is one window.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        source: "wikitext2" (test split from the Hub), a local .txt/.jsonl file, or a list of
            `{"input_ids": LongTensor[1, T]}` batches.
        seq_len: window length (ignored for token sequences).
        max_windows: evaluate only the first windows (None: all full windows).
        split: split of a Hub dataset.
        desc: label of the progress bar.
        documents: score only this contiguous range of documents of a .jsonl source, joined with blank lines
            (e.g. `range(700, 800)`: held-out documents of a dev split calibrated on `range(0, 700)`).

    Example:
    ```python
    >>> from optimum_d2prune.evaluation import perplexity
    >>> perplexity(model, tokenizer, "wikitext2_test.txt", seq_len=512, max_windows=32)
    >>> perplexity(model, tokenizer, "c4_train_sample.jsonl", seq_len=512, max_windows=32, documents=range(700, 800))
    ```
    """
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"`max_windows` must be a positive integer or None, got {max_windows!r}.")
    if isinstance(source, (list, tuple)):
        if documents is not None:
            raise ValueError("`documents` selects documents of a file or Hub source, not of given token sequences.")
        windows = [b["input_ids"] for b in source][:max_windows]
        if not windows:
            raise ValueError("`source` holds no token sequence.")
        name = f"{len(windows)} given sequences"
    else:
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"`seq_len` must be an integer >= 2, got {seq_len!r}.")
        docs, _ = load_documents(source, split=split, documents=documents)
        ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids
        count = ids.shape[1] // seq_len
        if count == 0:
            raise ValueError(f"{source} has {ids.shape[1]} tokens, fewer than one window of {seq_len}.")
        if max_windows is not None:
            count = min(count, max_windows)
        windows = [ids[:, w * seq_len : (w + 1) * seq_len] for w in range(count)]
        name = f"{count} x {seq_len} tokens of {source}" + ("" if documents is None else f" ({documents})")
    device = model.get_input_embeddings().weight.device
    nll = 0.0
    with calibration_context(model):
        for x in tqdm(windows, desc=desc, unit="window"):
            x = x.to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))
    ppl = math.exp(nll / len(windows))
    logger.info("Perplexity on %s: %.4f", name, ppl)
    return ppl


def batches_perplexity(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """`exp(mean NLL)` of a causal LM over tokenized batches (`input_ids`, optional `attention_mask`: padding is not
    scored), e.g. held-out calibration batches."""
    device = model.get_input_embeddings().weight.device
    nll, count = 0.0, 0
    with calibration_context(model):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            labels = ids.clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"].to(device) == 0] = -100
            n = int((labels[:, 1:] != -100).sum())
            mask = batch.get("attention_mask")
            loss = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device), labels=labels).loss
            nll += float(loss) * n
            count += n
    return math.exp(nll / max(count, 1))
