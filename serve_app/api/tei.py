"""Hugging Face text-embeddings-inference's API: its request and response shapes and its errors.

A second schema over the pipeline of /v1/embeddings (docs/tei.md): the Ingress turns a TEI
request into the same work, runs it through the same limits, classes, cache and Embedders, and
answers as TEI does. Status codes follow TEI's router (router/src/http/server.rs, `impl From<&ErrorType>
for StatusCode`): 422 `Validation` for a bad or too long input and for too many inputs (TEI
answered 413 there before its PR #818), 400 `Empty` for an empty batch, 429 `Overloaded`,
424 `Backend` when inference fails, 503 `Unhealthy`; a body over the size limit gets 413.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from .encoding import apply_dimensions, l2_normalize
from .errors import OpenAIError, invalid
from .request_class import PriorityField
from .schemas import InputField, Inputs, parse_inputs, validate_body

EMPTY = "empty"  # the code of TEI's one 400: a batch without inputs


class TeiConfig(BaseModel):
    """`args.tei` of the app: TEI serves one model, so its routes serve one of ours."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        default=None, description="The model TEI's routes serve (a name from args.models); default: the first."
    )
    auto_truncate: bool = Field(
        default=False,
        description="What a TEI request without `truncate` gets: false, an over-long input is a 422 "
        "(this service's rule); true, it is cut, as by TEI's own --auto-truncate (its default in "
        "recent releases).",
    )


class _Body(BaseModel):
    # TEI (serde) ignores fields it does not know; so do we, so that TEI clients' requests pass.
    model_config = ConfigDict(extra="ignore")

    prompt_name: StrictStr | None = None


class EmbedRequest(_Body):
    inputs: InputField
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    # Extension, as on /v1/embeddings: the request class (docs/request-classes.md).
    priority: PriorityField | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _parse_inputs(cls, value: Any) -> Inputs:
        return parse_inputs(value)

    @property
    def direction(self) -> Literal["right", "left"]:
        return self.truncation_direction.lower()  # type: ignore[return-value]


class TokenizeRequest(_Body):
    inputs: StrictStr | list[StrictStr]
    add_special_tokens: StrictBool = True

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


def parse_embed(payload: Any) -> EmbedRequest:
    _refuse_empty_batch(payload)
    return validate_body(EmbedRequest, payload)


def parse_tokenize(payload: Any) -> TokenizeRequest:
    _refuse_empty_batch(payload)
    return validate_body(TokenizeRequest, payload)


def _refuse_empty_batch(payload: Any) -> None:
    if isinstance(payload, dict) and payload.get("inputs") == []:
        raise invalid("`inputs` cannot be empty", "inputs", EMPTY)


def prompt_task(prompts: dict[str, str], name: str | None) -> str | None:
    """The instruction task a `prompt_name` stands for (None: no prompt)."""
    if name is None:
        return None
    if name not in prompts:
        raise invalid(
            f"`prompt_name` {name!r} is not configured for this model. Available prompts: {sorted(prompts)} "
            "(the model's `prompts` and, with a query_instruction, `query`).",
            "prompt_name",
        )
    return prompts[name]


def check_normalize(normalize: bool, model: str, model_normalizes: bool) -> None:
    """normalize: false needs the model's own vectors, which a normalizing model never hands out."""
    if not normalize and model_normalizes:
        raise invalid(
            f"normalize: false is not available for model '{model}': it is configured with "
            "normalize: true, so its vectors are normalized before they leave the model. Serve a "
            "model entry with normalize: false to get its unnormalized vectors.",
            "normalize",
        )


def tei_vectors(vectors: np.ndarray, dimensions: int | None, normalize: bool, model_normalizes: bool) -> np.ndarray:
    """TEI's order: keep the first `dimensions`, then normalize if asked. A normalizing model's
    rows get exactly what /v1/embeddings returns; a model configured with normalize: false gives
    its own vectors, normalized here when the request asks for it (TEI's default)."""
    vectors = apply_dimensions(vectors, dimensions, model_normalizes)
    return l2_normalize(vectors) if normalize and not model_normalizes else vectors


def render_vectors(vectors: np.ndarray) -> bytes:
    """TEI's response body: an array of arrays of floats."""
    return orjson.dumps(list(np.ascontiguousarray(vectors, dtype="<f4")), option=orjson.OPT_SERIALIZE_NUMPY)


def info(
    *, model_id: str, revision: str | None, dtype: str, served_model_name: str, pooling: str,
    max_input_length: int, max_batch_tokens: int, max_client_batch_size: int, auto_truncate: bool, version: str,
) -> dict[str, Any]:
    """GET /info in TEI's shape, with what this service knows: no fixed bound on concurrent
    requests nor a count of tokenization workers (replicas scale), so those fields are absent."""
    return {
        "model_id": model_id,
        "model_sha": revision,
        "model_dtype": dtype,
        "served_model_name": served_model_name,
        "model_type": {"embedding": {"pooling": pooling}},
        "max_input_length": max_input_length,
        "max_batch_tokens": max_batch_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": max_client_batch_size,
        "auto_truncate": auto_truncate,
        "version": version,
        "sha": None,
        "docker_label": None,
    }


def tei_error(exc: OpenAIError) -> JSONResponse:
    """An error in TEI's shape, `{"error", "error_type"}`, with TEI's status for it."""
    status, error_type = _status_and_type(exc)
    return JSONResponse({"error": exc.message, "error_type": error_type}, status_code=status, headers=exc.headers)


def _status_and_type(exc: OpenAIError) -> tuple[int, str]:
    if exc.code == EMPTY:
        return 400, "Empty"
    if exc.status == 400:
        return 422, "Validation"
    if exc.status == 401:
        return 401, "Unauthorized"  # TEI itself answers 401 with no body
    if exc.status == 413:
        return 413, "Validation"
    if exc.status == 429 or exc.code == "overloaded":
        return 429, "Overloaded"
    if exc.status == 503:
        return 503, "Unhealthy"
    return 424, "Backend"
