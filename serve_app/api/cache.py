"""The Ingress's vector cache: a bounded LRU keyed by the exact token ids the model would see.

A key is (model fingerprint, token ids): the fingerprint covers everything that changes a
vector (source, revision, adapter, pooling, dtype, ...), and the ids include the instruction
and the special tokens, so two requests share an entry only if the model would compute the
same thing for both. A hit returns the stored float32 row itself, so a cached vector equals the
freshly computed one bit for bit. `dimensions` and the encoding are applied afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Per entry beyond the key's and the vector's bytes: the dict slot, the key tuple, the bytes and
# ndarray headers (measured with sys.getsizeof on CPython 3.11: ~230 bytes).
ENTRY_OVERHEAD_BYTES = 256

Key = tuple[str, bytes]


class CacheConfig(BaseModel):
    """`args.cache` of the app: one cache per Ingress replica, shared by its models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Bytes of vectors (and keys) one Ingress replica keeps; 0 turns the cache off.",
    )


class VectorCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> np.ndarray | None:
        row = self._entries.get(key)
        if row is not None:
            self._entries.move_to_end(key)
        return row

    def put(self, key: Key, row: np.ndarray) -> int:
        """Store a copy of `row` (not a view that would pin its whole batch); returns evictions."""
        size = _entry_bytes(key, row)
        if size > self.max_bytes or key in self._entries:
            return 0
        self._entries[key] = np.array(row, dtype=np.float32, copy=True)
        self.bytes += size
        evicted = 0
        while self.bytes > self.max_bytes:
            old_key, old_row = self._entries.popitem(last=False)
            self.bytes -= _entry_bytes(old_key, old_row)
            evicted += 1
        return evicted


def _entry_bytes(key: Key, row: np.ndarray) -> int:
    return len(key[1]) + row.nbytes + ENTRY_OVERHEAD_BYTES


def ids_key(fingerprint: str, ids: list[int]) -> Key:
    return fingerprint, np.asarray(ids, dtype=np.int32).tobytes()


@dataclass
class Lookup:
    """One request's inputs after the cache: the rows it had, and the distinct ones to compute."""

    rows: list[np.ndarray | None]
    misses: dict[Key, list[int]] = field(default_factory=dict)  # distinct missing input → its positions

    @property
    def hits(self) -> int:
        return len(self.rows) - sum(len(positions) for positions in self.misses.values())

    def to_compute(self, sequences: list[list[int]]) -> list[list[int]]:
        """Each missing input once (a repeated input within the request is computed once)."""
        return [sequences[positions[0]] for positions in self.misses.values()]

    def complete(self, computed: np.ndarray | None, cache: VectorCache | None) -> tuple[np.ndarray, int]:
        """All rows in input order, storing the computed ones (None: no misses) in `cache` if
        given; and the number of evictions."""
        evicted = 0
        for (key, positions), row in zip(self.misses.items(), () if computed is None else computed, strict=True):
            if cache is not None:
                evicted += cache.put(key, row)
            for position in positions:
                self.rows[position] = row
        # Every position is a hit or one of the misses filled above.
        return np.stack(cast(list[np.ndarray], self.rows)), evicted


def look_up(cache: VectorCache, fingerprint: str, sequences: list[list[int]]) -> Lookup:
    lookup = Lookup(rows=[None] * len(sequences))
    for position, ids in enumerate(sequences):
        key = ids_key(fingerprint, ids)
        row = cache.get(key)
        if row is None:
            lookup.misses.setdefault(key, []).append(position)
        else:
            lookup.rows[position] = row
    return lookup
