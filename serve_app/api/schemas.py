"""The OpenAI embeddings request, plus our extensions for instruction models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import ErrorDetails

from .errors import QUOTE_MAX_CHARS, OpenAIError, invalid, quote
from .request_class import PriorityField

Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class Inputs:
    """A request's `input`, as exactly one of: texts, or token-id sequences."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.token_ids or ())


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# What parse_inputs accepts, for the OpenAPI document (the field itself is parsed by hand, to
# give OpenAI's messages). Per-request limits (inputs, tokens, bytes) are the app's configuration.
InputField = Annotated[Any, WithJsonSchema({
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ],
    "description": "A text, texts, token ids, or token-id sequences (in the model's own vocabulary).",
})]


def openapi_body(schema: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself: the request schema it validates."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    input: InputField
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None
    # Extensions: which side of a retrieval pair this is, and the task for query instructions.
    input_type: Literal["query", "document"] | None = None
    instruction: Annotated[StrictStr, Field(min_length=1)] | None = None
    truncate: StrictBool = False
    # Extension: the request class (docs/request-classes.md); absent, the service decides.
    priority: PriorityField | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _parse_input(cls, value: Any) -> Inputs:
        return parse_inputs(value)

    @property
    def inputs(self) -> Inputs:
        return cast(Inputs, self.input)  # what _parse_input made of it


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_inputs(value: Any) -> Inputs:
    """Accept a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        if not value:
            raise ValueError("input must not be an empty string")
        return Inputs(texts=[value])
    if not isinstance(value, list) or not value:
        raise ValueError(
            "input must be a non-empty string, array of strings, array of token ids, "
            "or array of arrays of token ids"
        )
    if all(isinstance(item, str) for item in value):
        empty = next((i for i, item in enumerate(value) if not item), None)
        if empty is not None:
            raise ValueError(f"input[{empty}] is an empty string; every input must have content")
        return Inputs(texts=value)
    if all(_is_token(item) for item in value):
        return Inputs(token_ids=[value])
    if all(isinstance(item, list) for item in value):
        for i, seq in enumerate(value):
            if not seq:
                raise ValueError(f"input[{i}] is an empty array of token ids")
            bad = next((k for k, t in enumerate(seq) if not _is_token(t)), None)
            if bad is not None:
                raise ValueError(f"input[{i}] must contain only integer token ids, not {quote(seq[bad])}")
        return Inputs(token_ids=value)
    # Name the first item that breaks the form the first item set (a bool is not a token id).
    first_is_text = isinstance(value[0], str)
    odd = next(
        (i for i, item in enumerate(value) if not (isinstance(item, str) if first_is_text else _is_token(item))), 0
    )
    raise ValueError(
        "input must be a string, an array of strings, an array of integer token ids, or an "
        f"array of arrays of integer token ids (no mixing); input[{odd}] is {quote(value[odd])}"
    )


def parse_request(payload: Any) -> EmbeddingRequest:
    """Validate a decoded JSON body, turning pydantic's errors into one OpenAI error."""
    return validate_body(EmbeddingRequest, payload)


def validate_body(schema: type[Body], payload: Any) -> Body:
    """A decoded JSON body as `schema`, or one 400 that names the first problem."""
    if not isinstance(payload, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_request")
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise _describe(exc.errors()[0]) from None


def _describe(error: ErrorDetails) -> OpenAIError:
    loc = [str(part) for part in error.get("loc", ())]
    # A client chooses the names of unknown fields: bound them as any quoted value.
    param = loc[0][:QUOTE_MAX_CHARS] if loc else None
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {quote(loc[0])}", param, "unknown_parameter")
    if kind == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "value_error":  # ours (parse_inputs): the message quotes the offending item itself
        return invalid(f"Invalid value for '{param}': {message}", param)
    return invalid(f"Invalid value for '{param}': {quote(error.get('input'))}: {message}", param)
