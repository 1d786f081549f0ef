"""Give freed host memory back to the OS after forward passes (glibc only; a no-op elsewhere).

A CPU forward pass allocates activations whose sizes change with every batch shape. glibc keeps
freed blocks in its heap for reuse and, once a large block has been freed, raises its mmap
threshold so that later blocks of that size come from the heap too; with ever-different shapes
the heap fragments and the replica's RSS climbs for as long as it serves. `malloc_trim(0)` hands
the free pages back; rate-limited, so a stream of small batches does not pay for one per call.
`python -m tests.scenarios.test_soak` shows the effect (docs/decisions.md#malloc-trim).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


class HostMemoryTrimmer:
    def __init__(self, min_interval_s: float = 0.5):
        self._malloc_trim = _load_malloc_trim()
        self._min_interval_s = min_interval_s
        self._last = 0.0
        self._lock = threading.Lock()  # engines run passes from several threads

    def maybe_trim(self) -> None:
        """Trim at most once per `min_interval_s`; call after a forward pass."""
        if self._malloc_trim is None:
            return
        if time.monotonic() - self._last < self._min_interval_s or not self._lock.acquire(blocking=False):
            return
        try:
            self._malloc_trim(0)
            self._last = time.monotonic()
        finally:
            self._lock.release()
