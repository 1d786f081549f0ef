"""OpenAI's /v1/embeddings: its request parsed into a RequestContext, its response rendered."""

from __future__ import annotations

from fastapi import Request, Response

from serve_app.api.encoding import apply_dimensions, render_embeddings
from serve_app.api.errors import invalid
from serve_app.api.limits import read_json
from serve_app.api.schemas import parse_request
from serve_app.deployments.pipeline import (
    REQUEST_CLASS_HEADER,
    Pipeline,
    RequestContext,
    check_inputs,
)


class OpenAIRoutes:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    async def embeddings(self, request: Request, ctx: RequestContext) -> Response:
        req = parse_request(await read_json(request, self.pipeline.limits.max_request_bytes))
        spec = ctx.spec = self.pipeline.spec(req.model)
        info = await self.pipeline.embedders.info(spec.name)
        if req.dimensions is not None and req.dimensions > info.dimensions:
            raise invalid(
                f"Invalid value for 'dimensions': {req.dimensions}: at most {info.dimensions} for model "
                f"'{spec.name}'.", "dimensions"
            )
        task = req.instruction or (spec.query_instruction if req.input_type == "query" else None)
        check_inputs(spec, req.inputs, task, "instruction" if req.instruction else "input_type")
        ctx.inputs, ctx.task, ctx.truncate, ctx.requested_class = req.inputs, task, req.truncate, req.priority
        ctx.is_query = req.input_type == "query" or task is not None
        body = await self.pipeline.run(ctx, lambda ctx, vectors: render_embeddings(
            apply_dimensions(vectors, req.dimensions, info.normalize), spec.name, ctx.n_tokens, req.encoding_format
        ))
        return Response(body, media_type="application/json", headers={REQUEST_CLASS_HEADER: ctx.class_label})
