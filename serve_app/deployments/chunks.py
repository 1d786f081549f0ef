"""Chunks: lists of token-id sequences that travel to an Embedder together and come back as
one array of rows. Shared by the Ingress (coalescing) and the Embedder (batching)."""

from __future__ import annotations

import numpy as np

from serve_app.engine.errors import RowsOutOfMemory


def cut_to_budget(items: list, max_tokens: int, size=len) -> list[list]:
    """Consecutive groups of items of at most `max_tokens` tokens each (a larger item alone), in
    order; `size` counts an item's tokens (default: a token-id sequence's length)."""
    chunks, current, tokens = [], [], 0
    for item in items:
        if current and tokens + size(item) > max_tokens:
            chunks.append(current)
            current, tokens = [], 0
        current.append(item)
        tokens += size(item)
    return chunks + [current] if current else chunks


def count_tokens(chunks: list[list[list[int]]]) -> int:
    return sum(len(ids) for chunk in chunks for ids in chunk)


def flatten(chunks: list[list[list[int]]]) -> list[list[int]]:
    return [ids for chunk in chunks for ids in chunk]


def split_rows(vectors: np.ndarray, chunks: list[list[list[int]]]) -> list[np.ndarray]:
    """The rows computed for `flatten(chunks)`, cut back into one array per chunk."""
    return np.split(vectors, np.cumsum([len(chunk) for chunk in chunks])[:-1])


def per_chunk(vectors: np.ndarray, chunks: list[list[list[int]]], unfit_rows) -> list:
    """Each chunk's vectors, or RowsOutOfMemory (holding the chunk's vectors, NaN in those rows)
    for a chunk with rows that did not fit: one chunk's failure leaves the batch's others whole."""
    parts, start = split_rows(vectors, chunks), 0
    for k, chunk in enumerate(chunks):
        rows = [row - start for row in unfit_rows if start <= row < start + len(chunk)]
        if rows:
            parts[k] = RowsOutOfMemory.of(rows, parts[k])
        start += len(chunk)
    return parts
