"""HTTP entry point: the Serve deployment that wires OpenAI's and TEI's routes to the pipeline,
and answers health and model listing. What a request goes through is pipeline.Pipeline.run."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from fastapi import FastAPI, Request, Response
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from serve_app.api import tei
from serve_app.api.auth import AuthConfig, Authenticator
from serve_app.api.cache import CacheConfig
from serve_app.api.errors import OpenAIError, install_error_handlers, internal_error
from serve_app.api.limits import RequestLimits
from serve_app.api.ratelimit import RateLimiter, RateLimits
from serve_app.api.request_class import RequestClassPolicy
from serve_app.api.schemas import EmbeddingRequest, openapi_body
from serve_app.deployments.embedder_client import EmbedderClient
from serve_app.deployments.openai_routes import OpenAIRoutes
from serve_app.deployments.pipeline import Pipeline, RequestContext
from serve_app.deployments.serve_logging import drop_batch_size_warning
from serve_app.deployments.tei_routes import TeiRoutes
from serve_app.deployments.tokenizer_client import TokenizerClient
from serve_app.engine.spec import ModelSpec

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 10.0
# A replaced or scaled-down Ingress replica finishes the requests it holds before it exits;
# Serve force-kills it after graceful_shutdown_timeout_s (default 20 s) and the proxy answers
# each request still running with a plain 500. Those requests wait on the Embedders, whose old
# replicas drain their own queues for up to *their* timeout (Embedder: 120 s; deploy/
# config.yaml: 60 s) and whose lost parts the ingress retries once: this must outlast both.
# The drain ends as soon as nothing is in flight, so a long bound costs an idle replica nothing.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 180.0

Handler = Callable[[Request, RequestContext], Awaitable[Response]]

# Module-level names must be defined above the deployment class: Serve pickles the class
# when the decorator runs, capturing only the names that exist at that point.
api = FastAPI(title="Embeddings (OpenAI-compatible)", version="0.1.0")
install_error_handlers(api)


# Requests an Ingress replica holds beyond max_ongoing_requests wait for a slot; past this many,
# Serve answers at once with a 503 and Retry-After (its own plain-text body, before our code
# runs) rather than queueing without bound while the replica's core is saturated. Token-heavy
# work is shed earlier, by max_inflight_tokens; this bound is for floods of small requests:
# 256 of them are well under a second of an Ingress core.
INGRESS_MAX_QUEUED_REQUESTS = 256


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  max_queued_requests=INGRESS_MAX_QUEUED_REQUESTS,
                  backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
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
        specs = {m["name"]: ModelSpec.model_validate(m) for m in models}
        request_limits = RequestLimits.model_validate(limits)
        self.auth = Authenticator(AuthConfig.model_validate(auth))
        self.pipeline = Pipeline(
            specs,
            TokenizerClient(specs, tokenizers, request_limits),  # tokenizer files only (no weights)
            EmbedderClient(specs, embedders),
            request_limits,
            RequestClassPolicy.model_validate(priority),
            RateLimiter(RateLimits.model_validate(rate_limits), known_keys=self.auth.names),
            CacheConfig.model_validate(cache).max_bytes,
        )
        self.openai = OpenAIRoutes(self.pipeline)
        self.tei = TeiRoutes(self.pipeline, tei.TeiConfig.model_validate(tei_config or {}))
        self.created = int(time.time())

    # Routes read and validate their bodies themselves (OpenAI-shaped errors, byte limits):
    # openapi_extra publishes the schemas they validate against at /openapi.json.
    @api.post("/v1/embeddings", openapi_extra=openapi_body(EmbeddingRequest))
    async def create_embeddings(self, request: Request) -> Response:
        return await self._front_door(request, self.openai.embeddings, OpenAIError.response)

    @api.post("/embed", openapi_extra=openapi_body(tei.EmbedRequest))
    async def tei_embed(self, request: Request) -> Response:
        return await self._front_door(request, self.tei.embed, tei.tei_error)

    @api.post("/", openapi_extra=openapi_body(tei.EmbedRequest))
    async def tei_root(self, request: Request) -> Response:
        """TEI answers POST / as /embed for an embedding model; clients given the bare URL post here."""
        return await self._front_door(request, self.tei.embed, tei.tei_error)

    @api.post("/tokenize", openapi_extra=openapi_body(tei.TokenizeRequest))
    async def tei_tokenize(self, request: Request) -> Response:
        return await self._front_door(request, self.tei.tokenize, tei.tei_error, observe=False)

    @api.get("/info")
    async def tei_info(self, request: Request) -> Response:
        return await self._front_door(request, self.tei.info, tei.tei_error, observe=False)

    async def _front_door(self, request: Request, handle: Handler, render_error: Callable[[OpenAIError], Response],
                          observe: bool = True) -> Response:
        """What every route that does work shares, whatever its schema: the API key, the key's
        request rate, the request metrics (`observe`), and errors rendered in the route's shape."""
        started = time.perf_counter()
        ctx = RequestContext()
        try:
            ctx.key = self.auth.authenticate(request.headers.get("authorization"))
            self.pipeline.rate.check_request(ctx.key)
            response = await handle(request, ctx)
        except OpenAIError as exc:
            response = render_error(exc)
        except Exception:
            logger.exception("unhandled error")  # never the request body: it may hold user text
            response = render_error(internal_error())
        if observe:
            metrics = self.pipeline.metrics
            metrics.requests.inc(tags={"model": ctx.model_label, "key": ctx.key, "status": str(response.status_code)})
            metrics.latency.observe(
                time.perf_counter() - started, tags={"model": ctx.model_label, "priority": ctx.class_label}
            )
        return response

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self.auth.authenticate(request.headers.get("authorization"))
        return {"object": "list", "data": [self._model_card(name) for name in self.pipeline.specs]}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> dict:
        self.auth.authenticate(request.headers.get("authorization"))
        return self._model_card(self.pipeline.spec(model_id).name)

    @api.get("/health/live")
    async def live(self) -> Response:
        """Liveness: this ingress answers; says nothing about the models (that is /health)."""
        return Response(orjson.dumps({"status": "alive"}), media_type="application/json")

    @api.get("/health")
    async def health(self) -> Response:
        """Ready only when every tokenizer and embedder has loaded its model and answers."""
        checks = [h.ready.remote() for h in self.pipeline.tokenizers.remote.values()]
        checks += [self.pipeline.embedders.info(name) for name in self.pipeline.specs]
        try:
            await asyncio.wait_for(asyncio.gather(*checks), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 — any failure means "not ready"
            logger.warning("health check failed: %s", type(exc).__name__)
            return OpenAIError(503, "Not ready: a deployment has not loaded its model.", code="not_ready").response()
        body = {"status": "ready", "models": list(self.pipeline.specs)}
        return Response(orjson.dumps(body), media_type="application/json")

    def _model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "self-hosted"}
        info = self.pipeline.embedders.known.get(name)
        if info:
            card.update(dimensions=info.dimensions, max_input_tokens=info.max_input_tokens)
        return card
