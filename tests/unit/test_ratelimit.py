"""Per-key rate limits with an injected clock: bursts, 429 + Retry-After, refill, overrides, tokens."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.api.errors import OpenAIError
from serve_app.api.ratelimit import KeyLimits, Limits, RateLimiter, RateLimits


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: Clock, **limits) -> RateLimiter:
    return RateLimiter(RateLimits.model_validate(limits), clock=clock)


def limited(call, *args) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        call(*args)
    err = info.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert err.body()["error"]["type"] == "rate_limit_error"
    return err


def retry_after(err: OpenAIError) -> int:
    value = err.headers["Retry-After"]
    assert value.isdigit()
    return int(value)


def test_no_limits_configured_means_unlimited():
    clock = Clock()
    rl = limiter(clock)
    for _ in range(10_000):
        rl.check_request("alice")
    rl.check_tokens("alice", 10**9)


def test_burst_up_to_the_limit_then_429_with_retry_after():
    clock = Clock()
    rl = limiter(clock, requests_per_minute=60)  # one request per second
    for _ in range(60):
        rl.check_request("alice")
    err = limited(rl.check_request, "alice")
    assert retry_after(err) == 1
    assert "requests per minute" in err.message and "60" in err.message and "1s" in err.message


def test_retry_after_is_enough_and_not_more():
    clock = Clock()
    rl = limiter(clock, requests_per_minute=6)  # one request per 10 s
    for _ in range(6):
        rl.check_request("alice")
    clock.advance(3.5)
    wait = retry_after(limited(rl.check_request, "alice"))
    assert wait == 7  # 6.5 s to go, rounded up
    clock.advance(wait - 1)
    limited(rl.check_request, "alice")  # one second less is not enough
    clock.advance(1)
    rl.check_request("alice")  # after Retry-After it passes


def test_refused_requests_cost_nothing_and_capacity_refills_to_the_limit_only():
    clock = Clock()
    rl = limiter(clock, requests_per_minute=2)
    rl.check_request("alice")
    rl.check_request("alice")
    for _ in range(5):
        limited(rl.check_request, "alice")
    clock.advance(30)
    rl.check_request("alice")  # one back after 30 s, despite the refusals
    limited(rl.check_request, "alice")
    clock.advance(3600)  # an idle hour refills to the limit, not beyond
    rl.check_request("alice")
    rl.check_request("alice")
    limited(rl.check_request, "alice")


def test_keys_have_separate_buckets():
    clock = Clock()
    rl = limiter(clock, requests_per_minute=1)
    rl.check_request("alice")
    limited(rl.check_request, "alice")
    rl.check_request("bob")


def test_per_key_overrides():
    clock = Clock()
    rl = limiter(
        clock,
        requests_per_minute=2,
        tokens_per_minute=100,
        per_key={
            "indexer": {"requests_per_minute": 5},  # tokens_per_minute inherited (100)
            "trial": {"tokens_per_minute": 10, "requests_per_minute": None},  # null: inherited (2)
            "admin": {"requests_per_minute": "unlimited", "tokens_per_minute": "unlimited"},
        },
    )
    for _ in range(5):
        rl.check_request("indexer")
    limited(rl.check_request, "indexer")
    rl.check_tokens("indexer", 100)
    limited(rl.check_tokens, "indexer", 1)

    rl.check_request("trial")
    rl.check_request("trial")
    limited(rl.check_request, "trial")
    rl.check_tokens("trial", 10)
    limited(rl.check_tokens, "trial", 1)

    for _ in range(1000):
        rl.check_request("admin")
        rl.check_tokens("admin", 10_000)

    rl.check_request("someone")
    rl.check_request("someone")
    limited(rl.check_request, "someone")


def test_for_key_resolution():
    limits = RateLimits(
        requests_per_minute=10,
        per_key={"a": KeyLimits(tokens_per_minute=5), "b": {}, "c": {"requests_per_minute": "unlimited"}},
    )
    assert limits.for_key("a") == Limits(10, 5)
    assert limits.for_key("b") == Limits(10, None)
    assert limits.for_key("c") == Limits(None, None)
    assert limits.for_key("z") == Limits(10, None)


def test_config_survives_a_dump_and_validate_round_trip():
    """The app builder passes configs to the Ingress as dicts (`.bind(limits.model_dump())`)."""
    limits = RateLimits(
        requests_per_minute=10,
        tokens_per_minute=1000,
        per_key={"a": {"tokens_per_minute": 5}, "b": {"requests_per_minute": "unlimited"}},
    )
    again = RateLimits.model_validate(limits.model_dump())
    assert again == limits
    for name in ("a", "b", "z"):
        assert again.for_key(name) == limits.for_key(name)
    assert again.for_key("a") == Limits(10, 5)


def test_tokens_per_minute():
    clock = Clock()
    rl = limiter(clock, tokens_per_minute=6000)  # 100 tokens per second
    rl.check_request("alice")
    rl.check_tokens("alice", 4000)
    rl.check_tokens("alice", 1500)
    err = limited(rl.check_tokens, "alice", 1000)  # 500 left: 5 s until 1000
    assert retry_after(err) == 5
    assert "requested 1000" in err.message and "available 500" in err.message
    rl.check_tokens("alice", 500)  # the refusal took nothing
    clock.advance(2.5)
    rl.check_tokens("alice", 250)
    clock.advance(10)
    rl.check_tokens("alice", 1000)


def test_used_up_tokens_refuse_the_next_request_before_any_work():
    clock = Clock()
    rl = limiter(clock, requests_per_minute=100, tokens_per_minute=60)  # 1 token per second
    rl.check_request("alice")
    rl.check_tokens("alice", 60)
    err = limited(rl.check_request, "alice")
    assert retry_after(err) == 1 and "tokens per minute" in err.message
    clock.advance(1)
    rl.check_request("alice")


def test_request_larger_than_the_token_limit_is_never_retried():
    clock = Clock()
    rl = limiter(clock, tokens_per_minute=1000)
    err = limited(rl.check_tokens, "alice", 1001)
    assert "Retry-After" not in err.headers and err.headers["x-should-retry"] == "false"
    assert err.param == "input" and "1001" in err.message
    rl.check_tokens("alice", 1000)  # the refusal took nothing


def test_refund_tokens():
    clock = Clock()
    rl = limiter(clock, tokens_per_minute=100)
    rl.check_tokens("alice", 80)
    rl.refund_tokens("alice", 80)
    rl.check_tokens("alice", 100)
    rl.refund_tokens("alice", 500)  # never beyond the limit
    limited(rl.check_tokens, "alice", 100 + 1)
    rl.refund_tokens("nobody", 10)  # unknown keys: nothing to do


def test_retry_after_rounds_up_fractional_rates():
    clock = Clock()
    rl = limiter(clock, requests_per_minute=7)  # 60/7 ≈ 8.571 s per request
    for _ in range(7):
        rl.check_request("alice")
    wait = retry_after(limited(rl.check_request, "alice"))
    assert wait == 9
    clock.advance(8.5)
    limited(rl.check_request, "alice")
    clock.advance(0.5)
    rl.check_request("alice")


def test_exact_boundary_waits_are_not_rounded_up_by_float_noise():
    clock = Clock(0.0)
    rl = limiter(clock, tokens_per_minute=180)  # 3 tokens per second
    rl.check_tokens("alice", 180)
    rl.check_tokens("bob", 180)
    for _ in range(10):
        clock.advance(0.1)  # float error: the clock reads 0.9999999999999999, not 1.0
    assert clock.now < 1.0
    rl.check_tokens("bob", 3)  # 3 tokens are back after "1 s"
    wait = retry_after(limited(rl.check_tokens, "alice", 6))  # 3 more need exactly 1 s more
    assert wait == 1
    clock.advance(wait)
    rl.check_tokens("alice", 6)


def test_clock_stepping_back_refills_nothing():
    clock = Clock()
    rl = limiter(clock, requests_per_minute=1)
    rl.check_request("alice")
    clock.advance(-30)
    limited(rl.check_request, "alice")
    clock.advance(60)  # only 30 s after the last real reading
    limited(rl.check_request, "alice")
    clock.advance(30)
    rl.check_request("alice")


def test_config_validation():
    with pytest.raises(ValidationError):
        RateLimits(requests_per_minute=0)
    with pytest.raises(ValidationError):
        RateLimits(tokens_per_minute=-5)
    with pytest.raises(ValidationError):
        RateLimits(rpm=5)
    with pytest.raises(ValidationError):
        RateLimits(per_key={"a": {"requests_per_minute": 1, "burst": 3}})
    with pytest.raises(ValidationError):
        RateLimits(per_key={"a": {"per_key": {}}})
    with pytest.raises(ValidationError):
        RateLimits(per_key={"a": {"requests_per_minute": 0}})
    with pytest.raises(ValidationError):
        RateLimits(per_key={"a": {"requests_per_minute": "none"}})
    with pytest.raises(ValidationError):
        RateLimits(requests_per_minute="unlimited")  # absent already means no limit


def test_overrides_for_unknown_keys_are_a_startup_error():
    limits = RateLimits(per_key={"alice": {"requests_per_minute": 1}, "alcie": {"requests_per_minute": 1}})
    with pytest.raises(ValueError, match="alcie"):
        RateLimiter(limits, known_keys=["alice", "bob"])
    RateLimiter(limits, known_keys=["alice", "alcie"])
    RateLimiter(limits)  # no names given: not checked
