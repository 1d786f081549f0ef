"""End to end: a real Serve instance over HTTP, called with the official openai client and httpx.

Vectors are checked against the independent per-text references in testkit/reference.py.
"""

import asyncio
import base64
import json
import re
import time

import httpx
import numpy as np
import openai
import pytest

from testkit.app import (
    MAX_REQUEST_BYTES,
    MAX_REQUEST_TOKENS,
    ROOT,
    SFR_TASK,
    TINY_MAX_TOKENS,
)
from tests.common import post_body

WORDS = "the quick brown fox jumps over lazy dog cat sleeps in warm sun search vectors".split()


@pytest.fixture(scope="module")
def client(base_url, api_keys):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_keys.tester, max_retries=0, timeout=60)


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) + f" {i}" for i in range(n)]


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_health_and_models(http):
    assert http.get("/health").json()["status"] == "ready"
    assert http.get("/health/live").json()["status"] == "alive"
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-sfr", "tiny-sfr-lora", "tiny-sfr-lora-b", "all-MiniLM-L6-v2",
                                                 "tiny-sfr-chunk", "tiny-sfr-vocab"]
    assert http.get("/v1/models/tiny-sfr").json()["id"] == "tiny-sfr"
    assert http.get("/v1/models/nope").status_code == 404


def test_openai_client_default_base64_equals_reference(client, base_reference):
    batch = texts(8)
    response = client.embeddings.create(model="tiny-sfr", input=batch)  # the client asks for base64
    np.testing.assert_allclose(vectors(response), base_reference.embed(batch), atol=1e-5)
    assert response.model == "tiny-sfr"
    expected_tokens = sum(len(base_reference.token_ids(t)) for t in batch)
    assert response.usage.prompt_tokens == response.usage.total_tokens == expected_tokens


def test_float_and_base64_carry_the_same_vectors(http):
    body = {"model": "tiny-sfr", "input": ["how do cats sleep", "x"]}
    as_float = http.post("/v1/embeddings", json=body | {"encoding_format": "float"}).json()
    as_b64 = http.post("/v1/embeddings", json=body | {"encoding_format": "base64"}).json()
    for f, b in zip(as_float["data"], as_b64["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(np.array(f["embedding"], dtype=np.float32), decoded)


def test_every_input_form(client, base_reference):
    text = "how do cats sleep"
    ids = base_reference.tokenizer(text)["input_ids"]  # what a user's tokenizer returns: no EOS
    expected = base_reference.embed([text])[0]
    for value in (text, [text], ids, [ids, ids]):
        got = vectors(client.embeddings.create(model="tiny-sfr", input=value, encoding_format="float"))
        np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-5)


def test_query_instruction_and_custom_instruction(http, base_reference):
    query = ["how do cats sleep", "why do dogs dream"]
    default = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": query, "input_type": "query"}).json()
    np.testing.assert_allclose(
        [d["embedding"] for d in default["data"]], base_reference.embed(query, SFR_TASK), atol=1e-5
    )
    task = "Retrieve code that answers the question"
    custom = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": query, "instruction": task}).json()
    np.testing.assert_allclose([d["embedding"] for d in custom["data"]], base_reference.embed(query, task), atol=1e-5)
    assert custom["usage"]["prompt_tokens"] == sum(len(base_reference.token_ids(q, task)) for q in query)
    document = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": query, "input_type": "document"})
    np.testing.assert_allclose([d["embedding"] for d in document.json()["data"]], base_reference.embed(query), atol=1e-5)


def test_dimensions_truncate_and_renormalize(client, base_reference):
    full = base_reference.embed(["how do cats sleep"])[0][:16]
    got = vectors(client.embeddings.create(model="tiny-sfr", input="how do cats sleep", dimensions=16))[0]
    np.testing.assert_allclose(got, full / np.linalg.norm(full), atol=1e-5)


def test_truncate_cuts_to_the_limit(http, base_reference):
    long_text = "the quick brown fox " * 40
    refused = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": long_text})
    assert refused.status_code == 400 and f"maximum input length is {TINY_MAX_TOKENS}" in refused.json()["error"]["message"]
    cut = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": long_text, "truncate": True}).json()
    assert cut["usage"]["prompt_tokens"] == TINY_MAX_TOKENS
    np.testing.assert_allclose(cut["data"][0]["embedding"], base_reference.embed([long_text])[0], atol=1e-5)


def test_500_inputs_come_back_in_order(client, base_reference):
    batch = texts(500, seed=1)
    got = vectors(client.embeddings.create(model="tiny-sfr", input=batch))
    np.testing.assert_allclose(got, base_reference.embed(batch), atol=1e-5)


def test_worst_case_request_fans_out_and_completes(client, base_reference):
    """2048 inputs at the length limit: 256 parts of one full batch each, in order."""
    rng = np.random.default_rng(4)
    vocab = len(base_reference.tokenizer)
    ids = [[1] + [int(t) for t in rng.integers(3, vocab, size=TINY_MAX_TOKENS - 2)] for _ in range(2048)]
    response = client.embeddings.create(model="tiny-sfr", input=ids)
    assert len(response.data) == 2048 and response.usage.prompt_tokens == MAX_REQUEST_TOKENS
    got = vectors(response)
    for i in (0, 1, 777, 2047):
        np.testing.assert_allclose(got[i], base_reference.embed_ids(ids[i] + [2]), atol=1e-5)


def test_64_concurrent_requests_each_get_their_own_vectors(base_url, api_keys, base_reference):
    requests = [texts(int(n), seed=100 + k) for k, n in enumerate(np.random.default_rng(2).integers(1, 6, size=64))]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_keys.tester, max_retries=0, timeout=120)
        responses = await asyncio.gather(*(client.embeddings.create(model="tiny-sfr", input=r) for r in requests))
        await client.close()
        return responses

    for batch, response in zip(requests, asyncio.run(run())):
        np.testing.assert_allclose(vectors(response), base_reference.embed(batch), atol=1e-5)


