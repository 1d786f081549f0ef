"""GPU deployment: batches of token ids → vectors, batched across requests by token budget."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ray import serve

from serve_app.deployments.autoscaling import BACKLOG_REQUESTS, BACKLOG_TOKENS
from serve_app.deployments.metrics import EmbedderMetrics
from serve_app.deployments.model_info import ModelInfo
from serve_app.deployments.serve_logging import drop_batch_size_warning
from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.errors import RowsOutOfMemory
from serve_app.engine.parts import count_tokens, flatten, per_part
from serve_app.engine.scheduling import RequestClass
from serve_app.engine.spec import MAX_BATCHES_IN_FLIGHT, ModelSpec

logger = logging.getLogger(__name__)

# Serve calls check_health every HEALTH_CHECK_PERIOD_S and replaces a replica after 3 failures in a
# row (Serve's threshold). The check is a tiny device operation, waited for: it queues behind the
# device work already launched (the engine keeps at most one pass waiting behind the running
# one; a 16384-token SFR pass takes ~0.3 s at the throughput bound ARCHITECTURE.md derives for
# an H100), so a timeout of 10 s means a hung device, not a busy one. A poisoned device fails each check at once: found
# within ~15 s on an idle replica; a replica whose pass meets the fault leaves at once (see
# _leave_if_device_broken).
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 10.0

@dataclass
class Queued:
    """A part waiting at this replica: its token ids, each row's model, and when it arrived.
    `abandoned` is set when its caller goes away. Serve's batcher drops a cancelled call only
    while it is still queued; a batch already formed waits for one of the replica's batch slots
    and skips its abandoned parts once it gets one, so a cancelled request's parts are not
    computed for nobody."""

    part: list[list[int]]
    models: list[str]
    queued_at: float
    abandoned: bool = False


def count_queued_tokens(items: list[Queued]) -> int:
    return count_tokens([item.part for item in items])


# A replica being replaced (redeploy) or scaled down serves the parts already queued at it
# before it exits; Serve force-kills it after graceful_shutdown_timeout_s (default 20 s), and a
# queue admitted under load can take longer than that (up to max_ongoing_requests parts of
# max_batch_tokens). Keep this below the Ingress's GRACEFUL_SHUTDOWN_TIMEOUT_S, so that an
# ingress outlives the drain and can retry a part lost to a force-kill.
@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  graceful_shutdown_timeout_s=120, health_check_period_s=HEALTH_CHECK_PERIOD_S,
                  health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S)
class Embedder:
    def __init__(self, specs: list[dict]):
        """The deployment's models: one, or several over one base (spec.share_base), which share
        the deployment's settings and differ in their adapters."""
        drop_batch_size_warning()  # our batch sizes count tokens: see serve_logging
        self.specs = {spec.name: spec for spec in map(ModelSpec.model_validate, specs)}
        self.spec = next(iter(self.specs.values()))  # the settings they share
        self.engine = EmbeddingEngine.load_in_worker(list(self.specs.values()))
        # Per request class, by default one batch in flight per CPU lane: the lanes take the
        # next batch's passes while a batch's last pass, its replies and the next batch's
        # assembly finish, and two small batches (one pass each) run side by side. The engine's
        # scheduler orders the passes of all batches in flight (interactive first), and runs one
        # pass at a time per lane, so on a GPU the memory holds one pass's activations.
        self._in_flight = self.spec.tuning.batches_in_flight or self.engine.lanes
        self._slots = {request_class: asyncio.Semaphore(self._in_flight) for request_class in RequestClass}
        # Threads that wait for the engine's lanes, so the event loop never blocks.
        self._forward_threads = ThreadPoolExecutor(len(RequestClass) * self._in_flight, thread_name_prefix="forward")
        # Device probes on a thread of their own: one stuck on a hung device blocks no forward.
        self._probe_thread = ThreadPoolExecutor(1, thread_name_prefix="device-probe")
        # Warm up (on the engine's lanes) before Serve marks the replica ready, so the first real
        # request doesn't pay for it and /health means "ready to serve".
        self._forward_threads.submit(self.engine.warm_up).result()
        self._batchers = {RequestClass.INTERACTIVE: self._embed_interactive, RequestClass.BATCH: self._embed_batch}
        for batcher in self._batchers.values():
            batcher.set_max_batch_size(self.spec.max_batch_tokens)
            batcher.set_batch_wait_timeout_s(self._batch_wait_s(busy=False))
        # Per class, its batch slots' busy time in the current ~1 s window and the window's start,
        # for the adaptive batch wait.
        self._busy = {request_class: [0.0, time.perf_counter()] for request_class in RequestClass}
        # Work held by this replica (queued in the batchers or in forward passes), per class.
        self.backlog = {request_class: [0, 0] for request_class in RequestClass}  # tokens, parts
        self.metrics = EmbedderMetrics()
        self.metrics_tags = {"model": "+".join(self.specs)}  # a shared base: all of its models
        self._class_tags = {c: self.metrics_tags | {"priority": c.value} for c in RequestClass}

    async def embed(self, part: list[list[int]], request_class: str, models: list[str]) -> np.ndarray | RowsOutOfMemory:
        """Vectors for one part (whose tokens fit the batch budget), in order; `models` names
        each row's model, so that a batch may mix the adapters of a shared base. Returned, not
        raised: RowsOutOfMemory when some row did not fit in device memory even alone; it holds
        the other rows' vectors, which belong to other requests when the Ingress coalesced them."""
        if len(models) != len(part) or not self.specs.keys() >= set(models):
            raise ValueError(f"models must name one of {list(self.specs)} for each of the part's {len(part)} rows")
        request_class = RequestClass(request_class)
        tokens = sum(len(ids) for ids in part)
        self._change_backlog(request_class, tokens, 1)
        queued = Queued(part, models, time.perf_counter())
        try:
            return await self._batchers[request_class](queued)
        except asyncio.CancelledError:
            queued.abandoned = True
            raise
        finally:
            self._change_backlog(request_class, -tokens, -1)

    def _change_backlog(self, request_class: RequestClass, tokens: int, parts: int) -> None:
        backlog = self.backlog[request_class]
        backlog[0] += tokens
        backlog[1] += parts
        self.metrics.backlog_tokens.set(backlog[0], self._class_tags[request_class])
        self.metrics.backlog_requests.set(backlog[1], self._class_tags[request_class])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Read by Serve's autoscaler (both classes' work); see autoscaling.TokenBacklogPolicy."""
        return {
            BACKLOG_TOKENS: sum(tokens for tokens, _ in self.backlog.values()),
            BACKLOG_REQUESTS: sum(parts for _, parts in self.backlog.values()),
        }

    # Serve's cap on concurrent batches is fixed at import; _slots are the replica's. The budget
    # and the wait come from the model's config (__init__). One batcher per class, so a query's
    # part never waits in a queue behind batch-class parts.
    @serve.batch(max_concurrent_batches=MAX_BATCHES_IN_FLIGHT, batch_size_fn=count_queued_tokens)
    async def _embed_interactive(self, items: list[Queued]) -> list[np.ndarray]:
        return await self._run_batch(items, RequestClass.INTERACTIVE)

    @serve.batch(max_concurrent_batches=MAX_BATCHES_IN_FLIGHT, batch_size_fn=count_queued_tokens)
    async def _embed_batch(self, items: list[Queued]) -> list[np.ndarray]:
        return await self._run_batch(items, RequestClass.BATCH)

    async def _run_batch(self, items: list[Queued], request_class: RequestClass) -> list[np.ndarray | None]:
        async with self._slots[request_class]:
            live = [k for k, item in enumerate(items) if not item.abandoned]
            if not live:
                return [None] * len(items)  # nobody waits for these
            started = time.perf_counter()
            for k in live:
                self.metrics.queue_wait.observe(started - items[k].queued_at, self._class_tags[request_class])
            parts = [items[k].part for k in live]
            models = [model for k in live for model in items[k].models]
            # Off the event loop, so new requests keep queueing (and batches fill) while it runs.
            try:
                done = await asyncio.get_running_loop().run_in_executor(
                    self._forward_threads, self.engine.embed_counted, flatten(parts), request_class, models
                )
            except Exception:
                await self._leave_if_device_broken()
                raise
            forward_s = time.perf_counter() - started
        if done.out_of_memory_events:
            self.metrics.out_of_memory.inc(done.out_of_memory_events, self.metrics_tags)
        self.metrics.forward.observe(forward_s, self.metrics_tags)
        self._adapt_batch_wait(request_class, forward_s / self._in_flight)
        self.metrics.batch_tokens.observe(done.real_tokens, self.metrics_tags)
        padding = 1.0 - done.real_tokens / done.padded_tokens if done.padded_tokens else 0.0
        self.metrics.padding_ratio.observe(padding, self.metrics_tags)
        results: list[np.ndarray | RowsOutOfMemory | None] = [None] * len(items)
        for k, vectors in zip(live, per_part(done.vectors, parts, done.unfit_rows), strict=True):
            results[k] = vectors
        return results

    async def check_health(self) -> None:
        """Serve's health check (every HEALTH_CHECK_PERIOD_S): raises when the device cannot run
        work any more (lost, or poisoned by an illegal memory access), so that Serve replaces a
        replica that would otherwise look healthy while failing every call."""
        await asyncio.get_running_loop().run_in_executor(self._probe_thread, self.engine.check_device)

    async def _leave_if_device_broken(self) -> None:
        """After a failed batch: if the device fails a probe too, every later call here would
        fail, so end this process at once. The calls in flight here then fail as on a dead
        replica, which the Ingress retries on another one (and Serve starts a replacement);
        answering them with errors until the health checks catch up would fail them instead."""
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._probe_thread, self.engine.check_device),
                HEALTH_CHECK_TIMEOUT_S,
            )
            return  # the device works: the failure was the batch's own
        except Exception as exc:  # noqa: BLE001 — any failure of the probe (or its timeout)
            logger.critical("the %s device failed a probe after a failed batch (%r): exiting, so that "
                            "Serve replaces this replica and the Ingress retries its calls elsewhere",
                            self.engine.device, exc)
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(1)  # the process, at once: no later call may reach this device

    def _adapt_batch_wait(self, request_class: RequestClass, busy_s: float) -> None:
        # A class whose batches keep the replica busy waits longer so its batches grow: a pass
        # has a fixed cost (docs/decisions.md#adaptive-batch-wait). Per
        # class, so a trickle of queries beside an indexing load keeps the short wait, as does a
        # lone request on an idle replica. `busy_s`: forward time per batch slot.
        now = time.perf_counter()
        window = self._busy[request_class]
        window[0] += busy_s
        if now - window[1] >= 1.0:
            busy = window[0] / (now - window[1]) > 0.5
            self._batchers[request_class].set_batch_wait_timeout_s(self._batch_wait_s(busy))
            window[:] = [0.0, now]

    def _batch_wait_s(self, busy: bool) -> float:
        """The batchers' wait, from the config: longer while the class keeps the replica busy."""
        return self.spec.tuning.busy_batch_wait_timeout_s if busy else self.spec.tuning.batch_wait_timeout_s

    def describe(self, model: str) -> ModelInfo:
        """What the Ingress needs to know of one of this deployment's models."""
        return ModelInfo(
            dimensions=self.engine.dimensions,
            max_input_tokens=self.engine.resolved_models[model].max_input_tokens,
            max_batch_tokens=self.spec.max_batch_tokens,
            pooling=self.engine.pooling,
            normalize=self.spec.normalize,
            device=self.engine.device,
        )
