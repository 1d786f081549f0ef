"""Which forward pass runs next: interactive work first, batch work with a guaranteed share.

Every call to the engine belongs to a request class. Its passes wait in that class's queue;
lane threads take the next pass as soon as they are free. Between passes an interactive pass
always goes before a batch pass, so a query waits at most for the passes already running, not
for the batch work queued ahead of it. When both classes have passes waiting, batch work still
gets at least `batch_share` of the passes started (with 0.25: every fourth), so indexing never
starves under a stream of queries. Within a class, passes run first come, first served.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from enum import StrEnum
from typing import Any, TypeVar


class RequestClass(StrEnum):
    """Interactive (a person waits) or batch (indexing): docs/glossary.md. A str, so that it
    travels to Serve replicas, metric tags and headers as its value."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


# A queued pass: what to run, and the future that gets its result.
Pass = tuple[Callable[[], Any], Future[Any]]
T = TypeVar("T")


class PassScheduler:
    def __init__(
        self,
        lanes: int,
        batch_share: float,
        lane_initializer: Callable[[], None] | None = None,
        thread_name: str = "lane",
    ):
        if not 0 < batch_share < 1:
            raise ValueError("batch_share must be between 0 and 1")
        self.batch_share = batch_share
        self._queues: dict[RequestClass, deque[Pass]] = {RequestClass.INTERACTIVE: deque(), RequestClass.BATCH: deque()}
        self._ready = threading.Condition()
        # Passes started while both classes were waiting, and how many of them were batch.
        self._contested = 0
        self._contested_batch = 0
        self._closed = False
        self._lanes = [
            threading.Thread(target=self._lane, args=(lane_initializer,), name=f"{thread_name}_{i}", daemon=True)
            for i in range(lanes)
        ]
        for thread in self._lanes:
            thread.start()

    def submit(self, request_class: RequestClass, run: Callable[[], T]) -> Future[T]:
        """Queue one pass; the future resolves to what `run()` returns (or raises)."""
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._queues[request_class].append((run, future))
            self._ready.notify()
        return future

    def close(self) -> None:
        """Let the lanes finish the passes already queued, then stop them."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._lanes:
            thread.join()

    def _next(self) -> Pass:
        """The next pass to start (call with the lock held and a pass waiting)."""
        interactive, batch = self._queues[RequestClass.INTERACTIVE], self._queues[RequestClass.BATCH]
        if not (interactive and batch):
            self._contested = self._contested_batch = 0  # a contest ends when one side is empty
            return (interactive or batch).popleft()
        self._contested += 1
        if self._contested_batch + 1 <= self.batch_share * self._contested + 1e-9:  # float slack
            self._contested_batch += 1
            return batch.popleft()
        return interactive.popleft()

    def _lane(self, initializer: Callable[[], None] | None) -> None:
        if initializer is not None:
            initializer()
        while True:
            with self._ready:
                while not (self._queues[RequestClass.INTERACTIVE] or self._queues[RequestClass.BATCH] or self._closed):
                    self._ready.wait()
                if not (self._queues[RequestClass.INTERACTIVE] or self._queues[RequestClass.BATCH]):
                    return  # closed and drained
                run, future = self._next()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(run())
            except BaseException as exc:  # noqa: BLE001 — the caller gets it from the future
                future.set_exception(exc)
