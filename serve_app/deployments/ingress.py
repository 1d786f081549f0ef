"""HTTP entry point: OpenAI's and TEI's schemas in, tokenizer and embedder fan-out, their responses out."""


import asyncio
import importlib.metadata
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.api.auth import AuthConfig, Authenticator
from serve_app.api.cache import CacheConfig, VectorCache, look_up
from serve_app.api import tei
from serve_app.api.encoding import apply_dimensions, render_embeddings
from serve_app.api.errors import OpenAIError, install_error_handlers, internal_error, invalid, out_of_device_memory, quote
from serve_app.api.limits import InflightTokens, RequestLimits, check_counts, check_tokens, read_body, token_bounds
from serve_app.api.priority import BATCH, INTERACTIVE, PriorityPolicy, classify
from serve_app.api.ratelimit import RateLimiter, RateLimits
from serve_app.api.schemas import EmbeddingRequest, Inputs, openapi_body, parse_request
from serve_app.deployments.chunks import count_tokens, cut_to_budget, flatten, per_chunk, split_rows
from serve_app.deployments.metrics import IngressMetrics
from serve_app.deployments.serve_logging import drop_batch_size_warning
from serve_app.engine.tokenization import load_input_tokenizer, token_ids_rejected
from serve_app.engine.errors import InputError, RowsOutOfMemory
from serve_app.engine.long_inputs import combine_windows, split_windows
from serve_app.engine.spec import ModelSpec, dtype_name, format_query

# Serve formats this logger's lines (JSON with `logging_config.encoding: JSON`) and stamps
# each with the request id it took from, or created for, the X-Request-ID header.
logger = logging.getLogger("ray.serve")

TOKENIZE_SLICE = 256  # inputs per tokenizer call: large requests spread over tokenizer replicas
# Tokenizer calls one request has at a time: they still spread over replicas, and a request
# over the token limit is refused before most of its slices are tokenized.
TOKENIZE_SLICES_IN_FLIGHT = 4
# Requests up to this size are tokenized in the ingress itself: for short queries the
# round trip to the Tokenizer deployment costs far more CPU than the tokenization.
LOCAL_TOKENIZE_MAX_CHARS = 8192
LOCAL_CHECK_MAX_IDS = 16384
# Interactive requests (a few inputs, e.g. one 4096-token document) are tokenized here up to
# this many times those sizes: a few milliseconds, against a queue behind batch requests.
INTERACTIVE_TOKENIZE_FACTOR = 8
# Chunks from concurrent requests are coalesced for this long into one Embedder call.
COALESCE_WAIT_S = 0.002
HEALTH_TIMEOUT_S = 10.0
# Tells a client which class its request ran in (README "Request classes").
REQUEST_CLASS_HEADER = "X-Request-Class"
# Embedder calls whose arguments and result fit in this many bytes go over Serve's gRPC
# transport (handle option _by_reference=False) instead of a Ray actor call: per call it costs
# less CPU in both processes, and a stream of one-query requests is mostly per-call cost
# (`python -m bench.serve_variants --variants shipped,by-reference`). Larger calls, and the
# Tokenizer's (whole texts), stay actor calls even where RAY_SERVE_USE_GRPC_BY_DEFAULT=1 makes
# gRPC the default: Serve's gRPC channel refuses messages over 4 MiB, and Ray's object store
# moves big arrays without copying. EMBEDDINGS_BY_VALUE_MAX_BYTES=0 in the application's
# env_vars sends every call by reference.
BY_VALUE_MAX_BYTES = int(os.environ.get("EMBEDDINGS_BY_VALUE_MAX_BYTES", 1 << 20))
# A replaced or scaled-down Ingress replica finishes the requests it holds before it exits;
# Serve force-kills it after graceful_shutdown_timeout_s (default 20 s) and the proxy answers
# each request still running with a plain 500. Those requests wait on the Embedders, whose old
# replicas drain their own queues for up to *their* timeout (Embedder below: 120 s; deploy/
# config.yaml: 60 s) and whose lost chunks the ingress retries once: this must outlast both.
# The drain ends as soon as nothing is in flight, so a long bound costs an idle replica nothing.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 180.0

