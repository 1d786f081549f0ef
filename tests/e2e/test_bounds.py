"""End to end: bounds that hold before work is spent, edge inputs, and cancelled requests.

Issue 20: over-bound requests are refused without tokenizing them whole (a flood of them gets
fast, well-formed refusals while a query beside them is served); edge inputs get a correct
vector (against testkit/reference.py) or a clear 4xx; a request whose client goes away gives
back its in-flight budget, its work queued at the Embedders and its rate-limit tokens.
"""

import asyncio
import re
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serve_app.api.limits import RequestLimits, token_bounds
from serve_app.api.schemas import Inputs
from serve_app.deployments.tokenizer_client import THREAD_TOKENIZE_MAX_CHARS
from testkit.app import (
    MAX_REQUEST_TOKENS,
    METERED_TOKENS_PER_MINUTE,
    SFR_TASK,
    TINY_MAX_TOKENS,
    local_config_model,
    tiny_sfr_model,
    tiny_sfr_vocab_model,
)

WORDS = "the quick brown fox jumps over lazy dog cat sleeps in warm sun search vectors".split()
LORA_MAX_TOKENS = 512  # tiny-sfr-lora's max_input_tokens (conftest.py)


def n_tokens(reference, text: str) -> int:
    """Tokens the model sees for `text`: the tokenizer's ids plus the EOS the model pools on."""
    return len(reference.tokenizer(text)["input_ids"]) + 1


def text_of_length(reference, length: int) -> str:
    for k in range(1, 4 * length):
        for tail in ("", " a", " a b", " of"):
            text = " ".join(WORDS[i % len(WORDS)] for i in range(k)) + tail
            if n_tokens(reference, text) == length:
                return text
    raise AssertionError(f"no text of exactly {length} tokens")


def embedding(response: httpx.Response, i: int = 0) -> np.ndarray:
    return np.array(response.json()["data"][i]["embedding"], dtype=np.float32)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- edge inputs -------------------------------------------------------------------------------


def test_input_of_exactly_the_limit_and_one_token_over(http, base_reference):
    exact = text_of_length(base_reference, TINY_MAX_TOKENS)
    over = text_of_length(base_reference, TINY_MAX_TOKENS + 1)
    ok = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": exact})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == TINY_MAX_TOKENS
    np.testing.assert_allclose(embedding(ok), base_reference.embed([exact])[0], atol=1e-5)
    error = assert_openai_error(
        http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": ["fine", over]}), 400, "context_length_exceeded"
    )
    assert f"Input 1 is {TINY_MAX_TOKENS + 1} tokens long" in error["message"]


def test_truncated_input_beside_a_short_one(http, base_reference):
    long_text = text_of_length(base_reference, TINY_MAX_TOKENS + 30)
    short = "warm sun"
    response = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": [short, long_text], "truncate": True})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == n_tokens(base_reference, short) + TINY_MAX_TOKENS
    want = base_reference.embed([short, long_text])  # the reference cuts to max_length - 1, then EOS
    np.testing.assert_allclose(np.stack([embedding(response, 0), embedding(response, 1)]), want, atol=1e-5)


def test_2048_text_inputs_and_one_more(http, base_reference):
    """Long enough in all to be tokenized in slices at the Tokenizer deployment."""
    filler = " ".join(WORDS * 2)
    batch = [f"{WORDS[i % len(WORDS)]} number {i}: {filler}" for i in range(2048)]
    assert sum(map(len, batch)) > THREAD_TOKENIZE_MAX_CHARS
    response = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": batch})
    assert response.status_code == 200 and len(response.json()["data"]) == 2048
    for i in (0, 1023, 2047):
        np.testing.assert_allclose(embedding(response, i), base_reference.embed([batch[i]])[0], atol=1e-5)
    error = assert_openai_error(
        http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": batch + ["x"]}), 400, "too_many_inputs"
    )
    assert "2049" in error["message"]


@pytest.mark.parametrize(
    "body, param, quoted",
    [
        ({"input": [1, True]}, "input", "true"),  # a JSON boolean is not a token id
        ({"input": [[5, 6], [True, 2]]}, "input", "true"),
        ({"input": "x", "dimensions": True}, "dimensions", "true"),  # ... nor the integer 1
        ({"input": "x", "dimensions": 1 << 20}, "dimensions", str(1 << 20)),
        ({"input": "x", "encoding_format": "int8" * 30}, "encoding_format", '"int8int8'),
        ({"input": "x", "model": "no-such-model" * 10}, "model", '"no-such-model'),
    ],
)
def test_wrong_types_and_values_are_quoted_in_the_400(http, body, param, quoted):
    response = http.post("/v1/embeddings", json={"model": "tiny-sfr"} | body)
    error = assert_openai_error(response, 404 if param == "model" else 400)
    assert error["param"] == param and quoted in error["message"]
    assert len(error["message"]) < 300  # the value is quoted, bounded: never echoed whole


