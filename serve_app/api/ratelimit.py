"""Per-key rate limits: requests per minute and tokens per minute.

Each limit is a token bucket whose capacity is the per-minute limit and which refills at
limit / 60 per second, starting full: a key may burst up to its whole minute's allowance at
once, then gets capacity back continuously. Buckets live in the memory of each Ingress
replica, so **the limits are per Ingress replica**: with N replicas a key can get up to
N × the configured rate in total (Serve's proxy spreads requests over the replicas, so a
busy key sees roughly that). For a service-wide limit L, configure L / N with a fixed
`num_replicas: N` for the Ingress. Buckets start full again when a replica restarts.

Flow in the ingress, per request:

1. `check_request(key_name)` before any work: takes one request from the requests bucket,
   or raises 429 if the key has no requests left *or* has used up its tokens.
2. `check_tokens(key_name, n)` once the inputs are tokenized (the count is known only then):
   takes n tokens, or raises 429. A request larger than the whole per-minute token limit can
   never pass: 429 without `Retry-After`, and `x-should-retry: false` so the official
   clients do not retry it.
3. Optionally `refund_tokens(key_name, n)` if the request then fails through no fault of the
   client (e.g. 503 overloaded), so that its retry is not charged twice.

Every 429 carries `Retry-After`: whole seconds (at least 1, rounded up) after which the
refused request would pass if nothing else used the key meanwhile.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from serve_app.engine.scheduling import RequestClass

from .errors import OpenAIError
from .request_class import PriorityField

logger = logging.getLogger(__name__)

# Bucket levels are floats; a deficit this small (in requests or tokens) counts as none, so
# that waiting the advertised Retry-After always suffices despite rounding.
_EPSILON = 1e-3


PerMinute = Annotated[int, Field(gt=0)]


class KeyLimits(BaseModel):
    """Overrides for one key, in `RateLimits.per_key`: a number replaces the default, an
    omitted field (or `null`) inherits it, and `"unlimited"` removes that limit for the key.

    (No meaning hangs on whether a field was written, so the config survives a
    `model_dump()` / `model_validate()` round trip, e.g. through `.bind()`.)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: PerMinute | Literal["unlimited"] | None = None
    tokens_per_minute: PerMinute | Literal["unlimited"] | None = None
    # The request class of this key's requests that do not send `priority` (e.g. an indexing
    # key: batch); None: decided per request (docs/request-classes.md).
    priority: PriorityField | None = None


class Limits(NamedTuple):
    """The limits that apply to one key; None means no limit."""

    requests_per_minute: int | None
    tokens_per_minute: int | None


class RateLimits(BaseModel):
    """`args.rate_limits` of the app: defaults for every key (absent: no limit), plus
    overrides by key name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    per_key: dict[str, KeyLimits] = Field(default_factory=dict)

    def request_class_for(self, name: str) -> RequestClass | None:
        override = self.per_key.get(name)
        return override.priority if override else None

    def for_key(self, name: str) -> Limits:
        override = self.per_key.get(name) or KeyLimits()
        return Limits(
            _resolve(override.requests_per_minute, self.requests_per_minute),
            _resolve(override.tokens_per_minute, self.tokens_per_minute),
        )


def _resolve(override: int | str | None, default: int | None) -> int | None:
    if override is None:
        return default
    return None if isinstance(override, str) else override  # the only string is "unlimited"


@dataclass
class _Bucket:
    capacity: float  # the per-minute limit
    level: float
    updated: float  # clock reading of the last refill

    @property
    def rate(self) -> float:  # units per second
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated:  # a clock that steps back refills nothing
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def has(self, amount: float) -> bool:
        return self.level + _EPSILON >= amount

    def seconds_until(self, amount: float) -> int:
        """Whole seconds (≥ 1) until the bucket holds `amount`; call only when it doesn't."""
        seconds = (amount - self.level - _EPSILON / 2) / self.rate
        return max(1, math.ceil(seconds))


@dataclass
class _KeyState:
    requests: _Bucket | None
    tokens: _Bucket | None


