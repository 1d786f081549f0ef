"""TEI's /embed (and POST /), /tokenize and /info: one model, TEI's shapes (serve_app/api/tei.py;
docs/tei.md), over the same pipeline as /v1/embeddings."""

from __future__ import annotations

import asyncio
import importlib.metadata

import orjson
from fastapi import Request, Response

from serve_app.api import tei
from serve_app.api.errors import invalid
from serve_app.api.limits import check_counts, read_json
from serve_app.deployments.pipeline import (
    REQUEST_CLASS_HEADER,
    Pipeline,
    RequestContext,
    check_inputs,
)
from serve_app.engine.spec import dtype_name


class TeiRoutes:
    def __init__(self, pipeline: Pipeline, config: tei.TeiConfig):
        self.pipeline = pipeline
        self.config = config
        self.spec = pipeline.specs[config.model or next(iter(pipeline.specs))]

    async def embed(self, request: Request, ctx: RequestContext) -> Response:
        req = tei.parse_embed(await read_json(request, self.pipeline.limits.max_request_bytes))
        spec = ctx.spec = self.spec
        info = await self.pipeline.embedders.info(spec.name)
        if req.dimensions is not None and req.dimensions > info.dimensions:
            raise invalid(
                f"`dimensions` is {req.dimensions}, but must be at most {info.dimensions}, the model's dimension.",
                "dimensions",
            )
        tei.check_normalize(req.normalize, spec.name, info.normalize)
        task = tei.prompt_task(spec.prompt_tasks(), req.prompt_name)
        check_inputs(spec, req.inputs, task, "prompt_name")
        ctx.inputs, ctx.task, ctx.requested_class, ctx.is_query = req.inputs, task, req.priority, task is not None
        ctx.truncate = self.config.auto_truncate if req.truncate is None else req.truncate
        ctx.direction = req.direction
        body = await self.pipeline.run(ctx, lambda ctx, vectors: tei.render_vectors(
            tei.tei_vectors(vectors, req.dimensions, req.normalize, info.normalize)
        ))
        chars = sum(map(len, req.inputs.texts if req.inputs.texts is not None else req.inputs.token_ids))
        # TEI's own response headers (it reports usage only there), beside the request class.
        headers = {
            REQUEST_CLASS_HEADER: ctx.class_label,
            "x-compute-tokens": str(ctx.n_tokens),
            "x-compute-characters": str(chars),
            "x-tokenization-time": str(round(ctx.timings["tokenize"] * 1000)),
            "x-inference-time": str(round(ctx.timings["embed"] * 1000)),
            "x-total-time": str(round(sum(ctx.timings.values()) * 1000)),
        }
        return Response(body, media_type="application/json", headers=headers)

    async def tokenize(self, request: Request, ctx: RequestContext) -> Response:
        req = tei.parse_tokenize(await read_json(request, self.pipeline.limits.max_request_bytes))
        spec = ctx.spec = self.spec
        check_counts(len(req.texts), self.pipeline.limits)
        task = tei.prompt_task(spec.prompt_tasks(), req.prompt_name)
        tokenizer = self.pipeline.tokenizers.local[spec.name]
        # Off the event loop: a large body takes a while, and nothing here waits on a model.
        tokens = await asyncio.to_thread(tokenizer.describe_tokens, req.texts, task, req.add_special_tokens)
        return Response(orjson.dumps(tokens), media_type="application/json")

    async def info(self, request: Request, ctx: RequestContext) -> Response:
        spec = self.spec
        info = await self.pipeline.embedders.info(spec.name)
        dtype = "float8" if spec.quantization == "fp8" else dtype_name(spec.dtype, info.device)
        body = tei.info(
            model_id=spec.source, revision=spec.revision, dtype=dtype, served_model_name=spec.name,
            pooling=info.pooling, max_input_length=info.max_input_tokens, max_batch_tokens=info.max_batch_tokens,
            max_client_batch_size=self.pipeline.limits.max_inputs_per_request,
            auto_truncate=self.config.auto_truncate, version=importlib.metadata.version("serve-embeddings"),
        )
        return Response(orjson.dumps(body), media_type="application/json")