@pytest.mark.parametrize(
    "raw, what",
    [
        (b"[" * 100_000 + b"]" * 100_000, "depth"),  # deeper than any JSON parser should go
        (b'{"model": "tiny-sfr", "input": "\\ud800"}', "surrogate"),  # a lone surrogate escape
        (b'{"model": "tiny-sfr", "input": "\xff\xfe"}', "utf-8"),  # bytes that are not UTF-8
    ],
)
def test_undecodable_bodies_are_400_invalid_json(http, raw, what):
    response = http.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, "invalid_json")
    assert what in error["message"].lower()


def test_deep_nesting_inside_valid_json_is_400(http):
    nested: list = [1]
    for _ in range(200):
        nested = [nested]
    error = assert_openai_error(http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": nested}), 400)
    assert error["param"] == "input" and "[[[[" in error["message"] and len(error["message"]) < 300


def test_nul_characters_are_text(http, base_reference):
    texts = ["a\x00b", "\x00", "null \x00 inside"]
    response = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": texts})
    assert response.status_code == 200
    got = np.stack([embedding(response, i) for i in range(len(texts))])
    np.testing.assert_allclose(got, base_reference.embed(texts), atol=1e-5)


# ---- a flood of over-bound requests ------------------------------------------------------------


async def _flood(base_url: str, key: str, bodies: list[dict], query: dict) -> tuple[list[httpx.Response], httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {key}"},
                                 limits=httpx.Limits(max_connections=len(bodies) + 1)) as client:
        flood = [asyncio.ensure_future(client.post("/v1/embeddings", json=body)) for body in bodies]
        await asyncio.sleep(0.2)  # the query arrives while the flood is being refused
        answer = await client.post("/v1/embeddings", json=query)
        return list(await asyncio.gather(*flood)), answer


def test_a_flood_of_over_bound_requests_is_refused_and_a_query_beside_it_served(base_url, api_keys, base_reference,
                                                                                ray_session):
    """Over max_tokens_per_request: text ones (each input fits, the sum does not; tokenizing
    stops at the limit) and token-id ones (refused by their count, before any check)."""
    per_input = MAX_REQUEST_TOKENS // 2000 + 8
    text = text_of_length(base_reference, per_input)
    over_text = {"model": "tiny-sfr-lora", "input": [f"{text}"] * 2000}
    over_ids = {"model": "tiny-sfr", "input": [[5] * (per_input - 1)] * 2000}
    query = {"model": "tiny-sfr", "input": "is the fox quick", "input_type": "query"}
    answers, plain = asyncio.run(_flood(base_url, api_keys.tester, [over_text, over_ids] * 8, query))
    for response in answers:
        if response.status_code == 503:
            assert_openai_error(response, 503, "overloaded")
            assert int(response.headers["retry-after"]) >= 1
        else:
            error = assert_openai_error(response, 400, "too_many_tokens")
            assert str(MAX_REQUEST_TOKENS) in error["message"]
    assert plain.status_code == 200
    np.testing.assert_allclose(embedding(plain), base_reference.embed([query["input"]], SFR_TASK)[0], atol=1e-5)
    assert wait_for_metrics(ray_session.metrics_url, lambda m: m.sum("ray_embeddings_inflight_tokens") == 0)


# ---- cancelled requests give back what they held -----------------------------------------------


class Metrics:
    def __init__(self, text: str):
        self.text = text

    def sum(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.text.splitlines():
            match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
            if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
                total += float(match.group(2))
        return total


def wait_for_metrics(url: str, condition, timeout_s: float = 60) -> bool:
    """Poll Ray's Prometheus endpoint (metrics reach it every few seconds) until `condition`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition(Metrics(httpx.get(url, timeout=10).text)):
            return True
        time.sleep(1)
    return False


def settled_sum(url: str, name: str, quiet_s: float = 12, timeout_s: float = 90) -> float:
    """`name`'s sum once it has stopped changing for longer than Ray's metrics report period
    (10 s): a read right after the work ends may not hold that work's last observations yet."""
    deadline = time.monotonic() + timeout_s
    value, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = Metrics(httpx.get(url, timeout=10).text).sum(name)
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
        time.sleep(1)
    raise AssertionError(f"{name} kept changing for {timeout_s} s")


def idle(metrics: Metrics) -> bool:
    """Nothing held: the Ingress's in-flight budget, the Embedders' queued or running parts."""
    return (metrics.sum("ray_embeddings_inflight_tokens") == 0
            and metrics.sum("ray_embeddings_queue_tokens") == 0
            and metrics.sum("ray_embeddings_queue_requests") == 0)


async def _post_cancelled_after(base_url: str, body: dict, headers: dict, seconds: float) -> httpx.Response | None:
    """POST, and go away (close the connection) after `seconds`; None if no answer came first."""
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        try:
            return await asyncio.wait_for(client.post("/v1/embeddings", json=body), seconds)
        except asyncio.TimeoutError:
            return None


def test_a_cancelled_request_gives_back_everything_it_held(base_url, api_keys, base_reference, merged_reference,
                                                          ray_session):
    """A batch-class request of most of the `metered` key's minute, cancelled by its client while
    tokenized, and at a third and two thirds of its time (queued, mid-pass); then the same
    request, served: possible only if every cancelled one was refunded. The Embedders compute
    far less than the cancelled requests held: their queued parts are dropped."""
    text = text_of_length(base_reference, 56)
    inputs = [f"{text} {i}" for i in range(640)]  # distinct: nothing is shared between inputs
    body = {"model": "tiny-sfr-lora", "input": inputs, "priority": "batch"}
    tokens = sum(len(ids) + 1 for ids in base_reference.tokenizer(inputs)["input_ids"])
    assert 0.8 * METERED_TOKENS_PER_MINUTE < tokens < METERED_TOKENS_PER_MINUTE
    url = ray_session.metrics_url
    # Work computed is read as the Embedders' batch count: Ray reports a histogram's sum as if
    # each observation sat at its bucket's midpoint (80 batches of ~470 tokens read 80 x 640),
    # while the count is exact (and each of these parts is one batch: two exceed max_batch_tokens).
    batches = "ray_embeddings_batch_tokens_count"
    assert wait_for_metrics(url, idle)
    before = settled_sum(url, batches)
    t0 = time.monotonic()  # the request's whole time and work, on another key
    timed = httpx.post(f"{base_url}/v1/embeddings", json=body, timeout=300,
                       headers={"Authorization": f"Bearer {api_keys.tester}"})
    whole_s = time.monotonic() - t0
    assert timed.status_code == 200
    whole = settled_sum(url, batches) - before
    metered = {"Authorization": f"Bearer {api_keys.metered}"}
    assert wait_for_metrics(url, idle)
    before += whole
    for timeout_s in (0.05, whole_s / 3, 2 * whole_s / 3):
        answered = asyncio.run(_post_cancelled_after(base_url, body, metered, timeout_s))
        assert answered is None, f"answered before the cancel at {timeout_s}s: {answered.status_code}"
        assert wait_for_metrics(url, idle), f"something still held after a cancel at {timeout_s}s"
    computed = settled_sum(url, batches) - before
    served = httpx.post(f"{base_url}/v1/embeddings", json=body, headers=metered, timeout=300)
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["prompt_tokens"] == tokens
    np.testing.assert_allclose(embedding(served, 639), merged_reference.embed([inputs[639]])[0], atol=1e-5)
    assert wait_for_metrics(url, idle)
    # Cancelled at a third and at two thirds of its time, a request whose queued parts are
    # dropped computes about one request's work in all (plus the batches running at each
    # cancel); one whose parts all run anyway computes nearly two.
    assert computed < 1.5 * whole, (
        f"cancelled requests' parts still computed: {computed:.0f} batches, {whole:.0f} for a whole request")


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=200) | st.from_regex(r"[\w .,'!?\-]{0,200}", fullmatch=True))
@example(text="0\x0c0")  # WordPiece drops the form feed: one word, one token
@example(text="a \n b\t\u3000c \u0301 \x0b")
def test_the_word_bound_never_exceeds_the_real_token_count(served_tokenizers, text):
    """Refusals before tokenizing rest on token_bounds' lower bound: it must hold for every
    tokenizer served (WordPiece: MiniLM; sentencepiece-style: the tiny SFR family and SFR's real vocabulary)."""
    limits = RequestLimits(max_tokens_per_request=10**9)
    for tokenizer in served_tokenizers:
        specials = len(tokenizer.prefix) + len(tokenizer.suffix)
        least, _ = token_bounds(Inputs(texts=[text]), True, tokenizer.max_tokens, specials, 0, limits)
        (ids,) = tokenizer.tokenize_texts([text], truncate=True)
        assert least <= len(ids), (text, least, len(ids))


