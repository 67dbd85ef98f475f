"""Perplexity on non-overlapping windows of a text corpus (the LLM-pruning papers' WikiText-2 protocol), and on
already-tokenized batches (held-out calibration data, self-generated text): one implementation for both."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sized
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import DocumentRange, _check_range_source, _load_hub, document_range
from ..calibration.hooks import calibration_context
from ..calibration.sources import DataSource, resolve_data_source
from ..calibration.text import running_text, token_windows
from ..errors import InputError

logger = logging.getLogger(__name__)


class Perplexity(float):
    """A perplexity: a `float` (arithmetic, formatting, comparisons and JSON treat it as one) that also says what was
    scored: `windows` (sequences) and `tokens` (predicted positions, the count the mean NLL is over).

    A float subclass rather than a result object so that every caller that stores, compares or prints the value keeps
    working; `ppl.windows` and `ppl.tokens` are there for the callers that report the size.
    """

    windows: int
    tokens: int

    def __new__(cls, value: float, windows: int = 0, tokens: int = 0) -> "Perplexity":
        obj = super().__new__(cls, value)
        obj.windows, obj.tokens = windows, tokens
        return obj

    def __reduce__(self):
        return (Perplexity, (float(self), self.windows, self.tokens))


def perplexity_of_batches(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], desc: str = "perplexity"
) -> Perplexity:
    """`exp(mean NLL per predicted token)` of `model` on token batches (`{"input_ids": [B, T], "attention_mask": ...}`,
    the calibration format).

    Positions whose target is masked out (`attention_mask == 0`) are not scored; an all-ones mask is the same as
    none and is not passed to the model. The mean is over tokens: when every batch scores the same number of tokens
    (windows of one length) it is computed as the mean of the batch losses, in order, which is what the WikiText-2
    protocol of the papers computes.
    """
    device = model.get_input_embeddings().weight.device
    losses: list[float] = []
    counts: list[int] = []
    total = len(batches) if isinstance(batches, Sized) else None
    with calibration_context(model):
        for batch in tqdm(batches, desc=desc, unit="window", total=total):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            if mask is not None and bool(mask.all()):
                mask = None
            if mask is None:
                logits = model(input_ids=ids).logits[:, :-1].float()
                targets = ids[:, 1:]
            else:
                mask = mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            count = int((targets != -100).sum())
            if count == 0:
                continue
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            losses.append(float(loss))
            counts.append(count)
    if not losses:
        raise InputError("No token to score: every batch is empty or masked out.")
    nll = 0.0
    if len(set(counts)) == 1:
        for loss in losses:
            nll += loss
        mean = nll / len(losses)
    else:
        for loss, count in zip(losses, counts):
            nll += loss * count
        mean = nll / sum(counts)
    return Perplexity(math.exp(mean), len(losses), sum(counts))


def perplexity(
    model: nn.Module,
    tokenizer,
    source: Union[str, os.PathLike, DataSource, Sequence[dict[str, torch.Tensor]]] = "wikitext2",
    seq_len: int = 2048,
    max_windows: Optional[int] = None,
    split: str = "test",
    desc: str = "perplexity",
    documents: Optional[DocumentRange] = None,
) -> Perplexity:
    """`exp(mean NLL over predicted tokens)` on consecutive non-overlapping `seq_len`-token windows.

    Documents of a .jsonl source are joined with blank lines. With equal window lengths this equals
    `exp(mean window loss)`. `source` may also be token sequences already made (the batches of
    `self_generated_calibration`, e.g. held-out text sampled from the dense model): each is one window. The text is
    tokenized no further than the windows asked for (`calibration.text`): with `max_windows`, a prefix whose ids
    are checked to be the whole text's; without, the whole text up to 16 MiB, chunk by chunk above.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        source: "wikitext2" (test split from the Hub), a local .txt/.jsonl file (or its `DataSource`), or a list
            of `{"input_ids": LongTensor[1, T]}` batches.
        seq_len: window length (ignored for token sequences).
        max_windows: evaluate only the first windows (None: all full windows).
        split: split of a Hub dataset.
        desc: label of the progress bar.
        documents: score only this contiguous range of documents of a .jsonl source, joined with blank lines
            (e.g. `range(700, 800)`: held-out documents of a dev split calibrated on `range(0, 700)`).

    Returns:
        A `Perplexity` (a float) whose `windows` and `tokens` say how much was scored.

    Example:
    ```python
    >>> from optimum_d2prune.evaluation import perplexity
    >>> ppl = perplexity(model, tokenizer, "wikitext2_test.txt", seq_len=512, max_windows=32)
    >>> print(f"{ppl:.2f} on {ppl.windows} x 512 tokens")
    >>> perplexity(model, tokenizer, "c4_train_sample.jsonl", seq_len=512, max_windows=32, documents=range(700, 800))
    ```
    """
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise InputError(f"`max_windows` must be a positive integer or None, got {max_windows!r}.")
    if isinstance(source, (list, tuple)):
        if documents is not None:
            raise InputError("`documents` selects documents of a file or Hub source, not of given token sequences.")
        windows = list(source)[:max_windows]
        if not windows:
            raise InputError("`source` holds no token sequence.")
        name = f"{len(windows)} given sequences"
    else:
        if not isinstance(seq_len, int) or seq_len < 2:
            raise InputError(f"`seq_len` must be an integer >= 2, got {seq_len!r}.")
        src = resolve_data_source(source)
        if src.kind == "self":
            raise InputError("`self` text is generated by the model: pass the batches of "
                             "`self_generated_calibration(...)` as `source`.")
        _check_range_source(src, documents)
        hub_docs = _load_hub(src.name, split) if src.kind == "hub" else None
        chosen = None
        if documents is not None:
            chosen = document_range(documents, src.documents if hub_docs is None else len(hub_docs), src.name)
        pieces, size = running_text(src, hub_docs, chosen, tokenizer)
        ids, count = token_windows(pieces, size, tokenizer, seq_len, max_windows, src.name)
        windows = ({"input_ids": w} for w in ids) if count is None else [{"input_ids": w} for w in ids]
        name = f"{count or 'all'} x {seq_len} tokens of {src.name}" + ("" if documents is None else f" ({documents})")
    ppl = perplexity_of_batches(model, windows, desc)
    logger.info("Perplexity on %s: %.4f", name, ppl)
    return ppl

