"""GPU deployment: batches of token ids → vectors, batched across requests by token budget."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from serve_app.deployments.autoscaling import BACKLOG_REQUESTS, BACKLOG_TOKENS
from serve_app.deployments.chunks import count_tokens, flatten, split_rows
from serve_app.deployments.metrics import EmbedderMetrics
from serve_app.deployments.serve_logging import drop_batch_size_warning
from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.spec import MAX_BATCHES_IN_FLIGHT, ModelSpec


def count_queued_tokens(items: list[tuple[list[list[int]], float]]) -> int:
    return count_tokens([chunk for chunk, _ in items])


# A replica being replaced (redeploy) or scaled down serves the chunks already queued at it
# before it exits; Serve force-kills it after graceful_shutdown_timeout_s (default 20 s), and a
# queue admitted under load can take longer than that (up to max_ongoing_requests chunks of
# max_batch_tokens). Keep this below the Ingress's GRACEFUL_SHUTDOWN_TIMEOUT_S, so that an
# ingress outlives the drain and can retry a chunk lost to a force-kill.
@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  graceful_shutdown_timeout_s=120)
class Embedder:
    def __init__(self, spec: dict):
        drop_batch_size_warning()  # our batch sizes count tokens: see serve_logging
        self.spec = ModelSpec.model_validate(spec)
        # Ray sets OMP_NUM_THREADS from the replica's num_cpus; match torch to it so that
        # replicas sharing a machine don't oversubscribe its cores.
        threads = max(1, self.spec.cpu_threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
        torch.set_num_threads(threads)
        self.engine = EmbeddingEngine.load(self.spec, cpu_threads=threads)
        # By default one batch in flight per CPU lane: the lanes take the next batch's passes
        # while a batch's last pass, its replies and the next batch's assembly finish, and two
        # small batches (one pass each) run side by side instead of one after the other. A GPU
        # (one lane) runs one batch at a time, so its memory holds one batch's activations.
        # Batches run on dedicated threads, so the state that torch, OpenMP and malloc keep per
        # calling thread (thread count, OpenMP team, arena) stays with them.
        self._in_flight = self.spec.batches_in_flight or self.engine.lanes
        self._batches_in_flight = asyncio.Semaphore(self._in_flight)
        self._forward_threads = ThreadPoolExecutor(self._in_flight, thread_name_prefix="forward")
        # Warm up (on those threads and the engine's lanes) before Serve marks the replica
        # ready, so the first real request doesn't pay for it and /health means "ready to serve".
        self._forward_threads.submit(self.engine.warm_up).result()
        self._embed_batch.set_max_batch_size(self.spec.max_batch_tokens)
        self._embed_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        # Batch slots' busy time in the current ~1 s window, for the adaptive batch wait.
        self._busy_s, self._window_start = 0.0, time.perf_counter()
        # Work held by this replica (queued in the batcher or in the forward pass).
        self.backlog_tokens = 0
        self.backlog_requests = 0
        self.metrics = EmbedderMetrics()
        self.metrics_tags = {"model": self.spec.name}

    async def embed(self, chunk: list[list[int]]) -> np.ndarray:
        """Vectors for one chunk (whose tokens fit the batch budget), in order."""
        tokens = sum(len(ids) for ids in chunk)
        self._change_backlog(tokens, 1)
        try:
            return await self._embed_batch((chunk, time.perf_counter()))
        finally:
            self._change_backlog(-tokens, -1)

    def _change_backlog(self, tokens: int, requests: int) -> None:
        self.backlog_tokens += tokens
        self.backlog_requests += requests
        self.metrics.backlog_tokens.set(self.backlog_tokens, self.metrics_tags)
        self.metrics.backlog_requests.set(self.backlog_requests, self.metrics_tags)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Read by Serve's autoscaler; see autoscaling.TokenBacklogPolicy."""
        return {BACKLOG_TOKENS: self.backlog_tokens, BACKLOG_REQUESTS: self.backlog_requests}

    # Serve's cap on concurrent batches is fixed at import; _batches_in_flight is the replica's.
    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, max_concurrent_batches=MAX_BATCHES_IN_FLIGHT,
                 batch_size_fn=count_queued_tokens)
    async def _embed_batch(self, items: list[tuple[list[list[int]], float]]) -> list[np.ndarray]:
        async with self._batches_in_flight:
            started = time.perf_counter()
            for _, queued_at in items:
                self.metrics.queue_wait.observe(started - queued_at, self.metrics_tags)
            chunks = [chunk for chunk, _ in items]
            # Off the event loop, so new requests keep queueing (and batches fill) while it runs.
            done = await asyncio.get_running_loop().run_in_executor(
                self._forward_threads, self.engine.embed_counted, flatten(chunks)
            )
            forward_s = time.perf_counter() - started
        self.metrics.forward.observe(forward_s, self.metrics_tags)
        self._adapt_batch_wait(forward_s / self._in_flight)
        self.metrics.batch_tokens.observe(done.real_tokens, self.metrics_tags)
        padding = 1.0 - done.real_tokens / done.padded_tokens if done.padded_tokens else 0.0
        self.metrics.padding_ratio.observe(padding, self.metrics_tags)
        return split_rows(done.vectors, chunks)

    def _adapt_batch_wait(self, busy_s: float) -> None:
        # A busy replica waits longer so batches grow: a pass has a fixed cost. On a saturated
        # 2-core server, 1.32x on one-query requests vs a fixed 5 ms wait (`python -m
        # bench.serve_variants --variants shipped,fixed-wait-5ms`); an idle replica keeps the
        # short wait, so a lone request is not held back. `busy_s`: forward time per batch slot.
        now = time.perf_counter()
        self._busy_s += busy_s
        if now - self._window_start >= 1.0:
            busy = self._busy_s / (now - self._window_start) > 0.5
            self._embed_batch.set_batch_wait_timeout_s(
                self.spec.busy_batch_wait_timeout_s if busy else self.spec.batch_wait_timeout_s
            )
            self._busy_s, self._window_start = 0.0, now

    def describe(self) -> dict:
        resolved = self.engine.resolved
        return {
            "dimensions": self.engine.dimensions,
            "max_input_tokens": resolved.max_input_tokens,
            "max_batch_tokens": self.spec.max_batch_tokens,
            "pooling": self.engine.pooling,
            "normalize": self.spec.normalize,
            "device": self.engine.device,
        }
