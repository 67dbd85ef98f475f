"""Token ids of a running text (a .txt file, WikiText-2, or the documents of a source joined with blank lines), in
bounded memory.

A fast tokenizer's encoding of one string costs about 170 bytes per byte of text, so a running text is never
tokenized as one string beyond what is asked for:

- **A prefix** (`prefix_ids`): the first `n` tokens come from tokenizing a prefix of the text a little longer than
  they need, grown until it holds them. They are the whole text's first `n` tokens: a second prefix half as long
  again must give the same `n` ids (tokenizers pre-tokenize locally, so only the tokens next to a cut can differ),
  otherwise the prefix grows. Perplexity on the first windows and every length check use this.
- **The whole text** (`whole_ids`), up to `EXACT_TEXT_BYTES`: as SparseGPT and the papers tokenize it.
- **Chunks** (`streamed_ids`), above that size: the text is cut into chunks of about `CHUNK_BYTES` at line ends and
  each chunk is tokenized on its own (special tokens only on the first). Ids can differ from a whole-text
  tokenization next to a cut (a few tokens per MiB); memory stays that of one chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

import torch

from ..errors import InputError
from . import sources
from .sources import DataSource, FileDocuments, text_pieces

#: tokens the prefix must hold beyond those asked for before its ids are compared with a longer prefix's
_MARGIN_TOKENS = 64
_CHARS_PER_TOKEN = 8  # a generous first guess (English BPE: about 4.3); the prefix grows if it is short

Pieces = Callable[[], Iterable[str]]  # a fresh iterator over the pieces of the running text, each call


def running_text(source: DataSource, hub_docs: Optional[list[str]] = None, documents: Optional[range] = None,
                 tokenizer: Any = None) -> tuple[Pieces, int]:
    """`(pieces, size)`: the running text of `source` and its size in bytes (an upper bound for joined records).

    A .txt file is its text; documents (.jsonl records, Hub documents) are joined with blank lines, as the papers'
    WikiText-2 loader does; conversations (`messages` records) are rendered with the chat template and joined.
    `documents` selects a contiguous range of records.
    """
    if source.format == "text":
        return (lambda: text_pieces(source.path)), source.size
    if hub_docs is not None:
        docs = hub_docs if documents is None else hub_docs[documents.start : documents.stop]
        return (lambda: _joined(docs, "\n\n")), sum(len(d) for d in docs) + 2 * len(docs)
    docs = FileDocuments(source, *((documents.start, documents.stop) if documents is not None else ()))
    offsets = source.offsets
    stop = docs.stop
    size = (offsets[stop] if stop < len(offsets) else source.size) - offsets[docs.start]
    if source.chat:
        from .chat import render_conversation

        return (lambda: (render_conversation(tokenizer, m) for m in docs)), size
    return (lambda: _joined(docs, "\n\n")), size


def _joined(docs: Iterable[str], separator: str) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if i:
            yield separator
        yield doc


def read_prefix(pieces: Iterable[str], chars: int) -> tuple[str, bool]:
    """The first `chars` characters of the text and whether that is all of it."""
    parts, have = [], 0
    for piece in pieces:
        if have + len(piece) > chars:
            parts.append(piece[: chars - have])
            return "".join(parts), False
        parts.append(piece)
        have += len(piece)
    return "".join(parts), True


def encode(tokenizer: Any, text: str, where: str, special: bool = True) -> torch.Tensor:
    """`LongTensor[1, n]` of `text`; a tokenizer failure becomes an `InputError` naming `where`."""
    try:
        if special:
            ids = tokenizer(text, return_tensors="pt").input_ids
        else:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    except Exception as err:  # noqa: BLE001 - a failure on this text: name it
        raise InputError(f"{where}: the tokenizer cannot encode this text ({type(err).__name__}: {err}).") from err
    return ids.long()


def prefix_ids(pieces: Pieces, tokenizer: Any, need: int, where: str) -> torch.Tensor:
    """The whole text's first `need` token ids (fewer when the text is shorter), from a bounded prefix of it."""
    chars = max(4096, need * _CHARS_PER_TOKEN)
    while True:
        text, complete = read_prefix(pieces(), chars)
        ids = encode(tokenizer, text, where)
        if complete:
            return ids[:, :need]
        if ids.shape[1] >= need + _MARGIN_TOKENS:
            longer, complete = read_prefix(pieces(), chars + chars // 2)
            check = encode(tokenizer, longer, where)
            if complete or torch.equal(check[:, :need], ids[:, :need]):
                return check[:, :need]
        chars *= 2


def whole_ids(pieces: Pieces, tokenizer: Any, where: str) -> torch.Tensor:
    """The whole text tokenized as one string (used up to `EXACT_TEXT_BYTES`)."""
    return encode(tokenizer, "".join(pieces()), where)


def text_chunks(pieces: Iterable[str], chunk_chars: Optional[int] = None) -> Iterator[str]:
    """The text in chunks of at least `chunk_chars` (default `CHUNK_BYTES`) characters, each ending at a line end
    (the last at the end of the text)."""
    chunk_chars = chunk_chars or sources.CHUNK_BYTES
    buffer: list[str] = []
    have = 0
    for piece in pieces:
        buffer.append(piece)
        have += len(piece)
        while have >= chunk_chars:
            text = "".join(buffer)
            cut = text.find("\n", chunk_chars - 1)
            if cut < 0 and have < 4 * chunk_chars:
                buffer, have = [text], len(text)
                break
            if cut < 0:  # a line of several chunks: cut it
                cut = chunk_chars - 1
            yield text[: cut + 1]
            rest = text[cut + 1 :]
            buffer, have = [rest], len(rest)
    tail = "".join(buffer)
    if tail:
        yield tail


def streamed_ids(pieces: Pieces, tokenizer: Any, where: str) -> Iterator[torch.Tensor]:
    """Token ids of the text chunk by chunk (special tokens on the first chunk only), for texts above the limit."""
    for i, chunk in enumerate(text_chunks(pieces())):
        yield encode(tokenizer, chunk, f"{where}, chunk {i + 1}", special=i == 0)


def windows(ids: torch.Tensor, seq_len: int, count: Optional[int] = None) -> list[torch.Tensor]:
    """Consecutive non-overlapping `[1, seq_len]` windows of `ids` (at most `count`)."""
    total = ids.shape[1] // seq_len if count is None else min(count, ids.shape[1] // seq_len)
    return [ids[:, w * seq_len : (w + 1) * seq_len] for w in range(total)]


def streamed_windows(chunks: Iterable[torch.Tensor], seq_len: int) -> Iterator[torch.Tensor]:
    """Consecutive `[1, seq_len]` windows over a stream of id chunks (the remainder carries to the next chunk)."""
    carry = torch.zeros(1, 0, dtype=torch.long)
    for ids in chunks:
        carry = torch.cat([carry, ids], dim=1)
        full = carry.shape[1] // seq_len
        for w in range(full):
            yield carry[:, w * seq_len : (w + 1) * seq_len].clone()
        carry = carry[:, full * seq_len :]


def token_windows(pieces: Pieces, size: int, tokenizer: Any, seq_len: int, max_windows: Optional[int],
                  where: str) -> tuple[Iterable[torch.Tensor], Optional[int]]:
    """`(windows, count)` of the evaluation protocol: consecutive `seq_len`-token windows of the running text, the
    first `max_windows` of them (all when None). `count` is None when the windows are streamed (a text above
    `EXACT_TEXT_BYTES` with no `max_windows`). Raises `InputError` when not even one window fits.
    """
    if max_windows is not None:
        ids = prefix_ids(pieces, tokenizer, max_windows * seq_len, where)
    elif size <= sources.EXACT_TEXT_BYTES:
        ids = whole_ids(pieces, tokenizer, where)
    else:
        stream = streamed_windows(streamed_ids(pieces, tokenizer, where), seq_len)
        first = next(stream, None)
        if first is None:
            raise InputError(f"{where} has fewer tokens than one window of {seq_len}.")
        return itertools.chain([first], stream), None
    found = windows(ids, seq_len, max_windows)
    if not found:
        raise InputError(f"{where} has {ids.shape[1]} tokens, fewer than one window of {seq_len}.")
    return found, len(found)