@pytest.fixture(scope="module")
def served_tokenizers(tiny_family, sfr_vocab_model):
    from serve_app.engine.spec import ModelSpec
    from serve_app.engine.tokenization import load_input_tokenizer

    served = (local_config_model(), tiny_sfr_model(tiny_family), tiny_sfr_vocab_model(sfr_vocab_model))
    return [load_input_tokenizer(ModelSpec.model_validate(m)) for m in served]


# ---- a flood of small requests at a saturated Ingress --------------------------------------------

QUEUE_APP, QUEUE_ROUTE = "queue-bound", "/queue-bound"
PASS_S = 2.0  # each pass of the slow Embedder: far longer than a refusal takes
IN_FLIGHT, QUEUED = 2, 2  # the small Ingress's max_ongoing_requests and max_queued_requests


@pytest.fixture(scope="module")
def slow_app(ray_session, tiny_family):
    """tiny-sfr behind an Ingress that holds IN_FLIGHT requests and queues QUEUED more (as the
    shipped Ingress holds 256 and queues INGRESS_MAX_QUEUED_REQUESTS), before an Embedder over a
    simulated GPU whose every pass takes PASS_S: a replica saturated for as long as the test needs."""
    from ray import serve

    from serve_app.deployments import app as app_module
    from serve_app.engine.simulated_gpu import ENV
    from tests.common import spec_for

    slow_gpu = {ENV: f"pass_ms={PASS_S * 1000:.0f},dimensions=64"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_module, "Ingress",
                      app_module.Ingress.options(max_ongoing_requests=IN_FLIGHT, max_queued_requests=QUEUED))
        patch.setattr(app_module, "Embedder", app_module.Embedder.options(
            ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": slow_gpu}}))
        spec = spec_for(tiny_family["base"], name="tiny-sfr")
        serve.run(app_module.build_app({"models": [spec.model_dump(exclude_none=True)], "auth": {"enabled": False},
                                        "cache": {"max_bytes": 0}}),
                  name=QUEUE_APP, route_prefix=QUEUE_ROUTE)
    yield ray_session.url + QUEUE_ROUTE
    serve.delete(QUEUE_APP)


async def _timed_posts(url: str, bodies: list[dict]) -> list[tuple[float, httpx.Response]]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as client:
        t0 = time.monotonic()

        async def post(body: dict) -> tuple[float, httpx.Response]:
            response = await client.post("/v1/embeddings", json=body)
            return time.monotonic() - t0, response

        return list(await asyncio.gather(*(post(body) for body in bodies)))


def test_a_flood_beyond_the_ingress_queue_is_refused_at_once_and_what_it_holds_is_served(slow_app):
    """Through deploy/config.yaml's front (HAProxy before the direct-ingress replica): requests
    beyond the Ingress's in-flight and queue bounds get Serve's 503 with Retry-After at once,
    not a wait behind the saturated replica; those it took are all served; and afterwards the
    replica serves as before."""
    bodies = [{"model": "tiny-sfr", "input": f"query number {i}"} for i in range(4 * (IN_FLIGHT + QUEUED))]
    answers = asyncio.run(_timed_posts(slow_app, bodies))
    served = [(t, r) for t, r in answers if r.status_code == 200]
    refused = [(t, r) for t, r in answers if r.status_code == 503]
    assert len(served) + len(refused) == len(bodies), [(r.status_code, r.text) for _, r in answers]
    # Serve may refuse a little early (it counts the queue across an await), never admit more.
    assert 1 <= len(served) <= IN_FLIGHT + QUEUED and refused
    assert all(r.headers["retry-after"] == "1" for _, r in refused)
    # Every refusal came back before any request was served: none waited for a pass.
    assert max(t for t, _ in refused) < min(t for t, _ in served)
    assert all(len(r.json()["data"][0]["embedding"]) == 64 for _, r in served)
    # The flood has passed: a request is served, not refused.
    assert httpx.post(slow_app + "/v1/embeddings", json=bodies[0], timeout=120).status_code == 200
