"""Per-request limits, enforced before any expensive work."""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from .errors import OpenAIError, invalid
from .schemas import Inputs

# A word that holds an ASCII letter or digit: at least one token in any tokenizer served
# (token_bounds). Words end only at a space, tab or line break: WordPiece drops the other ASCII
# controls (a form feed joins "a\x0cb" into one word). No backtracking: the first part cannot
# take the letter or digit that the second needs.
_WORD = re.compile(r"[^ \t\n\rA-Za-z0-9]*[A-Za-z0-9][^ \t\n\r]*")
# ASCII controls that str.split() treats as spaces, or keeps in words, but WordPiece drops.
_ASCII_DROPPED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _fewest_words(text: str) -> int:
    """Words of `text` that no tokenizer served turns into zero tokens (token_bounds)."""
    if text.isascii() and not _ASCII_DROPPED.search(text):
        return len(text.split())  # printable ASCII words between spaces, tabs, line breaks
    return len(_WORD.findall(text))


class RequestLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_inputs_per_request: int = Field(default=2048, gt=0, description="OpenAI's limit is 2048.")
    max_tokens_per_request: int = Field(default=300_000, gt=0, description="OpenAI's limit is 300 000.")
    max_request_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    max_inflight_tokens: int = Field(
        default=4_000_000,
        gt=0,
        description="Tokens one Ingress replica may have in flight to the Embedders; beyond "
        "it new batch-class requests get a fast 503 with Retry-After instead of queueing without bound.",
    )
    interactive_reserve_tokens: int = Field(
        default=1_000_000,
        ge=0,
        description="Interactive requests may take this many tokens beyond max_inflight_tokens, "
        "so that under overload batch work is shed first.",
    )


class InflightTokens:
    """Backpressure on real work: the tokens this ingress has sent and not yet had back.

    Requests that may use the reserve (interactive ones) are refused only past limit + reserve,
    so batch requests are shed first.
    """

    def __init__(self, limit: int, reserve: int = 0):
        self.limit = limit
        self.reserve = reserve
        self.current = 0

    def acquire(self, tokens: int, reserve: bool = False) -> None:
        self.resize(0, tokens, reserve)

    def resize(self, held: int, tokens: int, reserve: bool = False) -> None:
        """Hold `tokens` instead of `held`: a request admitted on an estimate settles on its count
        once tokenized. Only growth is checked; on a 503 the request still holds `held`."""
        extra = tokens - held
        limit = self.limit + (self.reserve if reserve else 0)
        # A request alone over the limit may still run when nothing else is in flight.
        if extra > 0 and self.current > held and self.current + extra > limit:
            raise OpenAIError(
                503,
                f"The service is overloaded ({self.current} tokens in flight); retry shortly.",
                None,
                "overloaded",
                {"Retry-After": "1"},
            )
        self.current += extra

    def release(self, tokens: int) -> None:
        self.current -= tokens


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> Any:
    """The body, decoded as JSON, within `limit` bytes (see read_body)."""
    body = await read_body(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # e.g. a lone surrogate, or nesting past orjson's depth limit
        raise invalid(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body exceeds the limit of {limit} bytes.", None, "request_too_large")


def check_counts(n_inputs: int, limits: RequestLimits) -> None:
    if n_inputs > limits.max_inputs_per_request:
        raise invalid(
            f"Too many inputs: {n_inputs}. The maximum is {limits.max_inputs_per_request} inputs per request.",
            "input",
            "too_many_inputs",
        )


def check_tokens(n_tokens: int, limits: RequestLimits, counted_all: bool = True) -> None:
    """`counted_all`: false while tokenizing, which stops as soon as the count is over the limit."""
    if n_tokens > limits.max_tokens_per_request:
        held = f"the inputs hold {n_tokens}" if counted_all else f"the inputs hold more than {n_tokens - 1}"
        raise invalid(
            f"Too many tokens: {held} tokens, but a request may hold at most {limits.max_tokens_per_request}.",
            "input",
            "too_many_tokens",
        )


def token_bounds(inputs: Inputs, truncate: bool, max_input_tokens: int, specials: int, instruction_bytes: int,
                 limits: RequestLimits) -> tuple[int, int]:
    """Bounds on a request's tokens known before tokenizing, for refusals that must come before
    any tokenizing: (at least, about at most), the latter capped where check_tokens refuses.

    At most: the tokenizers served cover at least one byte of UTF-8 text per token (byte-level
    BPE, sentencepiece with byte fallback, WordPiece), plus the special tokens around each input
    and the instruction's text. A normalizer that expands characters (NFKC ligatures) can exceed
    it: the Ingress admits on this figure and settles on the real count once tokenized.
    At least: client-supplied ids count themselves. A text counts its words that hold an ASCII
    letter or digit, plus the special tokens: the tokenizers served split at spaces, tabs and line
    breaks before they look up pieces (WordPiece, byte-level BPE, sentencepiece's `▁` words), so no token
    spans two words, and an ASCII letter or digit survives every normalizer, so no such word
    becomes zero tokens (WordPiece drops whitespace, control characters and accents: words of
    only those may).
    """
    if inputs.token_ids is not None:
        lengths = [len(ids) for ids in inputs.token_ids]
        least = 0 if truncate else sum(lengths)
        most = [n + specials for n in lengths]
    else:
        assert inputs.texts is not None  # an Inputs holds texts or token ids
        fewest = [_fewest_words(text) + specials for text in inputs.texts]
        least = sum(min(n, max_input_tokens) for n in fewest) if truncate else sum(fewest)
        most = [len(text.encode("utf-8", "surrogatepass")) + instruction_bytes + specials for text in inputs.texts]
    if truncate:
        most = [min(n, max_input_tokens) for n in most]
    return least, min(sum(most), limits.max_tokens_per_request)