def test_base_plus_adapter_serves_the_merged_model(client, merged_reference):
    batch = texts(5, seed=3)
    got = vectors(client.embeddings.create(model="tiny-sfr-lora", input=batch))
    np.testing.assert_allclose(got, merged_reference.embed(batch), atol=1e-5)


def test_models_on_one_base_share_an_embedder_and_each_get_their_own_vectors(
    base_url, api_keys, http, base_reference, merged_reference, merged2_reference
):
    """tiny-sfr and its two adapters run in one Embedder deployment (one base, adapters unmerged).
    Concurrent requests for the three get coalesced into calls that mix their rows; each must
    get its own merged model's vectors, also the second time, from the cache."""
    from ray import serve

    deployments = serve.status().applications["embeddings"].deployments
    assert sorted(d for d in deployments if d.startswith("Embedder")) == [
        "Embedder-all-MiniLM-L6-v2", "Embedder-tiny-sfr", "Embedder-tiny-sfr-vocab"]
    references = {"tiny-sfr": base_reference, "tiny-sfr-lora": merged_reference, "tiny-sfr-lora-b": merged2_reference}
    batch = texts(3, seed=21)  # the same texts for all three: a mixed-up adapter or cache entry shows

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_keys.tester, max_retries=0, timeout=120)
        calls = [(model, client.embeddings.create(model=model, input=batch)) for model in references for _ in range(4)]
        responses = await asyncio.gather(*(call for _, call in calls))
        await client.close()
        return [(model, response) for (model, _), response in zip(calls, responses)]

    for _ in range(2):  # small requests are interactive: the first round fills the cache
        for model, response in asyncio.run(run()):
            np.testing.assert_allclose(vectors(response), references[model].embed(batch), atol=1e-5, err_msg=model)
    # Each model keeps its own limits on the shared deployment.
    assert http.get("/v1/models/tiny-sfr").json()["max_input_tokens"] == TINY_MAX_TOKENS
    assert http.get("/v1/models/tiny-sfr-lora").json()["max_input_tokens"] == 512


def test_local_config_model_matches_sentence_transformers(client):
    from testkit.reference import minilm_reference

    batch = ["A man is eating food.", "A man is riding a horse.", "embeddings for search"]
    got = vectors(client.embeddings.create(model="all-MiniLM-L6-v2", input=batch))
    np.testing.assert_allclose(got, minilm_reference(batch), atol=1e-5)


def test_models_with_different_batch_budgets_coalesce_within_their_own(client, base_reference):
    """all-MiniLM-L6-v2 batches 8192 tokens, the tiny models 512: concurrent requests of both are
    coalesced together, and each Embedder still gets calls within its own budget."""
    from testkit.reference import minilm_reference

    long_texts = [" ".join(WORDS * 6) + f" {i}" for i in range(40)]  # ~100 tokens each
    small = texts(30, seed=9)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key=client.api_key, max_retries=0, timeout=120)
        results = await asyncio.gather(
            aclient.embeddings.create(model="all-MiniLM-L6-v2", input=long_texts),
            aclient.embeddings.create(model="tiny-sfr", input=small),
        )
        await aclient.close()
        return results

    minilm, tiny = asyncio.run(run())
    np.testing.assert_allclose(vectors(minilm), minilm_reference(long_texts), atol=1e-5)
    np.testing.assert_allclose(vectors(tiny), base_reference.embed(small), atol=1e-5)


