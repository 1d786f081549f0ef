"""OpenAI-shaped errors: every failure leaves as {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# How much of a rejected value a message quotes: enough to recognise it, never a whole body.
QUOTE_MAX_CHARS = 40
_QUOTE_MAX_ITEMS = 8  # items of an array or object rendered before cutting (deep or long values)


def quote(value: Any) -> str:
    """A rejected value as JSON, cut to QUOTE_MAX_CHARS with an ellipsis: messages name what they
    reject without echoing a large (or deeply nested) input back."""
    # backslashreplace: a lone surrogate would make the error body itself unencodable.
    text = _render(value, depth=4).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= QUOTE_MAX_CHARS else text[: QUOTE_MAX_CHARS - 1] + "…"


def _render(value: Any, depth: int) -> str:
    if isinstance(value, str):
        return json.dumps(value[: QUOTE_MAX_CHARS + 1], ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        if depth == 0:
            return "[…]" if value else "[]"
        items = [_render(item, depth - 1) for item in value[:_QUOTE_MAX_ITEMS]]
        return "[" + ", ".join(items + ["…"] * (len(value) > _QUOTE_MAX_ITEMS)) + "]"
    if isinstance(value, dict):
        if depth == 0:
            return "{…}" if value else "{}"
        pairs = [f"{_render(str(k), 0)}: {_render(v, depth - 1)}" for k, v in list(value.items())[:_QUOTE_MAX_ITEMS]]
        return "{" + ", ".join(pairs + ["…"] * (len(value) > _QUOTE_MAX_ITEMS)) + "}"
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return _render(str(value), depth)


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param, code)


def internal_error() -> OpenAIError:
    """What a client gets for a failure of ours; the details go to the logs only."""
    return OpenAIError(500, "The server had an error while processing your request.", code="internal_error")


def overloaded() -> OpenAIError:
    return OpenAIError(503, "The service is overloaded; retry shortly.", None, "overloaded", {"Retry-After": "1"})


def out_of_device_memory() -> OpenAIError:
    """An input that did not fit in the accelerator's memory even alone. Start-up proves that
    the longest inputs allowed fit, so memory was held elsewhere for a while: retry."""
    return OpenAIError(
        503, "An input did not fit in the model server's device memory even on its own; retry shortly.",
        "input", "device_out_of_memory", {"Retry-After": "1"},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's {"detail": ...} shapes (404, 405, 422, 500) with OpenAI's."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), None, code, dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(f"Invalid request: {exc.errors()[0].get('msg', 'malformed')}").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")  # never the request body: it may hold user text
        return internal_error().response()