def _tokenize_here(inputs: Inputs, interactive: bool) -> bool:
    """Tokenize in the ingress itself, rather than queue at the Tokenizer deployment behind
    large batch requests: small requests, and interactive ones of a few long inputs."""
    factor = INTERACTIVE_TOKENIZE_FACTOR if interactive else 1
    if inputs.texts is not None:
        return sum(len(text) for text in inputs.texts) <= LOCAL_TOKENIZE_MAX_CHARS * factor
    return sum(len(ids) for ids in inputs.token_ids) <= LOCAL_CHECK_MAX_IDS * factor


@dataclass(frozen=True)
class Work:
    """What a front door asks the pipeline for, whatever its schema."""

    inputs: Inputs
    task: str | None  # the query instruction to apply, if any
    truncate: bool
    priority: str | None  # the class the request asked for, if any
    is_query: bool
    direction: str = "right"  # the side `truncate` cuts


class _StageTimer:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._last
        self._last = now


# A chunk at the Ingress's coalescer: its model, its token ids, and its request's "abandoned"
# event (set when the client goes away).
Coalesced = tuple[str, list[list[int]], asyncio.Event]


def _overloaded() -> OpenAIError:
    return OpenAIError(503, "The service is overloaded; retry shortly.", None, "overloaded", {"Retry-After": "1"})


def _overload_as_503(future: asyncio.Future):
    try:
        return future.result()
    except BackPressureError:
        raise _overloaded() from None


async def _numbered(k: int, response: DeploymentResponse) -> tuple[int, object]:
    return k, await response


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


