"""Perplexity on non-overlapping windows of a text corpus (the LLM-pruning papers' WikiText-2 protocol)."""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import load_documents
from ..hooks import calibration_context

logger = logging.getLogger(__name__)


def perplexity(
    model: nn.Module,
    tokenizer,
    source: Union[str, os.PathLike] = "wikitext2",
    seq_len: int = 2048,
    max_windows: Optional[int] = None,
    split: str = "test",
) -> float:
    """`exp(mean NLL over predicted tokens)` on consecutive non-overlapping `seq_len`-token windows.

    The corpus is tokenized once; documents of a .jsonl source are joined with blank lines. With equal window
    lengths this equals `exp(mean window loss)`.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        source: "wikitext2" (test split from the Hub), or a local .txt/.jsonl file.
        seq_len: window length.
        max_windows: evaluate only the first windows (None: all full windows).
        split: split of a Hub dataset.

    Example:
    ```python
    >>> from optimum_d2prune.evaluation import perplexity
    >>> perplexity(model, tokenizer, "wikitext2_test.txt", seq_len=512, max_windows=32)
    ```
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len` must be an integer >= 2, got {seq_len!r}.")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"`max_windows` must be a positive integer or None, got {max_windows!r}.")
    docs, _ = load_documents(source, split=split)
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids
    windows = ids.shape[1] // seq_len
    if windows == 0:
        raise ValueError(f"{source} has {ids.shape[1]} tokens, fewer than one window of {seq_len}.")
    if max_windows is not None:
        windows = min(windows, max_windows)
    device = model.get_input_embeddings().weight.device
    nll = 0.0
    with calibration_context(model):
        for w in tqdm(range(windows), desc="perplexity", leave=False):
            x = ids[:, w * seq_len : (w + 1) * seq_len].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))
    ppl = math.exp(nll / windows)
    logger.info("Perplexity on %d x %d tokens of %s: %.4f", windows, seq_len, source, ppl)
    return ppl
