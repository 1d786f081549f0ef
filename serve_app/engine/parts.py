"""Parts: lists of token-id sequences cut to one Embedder call's token budget, which travel to
an Embedder together and come back as one array of rows (docs/glossary.md). Shared by the
Ingress (coalescing), the Embedder (batching) and the batch job."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from serve_app.engine.errors import RowsOutOfMemory

T = TypeVar("T")


def cut_to_budget(items: Sequence[T], max_tokens: int, size: Callable[[T], int] = len) -> list[list[T]]:  # type: ignore[assignment]
    """Consecutive groups of items of at most `max_tokens` tokens each (a larger item alone), in
    order; `size` counts an item's tokens (default: a token-id sequence's length)."""
    parts: list[list[T]] = []
    current: list[T] = []
    tokens = 0
    for item in items:
        if current and tokens + size(item) > max_tokens:
            parts.append(current)
            current, tokens = [], 0
        current.append(item)
        tokens += size(item)
    return parts + [current] if current else parts


def count_tokens(parts: list[list[list[int]]]) -> int:
    return sum(len(ids) for part in parts for ids in part)


def flatten(parts: list[list[list[int]]]) -> list[list[int]]:
    return [ids for part in parts for ids in part]


def split_rows(vectors: np.ndarray, parts: list[list[list[int]]]) -> list[np.ndarray]:
    """The rows computed for `flatten(parts)`, cut back into one array per part."""
    return np.split(vectors, np.cumsum([len(part) for part in parts])[:-1])


def per_part(vectors: np.ndarray, parts: list[list[list[int]]], unfit_rows: Iterable[int]
             ) -> list[np.ndarray | RowsOutOfMemory]:
    """Each part's vectors, or RowsOutOfMemory (holding the part's vectors, NaN in those rows)
    for a part with rows that did not fit: one part's failure leaves the call's others whole."""
    split: list[np.ndarray | RowsOutOfMemory] = list(split_rows(vectors, parts))
    start = 0
    unfit_rows = list(unfit_rows)
    for k, part in enumerate(parts):
        rows = [row - start for row in unfit_rows if start <= row < start + len(part)]
        if rows:
            split[k] = RowsOutOfMemory.of(rows, split[k])
        start += len(part)
    return split