# Module-level helpers must be defined above the deployment class: Serve pickles the class
# when the decorator runs, capturing only the names that exist at that point.
api = FastAPI(title="Embeddings (OpenAI-compatible)", version="0.1.0")
install_error_handlers(api)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        models: list[dict],
        tokenizers: dict[str, DeploymentHandle],
        embedders: dict[str, DeploymentHandle],
        limits: dict,
        auth: dict,
        rate_limits: dict,
        priority: dict,
        cache: dict,
        tei_config: dict | None = None,
    ):
        drop_batch_size_warning()  # our batch sizes count tokens: see serve_logging
        self.specs = {m["name"]: ModelSpec.model_validate(m) for m in models}
        self.tokenizers = {name: h.options(_by_reference=True) for name, h in tokenizers.items()}
        # Models on one base share one Embedder deployment (spec.share_base): `embedders` maps each
        # model to its deployment's handle. One handle per deployment, so that one router sees
        # (and balances) all of its calls; calls go per deployment, naming each row's model.
        self.embedder_of = {name: h.deployment_name for name, h in embedders.items()}
        deployments = {h.deployment_name: h for h in embedders.values()}
        self.embedders = {d: h.options(_by_reference=True) for d, h in deployments.items()}
        self.embedders_by_value = {d: h.options(_by_reference=False) for d, h in deployments.items()}
        self.limits = RequestLimits.model_validate(limits)
        self.inflight = InflightTokens(self.limits.max_inflight_tokens, self.limits.interactive_reserve_tokens)
        self.priority = PriorityPolicy.model_validate(priority)
        cache_bytes = CacheConfig.model_validate(cache).max_bytes
        self.cache = VectorCache(cache_bytes) if cache_bytes else None
        # Everything that changes a model's vectors (source, revision, adapter, pooling, dtype, ...):
        # models that share an Embedder (one base, several adapters) never share cache entries.
        self.fingerprints = {name: spec.model_dump_json() for name, spec in self.specs.items()}
        self.auth = Authenticator(AuthConfig.model_validate(auth))
        self.rate = RateLimiter(RateLimits.model_validate(rate_limits), known_keys=self.auth.names)
        self.created = int(time.time())
        self.tei = tei.TeiConfig.model_validate(tei_config or {})
        self.tei_model = self.tei.model or next(iter(self.specs))
        self.metrics = IngressMetrics()
        self._described: dict[str, dict] = {}
        # Tokenizer files only (no weights): small requests are tokenized here.
        self.local_tokenizers = {name: load_input_tokenizer(spec) for name, spec in self.specs.items()}
        # The largest budget: _call_coalesced cuts each deployment's share to its own.
        budget = max(spec.max_batch_tokens for spec in self.specs.values())
        for coalesce in (self._coalesce_interactive, self._coalesce_batch):
            coalesce.set_max_batch_size(budget)
            coalesce.set_batch_wait_timeout_s(COALESCE_WAIT_S)

    # Routes read and validate their bodies themselves (OpenAI-shaped errors, byte limits):
    # openapi_extra publishes the schemas they validate against at /openapi.json.
    @api.post("/v1/embeddings", openapi_extra=openapi_body(EmbeddingRequest))
    async def create_embeddings(self, request: Request) -> Response:
        return await self._front_door(request, self._create_embeddings, OpenAIError.response)

    async def _front_door(
        self,
        request: Request,
        handle: Callable[[Request, dict[str, str]], Awaitable[Response]],
        render_error: Callable[[OpenAIError], Response],
        observe: bool = True,
    ) -> Response:
        """What every route that does work shares, whatever its schema: the API key, the key's
        request rate, the request metrics (`observe`), and errors rendered in the route's shape."""
        started = time.perf_counter()
        # Only configured names become metric labels: clients can send any string as model.
        labels = {"model": "unknown", "key": "anonymous", "priority": "unknown"}
        try:
            labels["key"] = self.auth.authenticate(request.headers.get("authorization"))
            self.rate.check_request(labels["key"])
            response = await handle(request, labels)
        except OpenAIError as exc:
            response = render_error(exc)
        except Exception:
            logger.exception("unhandled error")  # never the request body: it may hold user text
            response = render_error(internal_error())
        if observe:
            tags = {"model": labels["model"], "key": labels["key"], "status": str(response.status_code)}
            self.metrics.requests.inc(tags=tags)
            self.metrics.latency.observe(
                time.perf_counter() - started, tags={"model": labels["model"], "priority": labels["priority"]}
            )
        return response

    async def _create_embeddings(self, request: Request, labels: dict[str, str]) -> Response:
        req = parse_request(await self._read_json(request))
        spec = self._spec(req.model)
        labels["model"] = spec.name
        info = await self._describe(spec.name)
        if req.dimensions is not None and req.dimensions > info["dimensions"]:
            raise invalid(
                f"Invalid value for 'dimensions': {req.dimensions}: at most {info['dimensions']} for model "
                f"'{spec.name}'.", "dimensions"
            )
        task = req.instruction or (spec.query_instruction if req.input_type == "query" else None)
        self._check_inputs(spec, req.inputs, task, "instruction" if req.instruction else "input_type")
        work = Work(req.inputs, task, req.truncate, req.priority, is_query=req.input_type == "query" or task is not None)
        vectors, n_tokens, timer = await self._run(spec, work, labels)
        vectors = apply_dimensions(vectors, req.dimensions, info["normalize"])
        body = render_embeddings(vectors, spec.name, n_tokens, req.encoding_format)
        timer.lap("encode")
        self._log_request(labels, len(vectors), n_tokens, timer)
        return Response(body, media_type="application/json", headers={REQUEST_CLASS_HEADER: labels["priority"]})

    # ---- TEI's routes (serve_app/api/tei.py; README "TEI's API"): one model, TEI's shapes -------

    @api.post("/embed", openapi_extra=openapi_body(tei.EmbedRequest))
    async def tei_embed(self, request: Request) -> Response:
        return await self._front_door(request, self._tei_embed, tei.tei_error)

    @api.post("/", openapi_extra=openapi_body(tei.EmbedRequest))
    async def tei_root(self, request: Request) -> Response:
        """TEI answers POST / as /embed for an embedding model; clients given the bare URL post here."""
        return await self._front_door(request, self._tei_embed, tei.tei_error)

    @api.post("/tokenize", openapi_extra=openapi_body(tei.TokenizeRequest))
    async def tei_tokenize(self, request: Request) -> Response:
        return await self._front_door(request, self._tei_tokenize, tei.tei_error, observe=False)

    @api.get("/info")
    async def tei_info(self, request: Request) -> Response:
        return await self._front_door(request, self._tei_info, tei.tei_error, observe=False)

    async def _tei_embed(self, request: Request, labels: dict[str, str]) -> Response:
        req = tei.parse_embed(await self._read_json(request))
        spec = self.specs[self.tei_model]
        labels["model"] = spec.name
        info = await self._describe(spec.name)
        if req.dimensions is not None and req.dimensions > info["dimensions"]:
            raise invalid(
                f"`dimensions` is {req.dimensions}, but must be at most {info['dimensions']}, the model's dimension.",
                "dimensions",
            )
        tei.check_normalize(req.normalize, spec.name, info["normalize"])
        task = tei.prompt_task(spec.prompt_tasks(), req.prompt_name)
        self._check_inputs(spec, req.inputs, task, "prompt_name")
        truncate = self.tei.auto_truncate if req.truncate is None else req.truncate
        work = Work(req.inputs, task, truncate, req.priority, is_query=task is not None, direction=req.direction)
        vectors, n_tokens, timer = await self._run(spec, work, labels)
        body = tei.render_vectors(tei.tei_vectors(vectors, req.dimensions, req.normalize, info["normalize"]))
        timer.lap("encode")
        self._log_request(labels, len(vectors), n_tokens, timer)
        chars = sum(map(len, req.inputs.texts if req.inputs.texts is not None else req.inputs.token_ids))
        # TEI's own response headers (it reports usage only there), beside the request class.
        headers = {
            REQUEST_CLASS_HEADER: labels["priority"],
            "x-compute-tokens": str(n_tokens),
            "x-compute-characters": str(chars),
            "x-tokenization-time": str(round(timer.laps["tokenize"] * 1000)),
            "x-inference-time": str(round(timer.laps["embed"] * 1000)),
            "x-total-time": str(round(sum(timer.laps.values()) * 1000)),
        }
        return Response(body, media_type="application/json", headers=headers)

    async def _tei_tokenize(self, request: Request, labels: dict[str, str]) -> Response:
        req = tei.parse_tokenize(await self._read_json(request))
        spec = self.specs[self.tei_model]
        labels["model"] = spec.name
        check_counts(len(req.texts), self.limits)
        task = tei.prompt_task(spec.prompt_tasks(), req.prompt_name)
        tokenizer = self.local_tokenizers[spec.name]
        # Off the event loop: a large body takes a while, and nothing here waits on a model.
        tokens = await asyncio.to_thread(tokenizer.describe_tokens, req.texts, task, req.add_special_tokens)
        return Response(orjson.dumps(tokens), media_type="application/json")

    async def _tei_info(self, request: Request, labels: dict[str, str]) -> Response:
        spec = self.specs[self.tei_model]
        described = await self._describe(spec.name)
        dtype = "float8" if spec.quantization == "fp8" else dtype_name(spec.dtype, described["device"])
        body = tei.info(
            model_id=spec.source, revision=spec.revision, dtype=dtype, served_model_name=spec.name,
            pooling=described["pooling"], max_input_length=described["max_input_tokens"],
            max_batch_tokens=described["max_batch_tokens"], max_client_batch_size=self.limits.max_inputs_per_request,
            auto_truncate=self.tei.auto_truncate, version=importlib.metadata.version("serve-embeddings"),
        )
        return Response(orjson.dumps(body), media_type="application/json")

    # ---- what every front door shares -----------------------------------------------------------

    async def _read_json(self, request: Request):
        body = await read_body(request, self.limits.max_request_bytes)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # e.g. a lone surrogate, or nesting past orjson's depth limit
            raise invalid(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None

    @staticmethod
    def _check_inputs(spec: ModelSpec, inputs: Inputs, task: str | None, task_param: str) -> None:
        """Refusals that depend on the model: token ids where it rejects them, an instruction on ids."""
        if inputs.token_ids is not None and spec.token_id_inputs == "reject":
            rejected = token_ids_rejected(spec.name)
            raise invalid(rejected.message, rejected.param, rejected.code)
        if task is not None and inputs.token_ids is not None:
            raise invalid(
                "An instruction cannot be applied to token-id inputs; send text, or put the "
                "instruction's tokens in the ids yourself.",
                task_param,
            )

    async def _run(self, spec: ModelSpec, work: "Work", labels: dict[str, str]) -> tuple[np.ndarray, int, "_StageTimer"]:
        """Every front door's pipeline: limits, tokenize, class, backpressure, cache, Embedders.

        Returns the full-size vectors in input order, the tokens fed to the model (what usage
        reports, whether or not the cache served them) and the stage timings so far.
        """
        check_counts(len(work.inputs), self.limits)
        timer = _StageTimer()
        key_default = self.rate.limits.priority_for(labels["key"])
        provisional = classify(self.priority, work.priority, key_default, work.is_query, len(work.inputs), None)
        # Refusals that need no tokenizing come first, so that a flood of over-bound requests
        # costs no tokenizer time: ids over the limit by their count, and a full in-flight budget
        # (the request is admitted on its estimated tokens, and settles on its count below).
        local = self.local_tokenizers[spec.name]
        least, held = token_bounds(
            work.inputs, work.truncate, local.max_tokens, len(local.prefix) + len(local.suffix),
            len(format_query(work.task, "").encode()) if work.task is not None else 0, self.limits,
        )
        check_tokens(least, self.limits)
        self.inflight.acquire(held, reserve=provisional == INTERACTIVE)
        self.metrics.inflight_tokens.set(self.inflight.current)
        charged = 0  # tokens taken from the key's rate limit: given back if the request is not served
        try:
            ids = await self._tokenize(spec, work, provisional)
            # long_input: chunk: over-long inputs travel as their windows (batched and cached as
            # inputs of their own) and are combined into one vector each afterwards.
            counts = None
            if spec.long_input == "chunk":
                ids, counts = split_windows(ids, local.windows)
            n_tokens = sum(len(seq) for seq in ids)
            check_tokens(n_tokens, self.limits)
            self.rate.check_tokens(labels["key"], n_tokens)
            charged = n_tokens
            timer.lap("tokenize")
            request_class = classify(self.priority, work.priority, key_default, work.is_query, len(work.inputs), n_tokens)
            labels["priority"] = request_class
            self.inflight.resize(held, n_tokens, reserve=request_class == INTERACTIVE)
            held = n_tokens
            vectors = await self._embed(spec, ids, request_class)
        except asyncio.CancelledError:  # the client went away: nothing was served
            self.rate.refund_tokens(labels["key"], charged)
            raise
        except OpenAIError as exc:
            if exc.status == 503:  # shed before any work was done: don't charge the key
                self.rate.refund_tokens(labels["key"], charged)
            raise
        finally:
            self.inflight.release(held)
            self.metrics.inflight_tokens.set(self.inflight.current)
        if counts is not None:
            vectors = combine_windows(vectors, ids, counts, spec.normalize)
        timer.lap("embed")
        return vectors, n_tokens, timer

    def _log_request(self, labels: dict[str, str], n_inputs: int, n_tokens: int, timer: "_StageTimer") -> None:
        model = labels["model"]
        self.metrics.input_tokens.inc(n_tokens, tags={"model": model, "key": labels["key"]})
        self.metrics.inputs.inc(n_inputs, tags={"model": model, "key": labels["key"]})
        for stage, seconds in timer.laps.items():
            self.metrics.stage.observe(seconds, tags={"model": model, "stage": stage})
        # Counts and timings only: input text never goes to the logs.
        logger.info(
            "embeddings %s",
            orjson.dumps({"model": model, "priority": labels["priority"], "inputs": n_inputs, "tokens": n_tokens}
                         | {f"{k}_ms": round(v * 1000, 2) for k, v in timer.laps.items()}).decode(),
        )

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self.auth.authenticate(request.headers.get("authorization"))
        return {"object": "list", "data": [self._model_card(name) for name in self.specs]}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> dict:
        self.auth.authenticate(request.headers.get("authorization"))
        return self._model_card(self._spec(model_id).name)

    @api.get("/health/live")
    async def live(self) -> Response:
        """Liveness: this ingress answers; says nothing about the models (that is /health)."""
        return Response(orjson.dumps({"status": "alive"}), media_type="application/json")

    @api.get("/health")
    async def health(self) -> Response:
        """Ready only when every tokenizer and embedder has loaded its model and answers."""
        checks = [h.ready.remote() for h in self.tokenizers.values()]
        checks += [self._describe(name) for name in self.specs]
        try:
            await asyncio.wait_for(asyncio.gather(*checks), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 — any failure means "not ready"
            logger.warning("health check failed: %s", type(exc).__name__)
            return OpenAIError(503, "Not ready: a deployment has not loaded its model.", code="not_ready").response()
        return Response(orjson.dumps({"status": "ready", "models": list(self.specs)}), media_type="application/json")

    def _spec(self, name: str) -> ModelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise OpenAIError(
                404,
                f"The model {quote(name)} does not exist. Available models: {', '.join(self.specs)}.",
                "model",
                "model_not_found",
            )
        return spec

    def _model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "self-hosted"}
        info = self._described.get(name)
        if info:
            card.update(dimensions=info["dimensions"], max_input_tokens=info["max_input_tokens"])
        return card

    async def _describe(self, name: str) -> dict:
        if name not in self._described:
            self._described[name] = await self.embedders[self.embedder_of[name]].describe.remote(name)
        return self._described[name]

    async def _tokenize(self, spec: ModelSpec, work: "Work", provisional_class: str) -> list[list[int]]:
        inputs = work.inputs
        handle = self.tokenizers[spec.name]
        if inputs.texts is not None:
            items, call, extra = inputs.texts, handle.tokenize, (work.task, work.truncate)
        else:
            items, call, extra = inputs.token_ids, handle.check_token_ids, (work.truncate,)
        if _tokenize_here(inputs, provisional_class == INTERACTIVE):
            local = self.local_tokenizers[spec.name]
            run = local.tokenize_texts if inputs.texts is not None else local.check_token_ids
            try:
                return run(items, *extra, 0, work.direction)
            except InputError as exc:
                raise invalid(exc.message, exc.param, exc.code) from None
        # A few slices at a time, counting as they come back: a request over the token limit is
        # refused as soon as its count passes it, and its slices not yet tokenized are dropped.
        slices = [items[i : i + TOKENIZE_SLICE] for i in range(0, len(items), TOKENIZE_SLICE)]
        results: list[list[list[int]] | None] = [None] * len(slices)
        pending: dict[asyncio.Future, DeploymentResponse] = {}
        counted, sent = 0, 0
        try:
            while sent < len(slices) or pending:
                while sent < len(slices) and len(pending) < TOKENIZE_SLICES_IN_FLIGHT:
                    response = call.remote(slices[sent], *extra, sent * TOKENIZE_SLICE, work.direction)
                    pending[asyncio.ensure_future(_numbered(sent, response))] = response
                    sent += 1
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    del pending[future]
                    k, part = _overload_as_503(future)
                    if isinstance(part, InputError):
                        raise invalid(part.message, part.param, part.code)
                    results[k] = part
                    counted += sum(map(len, part))
                    check_tokens(counted, self.limits, counted_all=False)
        finally:  # refused, or the client went away: the Tokenizers drop what is still queued
            for future, response in pending.items():
                response.cancel()
                future.cancel()
        return [ids for part in results for ids in part]

    async def _embed(self, spec: ModelSpec, ids: list[list[int]], request_class: str) -> np.ndarray:
        """Vectors in input order: from the cache where it has them, from the Embedders otherwise."""
        if self.cache is None or not spec.cache:
            return await self._compute(spec.name, ids, request_class)
        lookup = look_up(self.cache, self.fingerprints[spec.name], ids)
        tags = {"model": spec.name}
        for counter, count in ((self.metrics.cache_hits, lookup.hits), (self.metrics.cache_misses, len(ids) - lookup.hits)):
            if count:  # Ray's counters refuse an increment of 0
                counter.inc(count, tags=tags)
        computed = await self._compute(spec.name, lookup.to_compute(ids), request_class) if lookup.misses else None
        # Only interactive work fills the cache: an indexing run would otherwise evict the
        # repeated queries the cache is for with vectors nobody asks for twice.
        vectors, evicted = lookup.complete(computed, self.cache if request_class == INTERACTIVE else None)
        if evicted:
            self.metrics.cache_evictions.inc(evicted, tags=tags)
        self.metrics.cache_bytes.set(self.cache.bytes)
        return vectors

    async def _compute(self, name: str, ids: list[list[int]], request_class: str) -> np.ndarray:
        """Split into chunks that each fit one batch, run them concurrently, keep input order."""
        chunks = cut_to_budget(ids, self.specs[name].max_batch_tokens)
        coalesce = self._coalesce_interactive if request_class == INTERACTIVE else self._coalesce_batch
        abandoned = asyncio.Event()  # set if the client goes away: see _call_coalesced
        try:
            parts = await asyncio.gather(*(coalesce((name, chunk, abandoned)) for chunk in chunks))
        except BaseException:  # the client went away, or another chunk failed: none is needed now
            abandoned.set()
            raise
        for part in parts:
            if isinstance(part, OpenAIError):  # this request's own failure (see _call_coalesced)
                abandoned.set()
                raise part
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    # Chunks of concurrent requests are coalesced into one call per Embedder deployment: each Serve
    # call costs a millisecond or more of CPU on both sides, and under many small concurrent
    # requests this turns N calls into one. Each class coalesces apart, so a query's chunk is
    # never merged into (and never waits for) a batch-class call.
    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.002, max_concurrent_batches=64,
                 batch_size_fn=lambda items: count_tokens([chunk for _, chunk, _ in items]))
    async def _coalesce_interactive(self, items: list[Coalesced]) -> list[np.ndarray]:
        return await self._call_coalesced(items, INTERACTIVE)

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.002, max_concurrent_batches=64,
                 batch_size_fn=lambda items: count_tokens([chunk for _, chunk, _ in items]))
    async def _coalesce_batch(self, items: list[Coalesced]) -> list[np.ndarray]:
        return await self._call_coalesced(items, BATCH)

    async def _call_coalesced(self, items: list[Coalesced], request_class: str) -> list[np.ndarray | None]:
        """One call per Embedder deployment for all chunks that arrived together (of any of its
        models: each row names its own), split back after. A deployment whose batch budget is
        below the coalescer's (the largest of all models) gets as many calls as fit its budget.
        Serve's batcher drops a queued chunk whose caller went away; a call whose callers have
        all gone away is cancelled at the Embedder (None for its chunks: nobody reads them)."""
        groups, calls = [], []
        for deployment, positions in self._group_by_deployment(items).items():
            budget = self.specs[items[positions[0]][0]].max_batch_tokens  # shared within a deployment
            for group in cut_to_budget(positions, budget, size=lambda p: count_tokens([items[p][1]])):
                chunks = [items[p][1] for p in group]
                models = [items[p][0] for p in group for _ in items[p][1]]
                callers = {id(items[p][2]): items[p][2] for p in group}.values()
                groups.append((group, chunks))
                calls.append(self._call_embedder(deployment, flatten(chunks), models, request_class, callers))
        results: list[np.ndarray | OpenAIError | None] = [None] * len(items)
        for (group, chunks), vectors in zip(groups, await self._gather(calls)):
            if vectors is None:  # every caller of this call went away
                continue
            # Rows that did not fit in device memory fail their own chunks only (returned, not
            # raised, so that the other chunks of the call still get their vectors).
            parts = (per_chunk(vectors.vectors, chunks, vectors.rows) if isinstance(vectors, RowsOutOfMemory)
                     else split_rows(vectors, chunks))
            for p, part in zip(group, parts):
                results[p] = out_of_device_memory() if isinstance(part, RowsOutOfMemory) else part
        return results

    def _group_by_deployment(self, items: list[Coalesced]) -> dict[str, list[int]]:
        by_deployment: dict[str, list[int]] = {}
        for position, (name, _, _) in enumerate(items):
            by_deployment.setdefault(self.embedder_of[name], []).append(position)
        return by_deployment

    async def _call_embedder(self, deployment: str, sequences: list[list[int]], models: list[str],
                             request_class: str, callers: Iterable[asyncio.Event]) -> np.ndarray | None:
        """Embedding is idempotent: if the replica dies mid-batch, retry once on another.
        None if every caller went away first (the call is cancelled)."""
        # Bounds: a token id pickles to at most 8 bytes, a row's model name (the same few
        # strings, which pickle memoizes) to 8; the result is float32 rows.
        dims = (await self._describe(models[0]))["dimensions"]
        size = 8 * sum(map(len, sequences)) + (8 + 4 * dims) * len(sequences)
        handle = (self.embedders_by_value if size <= BY_VALUE_MAX_BYTES else self.embedders)[deployment]
        try:
            return await _unless_abandoned(handle.embed.remote(sequences, request_class, models), callers)
        except (RayActorError, ActorUnavailableError) as exc:
            logger.warning("Embedder replica lost (%s); retrying the chunk once", type(exc).__name__)
            return await _unless_abandoned(handle.embed.remote(sequences, request_class, models), callers)

    @staticmethod
    async def _gather(calls) -> list:
        """Await Serve calls, mapping overload to an OpenAI error."""
        try:
            return await asyncio.gather(*calls)
        except BackPressureError:
            raise _overloaded() from None
