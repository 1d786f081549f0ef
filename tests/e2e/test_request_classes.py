"""End to end: request classes and the vector cache on the served app, against the references."""

import base64
import re
import threading
import time

import httpx
import numpy as np

from testkit.app import SFR_TASK

WORDS = "the quick brown fox jumps over lazy dog cat sleeps in warm sun search vectors".split()


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 20)))) + f" {seed}-{i}" for i in range(n)]


def embed(http, **body) -> tuple[np.ndarray, httpx.Response]:
    response = http.post("/v1/embeddings", json={"model": "tiny-sfr", "encoding_format": "base64"} | body)
    assert response.status_code == 200, response.text
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in response.json()["data"]]
    return np.stack(rows), response


def test_queries_under_bulk_load_get_their_own_vectors(http, base_reference):
    """Batch requests keep several batches queued at the Embedder while queries go past them."""
    stop, failures, bulk_checked = threading.Event(), [], []

    def index(seed):
        with httpx.Client(base_url=str(http.base_url), timeout=120, headers=http.headers) as client:
            k = 0
            while not stop.is_set() and k < 20:
                batch = texts(120, seed=1000 * seed + k)
                try:
                    got, response = embed(client, input=batch, priority="batch")
                    assert response.headers["x-request-class"] == "batch"
                    np.testing.assert_allclose(got, base_reference.embed(batch), atol=1e-5)
                    bulk_checked.append(len(batch))
                except Exception as exc:  # noqa: BLE001 — reported by the main thread
                    failures.append(exc)
                k += 1

    indexers = [threading.Thread(target=index, args=(seed,)) for seed in range(3)]
    for thread in indexers:
        thread.start()
    try:
        time.sleep(1.0)  # let batch work pile up
        for k in range(12):
            query = texts(1, seed=50 + k)
            got, response = embed(http, input=query, input_type="query")
            assert response.headers["x-request-class"] == "interactive"
            np.testing.assert_allclose(got, base_reference.embed(query, SFR_TASK), atol=1e-5)
            plain = texts(1, seed=80 + k)
            got, response = embed(http, input=plain[0])
            assert response.headers["x-request-class"] == "interactive"
            np.testing.assert_allclose(got, base_reference.embed(plain), atol=1e-5)
    finally:
        stop.set()
        for thread in indexers:
            thread.join()
    assert not failures, failures[0]
    assert bulk_checked  # batch work completed meanwhile, and correctly


def test_the_service_tells_each_request_its_class(http, base_url, api_keys):
    def request_class(client, **body):
        return embed(client, **body)[1].headers["x-request-class"]

    assert request_class(http, input="one short text") == "interactive"
    assert request_class(http, input=texts(64, seed=7)) == "batch"
    assert request_class(http, input=texts(64, seed=7), priority="interactive") == "interactive"
    assert request_class(http, input=texts(64, seed=7), input_type="query") == "interactive"
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {api_keys.indexer}"}) as indexer:
        assert request_class(indexer, input="one short text") == "batch"  # the key's default
        assert request_class(indexer, input="one short text", priority="interactive") == "interactive"
    refused = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": "x", "priority": "urgent"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"


def counter(metrics_url: str, name: str, model: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    pattern = rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))


def test_a_cached_vector_equals_the_fresh_one_bit_for_bit(http, base_reference, ray_session):
    text = "a query that nobody has sent before, about sleeping cats"
    fresh, _ = embed(http, input=[text, "filler so that the first call is a real batch"])
    hits_before = counter(ray_session.metrics_url, "ray_embeddings_cache_hits_total", "tiny-sfr")
    cached, _ = embed(http, input=text)
    assert cached[0].tobytes() == fresh[0].tobytes()
    np.testing.assert_allclose(cached[0], base_reference.embed([text])[0], atol=1e-5)
    # dimensions and the encoding apply after the cache
    cut, _ = embed(http, input=text, dimensions=16)
    expected = base_reference.embed([text])[0][:16]
    np.testing.assert_allclose(cut[0], expected / np.linalg.norm(expected), atol=1e-5)
    as_float = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": text}).json()
    assert np.array(as_float["data"][0]["embedding"], dtype=np.float32).tobytes() == fresh[0].tobytes()
    deadline = time.monotonic() + 60  # metrics reach the exporter every few seconds
    while counter(ray_session.metrics_url, "ray_embeddings_cache_hits_total", "tiny-sfr") < hits_before + 3:
        assert time.monotonic() < deadline, "the three repeats were not counted as cache hits"
        time.sleep(2)