BAD_REQUESTS = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_request"),
    ({"model": "tiny-sfr"}, 400, "missing_required_parameter"),
    ({"input": "hi"}, 400, "missing_required_parameter"),
    ({"model": "tiny-sfr", "input": ""}, 400, None),
    ({"model": "tiny-sfr", "input": []}, 400, None),
    ({"model": "tiny-sfr", "input": ["ok", ""]}, 400, None),
    ({"model": "tiny-sfr", "input": [1, 2.5]}, 400, None),
    ({"model": "tiny-sfr", "input": [[1, 2], ["a"]]}, 400, None),
    ({"model": "tiny-sfr", "input": [1, 99999]}, 400, "invalid_token_id"),
    ({"model": "tiny-sfr", "input": [[-3]]}, 400, "invalid_token_id"),
    ({"model": "tiny-sfr", "input": ["x"] * 2049}, 400, "too_many_inputs"),
    ({"model": "tiny-sfr-lora", "input": [[7] * 500] * 263}, 400, "too_many_tokens"),
    ({"model": "tiny-sfr", "input": "the quick brown fox " * 40}, 400, "context_length_exceeded"),
    # Large enough to be tokenized on an Ingress thread rather than its event loop (over 8192
    # characters), and by the Tokenizer deployment (over 262144):
    ({"model": "tiny-sfr", "input": ["a sentence with some words"] * 400 + ["the quick brown fox " * 40]},
     400, "context_length_exceeded"),
    ({"model": "tiny-sfr", "input": ["a sentence with some words " * 10] * 1000 + ["the quick brown fox " * 40]},
     400, "context_length_exceeded"),
    ({"model": "tiny-sfr", "input": [[5] * 60] * 300 + [[99999]]}, 400, "invalid_token_id"),
    ({"model": "tiny-sfr", "input": "x", "encoding_format": "int8"}, 400, None),
    ({"model": "tiny-sfr", "input": "x", "dimensions": 0}, 400, None),
    ({"model": "tiny-sfr", "input": "x", "dimensions": 65}, 400, None),
    ({"model": "tiny-sfr", "input": "x", "dimensions": 1.5}, 400, None),
    ({"model": "tiny-sfr", "input": [1, 2], "instruction": "task"}, 400, None),
    ({"model": "tiny-sfr", "input": "x", "bogus": True}, 400, "unknown_parameter"),
    ({"model": "no-such-model", "input": "x"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("body, status, code", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_input_gets_an_openai_error(http, body, status, code):
    response = post_body(http, "/v1/embeddings", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code


def test_oversized_body_is_413(http):
    body = b'{"model": "tiny-sfr", "input": "' + b"a" * MAX_REQUEST_BYTES + b'"}'
    response = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unknown_routes_and_methods_are_openai_shaped(http):
    for response in (http.get("/v1/nothing"), http.get("/v1/embeddings")):
        assert response.status_code in (404, 405) and "error" in response.json()


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny-sfr", input="")


def test_service_is_healthy_and_correct_after_bad_input(http, client, base_reference):
    for body, _, _ in BAD_REQUESTS:
        http.post("/v1/embeddings", content=body if isinstance(body, bytes) else None,
                  json=None if isinstance(body, bytes) else body)
    assert http.get("/health").status_code == 200
    got = vectors(client.embeddings.create(model="tiny-sfr", input=["still correct"]))
    np.testing.assert_allclose(got, base_reference.embed(["still correct"]), atol=1e-5)


def test_api_keys_are_required_on_v1_routes(base_url, api_keys):
    body = {"model": "tiny-sfr", "input": "x"}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {api_keys.tester}"}):
        for response in (httpx.post(f"{base_url}/v1/embeddings", json=body, headers=headers),
                         httpx.get(f"{base_url}/v1/models", headers=headers)):
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and api_keys.tester not in response.text
    assert httpx.get(f"{base_url}/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0).embeddings.create(
            model="tiny-sfr", input="x")


def test_per_key_rate_limit_is_429_with_retry_after(base_url, api_keys, http):
    headers = {"Authorization": f"Bearer {api_keys.limited}"}
    statuses = [httpx.post(f"{base_url}/v1/embeddings", json={"model": "tiny-sfr", "input": "x"}, headers=headers)
                for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert int(statuses[-1].headers["retry-after"]) >= 1
    assert statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
    assert http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": "x"}).status_code == 200  # other keys unaffected


def test_request_id_is_returned(http):
    given = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": "x"}, headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    created = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": "x"})
    assert created.headers.get("x-request-id")


def test_every_metric_the_grafana_dashboard_plots_exists(http, ray_session):
    """After traffic (the tests above), Ray's Prometheus endpoint exports every plotted series."""
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    wanted = {name for expr in exprs for name in re.findall(r"\bray_[a-z_]+", expr)}
    assert len(wanted) >= 10
    # Exported after a first out-of-memory pass only: tests/e2e/test_gpu_faults.py provokes one and checks it.
    wanted.discard("ray_embeddings_out_of_memory_total")
    # Traffic that touches every series: cache misses, then hits, then evictions (an
    # interactive request of more vectors than the session's 256 KiB cache holds).
    for _ in range(2):
        assert http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": "fresh traffic"}).status_code == 200
    flood = [f"cache filler number {k}" for k in range(1200)]
    assert http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": flood, "priority": "interactive"}).status_code == 200
    missing, exported = wanted, set()
    deadline = time.monotonic() + 60  # metrics reach the exporter every few seconds
    while missing and time.monotonic() < deadline:
        text = httpx.get(ray_session.metrics_url, timeout=10).text
        exported |= set(re.findall(r"^(ray_[a-z_]+)", text, flags=re.M))  # a series seen once exists
        missing = wanted - exported
        if missing:
            time.sleep(2)
    assert not missing, f"plotted but not exported: {sorted(missing)}"
    assert 'status="400"' in text and 'model="tiny-sfr"' in text and 'key="tester"' in text
