"""Every front door's pipeline, read top to bottom in Pipeline.run: admit, tokenize, classify,
embed (cache, then Embedders), encode, record. The routes (openai_routes, tei_routes) parse a
request into a RequestContext and render what run returns; the words are docs/glossary.md's."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson

from serve_app.api.cache import VectorCache, look_up
from serve_app.api.errors import OpenAIError, invalid, quote
from serve_app.api.limits import (
    InflightTokens,
    RequestLimits,
    check_counts,
    check_tokens,
    token_bounds,
)
from serve_app.api.ratelimit import RateLimiter
from serve_app.api.request_class import INTERACTIVE, RequestClass, RequestClassPolicy
from serve_app.api.schemas import Inputs
from serve_app.deployments.embedder_client import EmbedderClient
from serve_app.deployments.metrics import IngressMetrics
from serve_app.deployments.tokenizer_client import TokenizeAt, TokenizerClient, where_to_tokenize
from serve_app.engine.long_inputs import combine_windows, split_windows
from serve_app.engine.spec import ModelSpec, format_query
from serve_app.engine.tokenization import token_ids_rejected

# Serve formats this logger's lines (JSON with `logging_config.encoding: JSON`) and stamps
# each with the request id it took from, or created for, the X-Request-ID header.
logger = logging.getLogger("ray.serve")
# Tells a client which class its request ran in (docs/request-classes.md).
REQUEST_CLASS_HEADER = "X-Request-Class"


class StageTimings(dict[str, float]):
    """Seconds per stage (tokenize, embed, encode), each from the end of the one before."""

    def __init__(self):
        super().__init__()
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self[stage] = now - self._last
        self._last = now


@dataclass
class RequestContext:
    """One request on its way: what it asks (set by its route) and what the pipeline found."""

    key: str = "anonymous"  # the API key's name, once authenticated
    spec: ModelSpec | None = None
    inputs: Inputs | None = None
    task: str | None = None  # the query instruction to apply, if any
    truncate: bool = False
    direction: str = "right"  # the side `truncate` cuts
    requested_class: RequestClass | None = None  # the request's `priority` field
    is_query: bool = False
    request_class: RequestClass | None = None  # decided once its tokens are counted
    ids: list[list[int]] = field(default_factory=list)  # one sequence per input, or per window
    windows: list[int] | None = None  # windows per input under long_input: chunk
    n_tokens: int = 0  # tokens fed to the model: what usage reports, cached or not
    timings: StageTimings = field(default_factory=StageTimings)

    # Metric labels: only configured names, never what a client sent.
    @property
    def model_label(self) -> str:
        return self.spec.name if self.spec else "unknown"

    @property
    def class_label(self) -> str:
        return str(self.request_class or "unknown")


class Pipeline:
    def __init__(self, specs: dict[str, ModelSpec], tokenizers: TokenizerClient, embedders: EmbedderClient,
                 limits: RequestLimits, classes: RequestClassPolicy, rate: RateLimiter, cache_bytes: int):
        self.specs, self.tokenizers, self.embedders = specs, tokenizers, embedders
        self.limits, self.classes, self.rate = limits, classes, rate
        self.inflight = InflightTokens(limits.max_inflight_tokens, limits.interactive_reserve_tokens)
        self.cache = VectorCache(cache_bytes) if cache_bytes else None
        # Everything that changes a model's vectors (source, revision, adapter, pooling, dtype, ...):
        # models that share an Embedder (one base, several adapters) never share cache entries.
        self.fingerprints = {name: spec.model_dump_json() for name, spec in specs.items()}
        self.metrics = IngressMetrics()

    async def run(self, ctx: RequestContext, encode: Callable[[RequestContext, np.ndarray], bytes]) -> bytes:
        """The response body for a parsed request. Refusals that need no tokenizing come first, so
        that a flood of over-bound requests costs no tokenizer time; the in-flight budget admits
        the request on its estimated tokens and settles on its count."""
        check_counts(len(ctx.inputs), self.limits)
        ctx.timings = StageTimings()
        declared = self.classes.declared(ctx.requested_class, self.rate.limits.request_class_for(ctx.key), ctx.is_query)
        asks_interactive = self.classes.asks_interactive(declared, len(ctx.inputs))
        held = self._admit(ctx, asks_interactive)
        charged = 0  # tokens taken from the key's rate limit: given back if the request is not served
        try:
            await self._tokenize(ctx, where_to_tokenize(ctx.inputs, asks_interactive))
            check_tokens(ctx.n_tokens, self.limits)
            self.rate.check_tokens(ctx.key, ctx.n_tokens)
            charged = ctx.n_tokens
            ctx.timings.lap("tokenize")
            ctx.request_class = self.classes.classify(declared, len(ctx.inputs), ctx.n_tokens)
            self.inflight.resize(held, ctx.n_tokens, reserve=ctx.request_class == INTERACTIVE)
            held = ctx.n_tokens
            vectors = await self._embed(ctx)
        except asyncio.CancelledError:  # the client went away: nothing was served
            self.rate.refund_tokens(ctx.key, charged)
            raise
        except OpenAIError as exc:
            if exc.status == 503:  # shed before any work was done: don't charge the key
                self.rate.refund_tokens(ctx.key, charged)
            raise
        finally:
            self.inflight.release(held)
            self.metrics.inflight_tokens.set(self.inflight.current)
        if ctx.windows is not None:
            vectors = combine_windows(vectors, ctx.ids, ctx.windows, ctx.spec.normalize)
        ctx.timings.lap("embed")
        body = encode(ctx, vectors)
        ctx.timings.lap("encode")
        self._record(ctx)
        return body

    def _admit(self, ctx: RequestContext, asks_interactive: bool) -> int:
        """Refuses by bounds on the request's tokens (before tokenizing); the tokens it holds."""
        local = self.tokenizers.local[ctx.spec.name]
        least, held = token_bounds(
            ctx.inputs, ctx.truncate, local.max_tokens, len(local.prefix) + len(local.suffix),
            len(format_query(ctx.task, "").encode()) if ctx.task is not None else 0, self.limits,
        )
        check_tokens(least, self.limits)
        self.inflight.acquire(held, reserve=asks_interactive)
        self.metrics.inflight_tokens.set(self.inflight.current)
        return held

    async def _tokenize(self, ctx: RequestContext, where: TokenizeAt) -> None:
        ids = await self.tokenizers.tokenize(ctx.spec.name, ctx.inputs, ctx.task, ctx.truncate, ctx.direction, where)
        # long_input: chunk: over-long inputs travel as their windows (batched and cached as
        # inputs of their own) and are combined into one vector each afterwards.
        if ctx.spec.long_input == "chunk":
            ids, ctx.windows = split_windows(ids, self.tokenizers.local[ctx.spec.name].windows)
        ctx.ids, ctx.n_tokens = ids, sum(map(len, ids))

    async def _embed(self, ctx: RequestContext) -> np.ndarray:
        """Vectors in input order: from the cache where it has them, from the Embedders otherwise."""
        name = ctx.spec.name
        if self.cache is None or not ctx.spec.cache:
            return await self.embedders.embed(name, ctx.ids, ctx.request_class)
        lookup = look_up(self.cache, self.fingerprints[name], ctx.ids)
        tags = {"model": name}
        for counter, count in ((self.metrics.cache_hits, lookup.hits), (self.metrics.cache_misses, len(ctx.ids) - lookup.hits)):
            if count:  # Ray's counters refuse an increment of 0
                counter.inc(count, tags=tags)
        computed = await self.embedders.embed(name, lookup.to_compute(ctx.ids), ctx.request_class) if lookup.misses else None
        # Only interactive work fills the cache: an indexing run would otherwise evict the
        # repeated queries the cache is for with vectors nobody asks for twice.
        vectors, evicted = lookup.complete(computed, self.cache if ctx.request_class == INTERACTIVE else None)
        if evicted:
            self.metrics.cache_evictions.inc(evicted, tags=tags)
        self.metrics.cache_bytes.set(self.cache.bytes)
        return vectors

    def _record(self, ctx: RequestContext) -> None:
        tags = {"model": ctx.model_label, "key": ctx.key}
        self.metrics.input_tokens.inc(ctx.n_tokens, tags=tags)
        self.metrics.inputs.inc(len(ctx.inputs), tags=tags)
        for stage, seconds in ctx.timings.items():
            self.metrics.stage.observe(seconds, tags={"model": ctx.model_label, "stage": stage})
        # Counts and timings only: input text never goes to the logs.
        logger.info("embeddings %s", orjson.dumps(
            {"model": ctx.model_label, "priority": ctx.class_label, "inputs": len(ctx.inputs), "tokens": ctx.n_tokens}
            | {f"{k}_ms": round(v * 1000, 2) for k, v in ctx.timings.items()}).decode())

    def spec(self, name: str) -> ModelSpec:
        """The configured model of that name, or the 404 that lists them."""
        if name not in self.specs:
            raise OpenAIError(404, f"The model {quote(name)} does not exist. Available models: {', '.join(self.specs)}.",
                              "model", "model_not_found")
        return self.specs[name]


def check_inputs(spec: ModelSpec, inputs: Inputs, task: str | None, task_param: str) -> None:
    """Refusals that depend on the model: token ids where it rejects them, an instruction on ids."""
    if inputs.token_ids is not None and spec.token_id_inputs == "reject":
        rejected = token_ids_rejected(spec.name)
        raise invalid(rejected.message, rejected.param, rejected.code)
    if task is not None and inputs.token_ids is not None:
        raise invalid("An instruction cannot be applied to token-id inputs; send text, or put the "
                      "instruction's tokens in the ids yourself.", task_param)
