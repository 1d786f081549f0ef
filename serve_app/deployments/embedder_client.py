"""The Ingress's side of the Embedder deployments: coalescing, parts cut to each deployment's
token budget, the transport of each call and its retry when a replica is lost."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.api.errors import OpenAIError, out_of_device_memory, overloaded
from serve_app.api.request_class import INTERACTIVE, RequestClass
from serve_app.deployments.model_info import ModelInfo
from serve_app.engine.errors import RowsOutOfMemory
from serve_app.engine.parts import (
    count_tokens,
    cut_to_budget,
    flatten,
    per_part,
    split_rows,
)
from serve_app.engine.spec import ModelSpec

logger = logging.getLogger("ray.serve")

# Parts from concurrent requests are coalesced for this long into one Embedder call.
COALESCE_WAIT_S = 0.002
# Embedder calls whose arguments and result fit in this many bytes go over Serve's gRPC
# transport (handle option _by_reference=False) instead of a Ray actor call: per call it costs
# less CPU in both processes, and a stream of one-query requests is mostly per-call cost
# (docs/decisions.md#grpc-small-calls). Larger calls, and the
# Tokenizer's (whole texts), stay actor calls even where RAY_SERVE_USE_GRPC_BY_DEFAULT=1 makes
# gRPC the default: Serve's gRPC channel refuses messages over 4 MiB, and Ray's object store
# moves big arrays without copying. EMBEDDINGS_BY_VALUE_MAX_BYTES=0 in the application's
# env_vars sends every call by reference.
BY_VALUE_MAX_BYTES = int(os.environ.get("EMBEDDINGS_BY_VALUE_MAX_BYTES", str(1 << 20)))

# A part at the coalescer: its model, its token ids, and its request's "abandoned" event (set
# when the client goes away).
Coalesced = tuple[str, list[list[int]], asyncio.Event]


async def gather_or_503(calls) -> list:
    """Await Serve calls, mapping overload to an OpenAI error."""
    try:
        return await asyncio.gather(*calls)
    except BackPressureError:
        raise overloaded() from None


async def _awaited(response: DeploymentResponse):
    return await response


async def _all_set(events: Iterable[asyncio.Event]) -> None:
    # A task, not asyncio.gather: a cancelled gather of waits ends with a CancelledError that
    # nobody retrieves, which asyncio logs as an error.
    for event in events:
        await event.wait()


async def _unless_abandoned(response: DeploymentResponse, callers: Iterable[asyncio.Event]):
    """The call's result, or None once every caller that waits on it has gone away (the call
    is then cancelled, which frees its place in the Embedder's queue or batch)."""
    call = asyncio.ensure_future(_awaited(response))
    all_gone = asyncio.ensure_future(_all_set(callers))
    try:
        await asyncio.wait((call, all_gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        response.cancel()
        call.cancel()
        raise
    finally:
        all_gone.cancel()
    if call.done():
        return call.result()
    response.cancel()
    call.cancel()
    return None


def _part_tokens(items: list[Coalesced]) -> int:
    return count_tokens([part for _, part, _ in items])


class EmbedderClient:
    def __init__(self, specs: dict[str, ModelSpec], embedders: dict[str, DeploymentHandle]):
        self.specs = specs
        # Models on one base share one Embedder deployment (spec.share_base): `embedders` maps each
        # model to its deployment's handle. One handle per deployment, so that one router sees
        # (and balances) all of its calls; calls go per deployment, naming each row's model.
        self.deployment_of = {name: h.deployment_name for name, h in embedders.items()}
        deployments = {h.deployment_name: h for h in embedders.values()}
        self.by_reference = {d: h.options(_by_reference=True) for d, h in deployments.items()}
        self.by_value = {d: h.options(_by_reference=False) for d, h in deployments.items()}
        self.known: dict[str, ModelInfo] = {}  # each model's info, once its Embedder has told it
        # The coalescers' budget is the largest: _call_coalesced cuts each deployment's share to its own.
        budget = max(self._budget(name) for name in specs)
        for coalesce in (self._coalesce_interactive, self._coalesce_batch):
            coalesce.set_max_batch_size(budget)

    def _budget(self, name: str) -> int:
        """Tokens in one call to the model's Embedder (models on one base share it)."""
        return self.specs[name].max_batch_tokens

    async def info(self, name: str) -> ModelInfo:
        if name not in self.known:
            self.known[name] = await self.by_reference[self.deployment_of[name]].describe.remote(name)
        return self.known[name]

    async def embed(self, name: str, ids: list[list[int]], request_class: RequestClass) -> np.ndarray:
        """Split into parts that each fit one batch, run them concurrently, keep input order."""
        coalesce = self._coalesce_interactive if request_class == INTERACTIVE else self._coalesce_batch
        abandoned = asyncio.Event()  # set if the client goes away: see _call_coalesced
        try:
            results = await asyncio.gather(
                *(coalesce((name, part, abandoned)) for part in cut_to_budget(ids, self._budget(name)))
            )
        except BaseException:  # the client went away, or another part failed: none is needed now
            abandoned.set()
            raise
        for result in results:
            if isinstance(result, OpenAIError):  # this request's own failure (see _call_coalesced)
                abandoned.set()
                raise result
        return np.concatenate(results) if len(results) > 1 else results[0]

    # Parts of concurrent requests are coalesced into one call per Embedder deployment: each Serve
    # call costs a millisecond or more of CPU on both sides, and under many small concurrent
    # requests this turns N calls into one. Each class coalesces apart, so a query's part is
    # never merged into (and never waits for) a batch-class call. The token budget is set in
    # __init__, from the models' configs.
    @serve.batch(batch_wait_timeout_s=COALESCE_WAIT_S, max_concurrent_batches=64, batch_size_fn=_part_tokens)
    async def _coalesce_interactive(self, items: list[Coalesced]) -> list[np.ndarray]:
        return await self._call_coalesced(items, RequestClass.INTERACTIVE)

    @serve.batch(batch_wait_timeout_s=COALESCE_WAIT_S, max_concurrent_batches=64, batch_size_fn=_part_tokens)
    async def _coalesce_batch(self, items: list[Coalesced]) -> list[np.ndarray]:
        return await self._call_coalesced(items, RequestClass.BATCH)

    async def _call_coalesced(self, items: list[Coalesced], request_class: RequestClass) -> list:
        """One call per Embedder deployment for all parts that arrived together (of any of its
        models: each row names its own), split back after. A deployment whose batch budget is
        below the coalescer's (the largest of all models) gets as many calls as fit its budget.
        Serve's batcher drops a queued part whose caller went away; a call whose callers have
        all gone away is cancelled at the Embedder (None for its parts: nobody reads them)."""
        groups, calls = [], []
        for deployment, positions in self._group_by_deployment(items).items():
            budget = self._budget(items[positions[0]][0])  # shared within a deployment
            for group in cut_to_budget(positions, budget, size=lambda p: count_tokens([items[p][1]])):
                parts = [items[p][1] for p in group]
                models = [items[p][0] for p in group for _ in items[p][1]]
                callers = {id(items[p][2]): items[p][2] for p in group}.values()
                groups.append((group, parts))
                calls.append(self._call(deployment, flatten(parts), models, request_class, callers))
        results: list[np.ndarray | OpenAIError | None] = [None] * len(items)
        for (group, parts), vectors in zip(groups, await gather_or_503(calls), strict=True):
            if vectors is None:  # every caller of this call went away
                continue
            # Rows that did not fit in device memory fail their own parts only (returned, not
            # raised, so that the other parts of the call still get their vectors).
            split = (per_part(vectors.vectors, parts, vectors.rows) if isinstance(vectors, RowsOutOfMemory)
                     else split_rows(vectors, parts))
            for p, part in zip(group, split, strict=True):
                results[p] = out_of_device_memory() if isinstance(part, RowsOutOfMemory) else part
        return results

    def _group_by_deployment(self, items: list[Coalesced]) -> dict[str, list[int]]:
        by_deployment: dict[str, list[int]] = {}
        for position, (name, _, _) in enumerate(items):
            by_deployment.setdefault(self.deployment_of[name], []).append(position)
        return by_deployment

    async def _call(self, deployment: str, sequences: list[list[int]], models: list[str],
                    request_class: RequestClass, callers: Iterable[asyncio.Event]) -> np.ndarray | None:
        """Embedding is idempotent: if the replica dies mid-batch, retry once on another.
        None if every caller went away first (the call is cancelled)."""
        # Bounds: a token id pickles to at most 8 bytes, a row's model name (the same few
        # strings, which pickle memoizes) to 8; the result is float32 rows.
        dims = (await self.info(models[0])).dimensions
        size = 8 * sum(map(len, sequences)) + (8 + 4 * dims) * len(sequences)
        handle = (self.by_value if size <= BY_VALUE_MAX_BYTES else self.by_reference)[deployment]
        try:
            return await _unless_abandoned(handle.embed.remote(sequences, request_class, models), callers)
        except (RayActorError, ActorUnavailableError) as exc:
            logger.warning("Embedder replica lost (%s); retrying the part once", type(exc).__name__)
            return await _unless_abandoned(handle.embed.remote(sequences, request_class, models), callers)
