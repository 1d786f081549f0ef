"""Ray-free rules of the request path: request classes, shedding order, the vector cache."""

import numpy as np
import pytest

from serve_app.api.cache import ENTRY_OVERHEAD_BYTES, VectorCache, ids_key, look_up
from serve_app.api.errors import OpenAIError
from serve_app.api.limits import InflightTokens
from serve_app.api.ratelimit import RateLimits
from serve_app.api.request_class import RequestClassPolicy
from serve_app.api.schemas import parse_request

POLICY = RequestClassPolicy()


@pytest.mark.parametrize(
    "requested, key_default, is_query, n_inputs, n_tokens, expected",
    [
        (None, None, False, 1, 12, "interactive"),  # a plain one-text request
        (None, None, False, 1, 4096, "interactive"),  # one full-length SFR document
        (None, None, False, 64, 12_000, "batch"),  # indexing
        (None, None, False, 2, 9000, "batch"),  # few inputs but many tokens
        (None, None, True, 500, 9000, "interactive"),  # queries are interactive, whatever their size
        (None, "batch", True, 1, 10, "batch"),  # an indexing key's default beats the rule
        ("interactive", "batch", False, 64, 12_000, "interactive"),  # the request's own field beats all
        ("batch", None, True, 1, 10, "batch"),
    ],
)
def test_classes(requested, key_default, is_query, n_inputs, n_tokens, expected):
    assert POLICY.classify(POLICY.declared(requested, key_default, is_query), n_inputs, n_tokens) == expected


@pytest.mark.parametrize(
    "requested, is_query, n_inputs, expected",
    [
        (None, False, 4, True),  # few inputs: interactive unless its tokens say otherwise
        (None, False, 5, False),
        (None, True, 500, True),
        ("batch", True, 1, False),
    ],
)
def test_before_tokenizing_a_request_asks_for_interactive_work_by_what_it_declares_and_its_size(
    requested, is_query, n_inputs, expected
):
    assert POLICY.asks_interactive(POLICY.declared(requested, None, is_query), n_inputs) is expected


def test_disabled_classes_put_everything_on_one_path():
    off = RequestClassPolicy(enabled=False)
    assert off.classify(off.declared("batch", "batch", False), 2048, 300_000) == "interactive"


def test_the_priority_field_is_validated():
    assert parse_request({"model": "m", "input": "x", "priority": "batch"}).priority == "batch"
    for bad in ("urgent", 1, True):
        with pytest.raises(OpenAIError) as info:
            parse_request({"model": "m", "input": "x", "priority": bad})
        assert info.value.status == 400 and info.value.param == "priority"


def test_a_key_can_carry_a_default_class():
    limits = RateLimits.model_validate({"per_key": {"indexer": {"priority": "batch"}, "alice": {"requests_per_minute": 5}}})
    assert [limits.request_class_for(k) for k in ("indexer", "alice", "bob")] == ["batch", None, None]
    assert limits.for_key("indexer").requests_per_minute is None


def test_overload_sheds_batch_work_before_interactive_work():
    inflight = InflightTokens(limit=1000, reserve=500)
    inflight.acquire(900)
    with pytest.raises(OpenAIError) as info:
        inflight.acquire(200)  # a batch request past the limit
    assert info.value.status == 503 and info.value.headers["Retry-After"]
    inflight.acquire(200, reserve=True)  # an interactive one still fits in the reserve
    with pytest.raises(OpenAIError):
        inflight.acquire(500, reserve=True)  # ... up to limit + reserve
    inflight.release(1100)
    assert inflight.current == 0


def row(value: float, dims: int = 4) -> np.ndarray:
    return np.full(dims, value, dtype=np.float32)


def test_cache_is_an_lru_bounded_in_bytes():
    entry = len(ids_key("m", [1, 2])[1]) + row(0).nbytes + ENTRY_OVERHEAD_BYTES
    cache = VectorCache(max_bytes=3 * entry)
    keys = [ids_key("m", [k, k]) for k in range(4)]
    for k in range(3):
        assert cache.put(keys[k], row(k)) == 0
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used
    assert cache.put(keys[3], row(3)) == 1  # evicts 1, the least recently used
    assert cache.get(keys[1]) is None and len(cache) == 3 and cache.bytes == 3 * entry
    np.testing.assert_array_equal(cache.get(keys[0]), row(0))


def test_cache_keys_are_the_model_and_the_exact_ids():
    assert ids_key("m", [1, 2]) != ids_key("m", [1, 2, 2])
    assert ids_key("m", [1, 2]) != ids_key("other-model", [1, 2])
    assert ids_key("m", [1, 2]) == ids_key("m", [1, 2])


def test_cache_stores_a_copy_and_returns_the_same_bits():
    batch = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    cache = VectorCache(max_bytes=1 << 20)
    cache.put(ids_key("m", [5]), batch[3])
    batch[3] = 0  # the caller's array may be reused or read-only: the cache holds its own row
    assert cache.get(ids_key("m", [5])).tobytes() != batch[3].tobytes()
    assert cache.get(ids_key("m", [5])).base is None


def test_lookup_computes_each_missing_input_once_and_keeps_order():
    cache = VectorCache(max_bytes=1 << 20)
    cache.put(ids_key("m", [9]), row(9))
    sequences = [[1], [9], [1], [2]]
    lookup = look_up(cache, "m", sequences)
    assert lookup.hits == 1 and lookup.to_compute(sequences) == [[1], [2]]
    vectors, evicted = lookup.complete(np.stack([row(1), row(2)]), cache)
    np.testing.assert_array_equal(vectors, np.stack([row(1), row(9), row(1), row(2)]))
    assert evicted == 0 and look_up(cache, "m", sequences).hits == 4


def test_lookup_without_storing_and_with_everything_cached():
    cache = VectorCache(max_bytes=1 << 20)
    lookup = look_up(cache, "m", [[3]])
    lookup.complete(np.stack([row(3)]), None)  # batch work is not stored
    assert len(cache) == 0
    cache.put(ids_key("m", [3]), row(3))
    vectors, _ = look_up(cache, "m", [[3], [3]]).complete(None, cache)
    np.testing.assert_array_equal(vectors, np.stack([row(3), row(3)]))


def test_a_zero_size_cache_holds_nothing():
    cache = VectorCache(max_bytes=0)
    assert cache.put(ids_key("m", [1]), row(1)) == 0 and len(cache) == 0