class RateLimiter:
    """In-process token buckets per key name (one instance per Ingress replica).

    `clock` returns seconds (monotonic); tests inject a fake one. Thread-safe.
    `known_keys`, if given, are the names the authenticator can return: a `per_key` entry
    for any other name is a configuration error (most likely a typo).
    """

    def __init__(
        self,
        limits: RateLimits,
        known_keys: Iterable[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if known_keys is not None:
            unknown = sorted(set(limits.per_key) - set(known_keys))
            if unknown:
                raise ValueError(
                    f"rate_limits.per_key names keys that are not configured: {', '.join(unknown)}"
                )
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, _KeyState] = {}

    def _key(self, name: str, now: float) -> _KeyState:
        state = self._state.get(name)
        if state is None:
            limits = self.limits.for_key(name)
            state = self._state[name] = _KeyState(
                requests=_new_bucket(limits.requests_per_minute, now),
                tokens=_new_bucket(limits.tokens_per_minute, now),
            )
        return state

    def check_request(self, key_name: str) -> None:
        """Count one request against `key_name`, or raise 429 (nothing counted)."""
        with self._lock:
            now = self._clock()
            state = self._key(key_name, now)
            requests, tokens = state.requests, state.tokens
            if requests is not None:
                requests.refill(now)
                if not requests.has(1):
                    wait = requests.seconds_until(1)
                    raise _limited(
                        key_name,
                        f"Rate limit reached for requests per minute (RPM) on this API key: limit "
                        f"{_count(requests.capacity)} requests per minute. Please try again in {wait}s.",
                        wait,
                    )
            if tokens is not None:
                tokens.refill(now)
                if not tokens.has(1):
                    wait = tokens.seconds_until(1)
                    raise _limited(
                        key_name,
                        f"Rate limit reached for tokens per minute (TPM) on this API key: limit "
                        f"{_count(tokens.capacity)} tokens per minute, all used. Please try again in {wait}s.",
                        wait,
                    )
            if requests is not None:
                requests.level -= 1

    def check_tokens(self, key_name: str, n_tokens: int) -> None:
        """Count `n_tokens` against `key_name`, or raise 429 (nothing counted)."""
        with self._lock:
            now = self._clock()
            tokens = self._key(key_name, now).tokens
            if tokens is None or n_tokens <= 0:
                return
            tokens.refill(now)
            if n_tokens > tokens.capacity:
                raise OpenAIError(
                    429,
                    f"Request too large for the tokens per minute (TPM) limit of this API key: limit "
                    f"{_count(tokens.capacity)}, requested {n_tokens}. Split the input into smaller requests.",
                    "input",
                    "rate_limit_exceeded",
                    {"x-should-retry": "false"},
                )
            if not tokens.has(n_tokens):
                wait = tokens.seconds_until(n_tokens)
                raise _limited(
                    key_name,
                    f"Rate limit reached for tokens per minute (TPM) on this API key: limit "
                    f"{_count(tokens.capacity)}, requested {n_tokens}, available {int(max(tokens.level, 0))}. "
                    f"Please try again in {wait}s.",
                    wait,
                )
            tokens.level -= n_tokens

    def refund_tokens(self, key_name: str, n_tokens: int) -> None:
        """Give back tokens taken by `check_tokens` for a request that was not served."""
        with self._lock:
            state = self._state.get(key_name)
            if state is not None and state.tokens is not None and n_tokens > 0:
                state.tokens.refill(self._clock())
                state.tokens.level = min(state.tokens.capacity, state.tokens.level + n_tokens)


def _new_bucket(per_minute: int | None, now: float) -> _Bucket | None:
    return None if per_minute is None else _Bucket(capacity=float(per_minute), level=float(per_minute), updated=now)


def _count(capacity: float) -> str:
    return str(int(capacity))


def _limited(key_name: str, message: str, retry_after: int) -> OpenAIError:
    logger.debug("rate limited key %s for %ds", key_name, retry_after)
    return OpenAIError(429, message, None, "rate_limit_exceeded", {"Retry-After": str(retry_after)})
