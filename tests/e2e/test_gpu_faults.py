"""Device faults, provoked on CPU by fault injection (serve_app/engine/faults.py).

Engine level: a pass that runs out of memory is rerun in halves; a row that fits nowhere fails
alone; a warm-up that does not fit names the settings to lower; a poisoned device fails its
probe. Service level (a small app of its own, two Embedder replicas, deleted at the end), over
HTTP: an input that does not fit gets a 503 with Retry-After while the requests beside it get
reference vectors, and a replica whose device is poisoned is replaced while every request is
retried and answered.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.errors import RowsOutOfMemory
from serve_app.engine.faults import (
    OOM_ABOVE_TOKENS,
    POISON_TRIGGER,
    POISONED_MESSAGE,
    FaultInjection,
)
from serve_app.engine.scheduling import RequestClass
from serve_app.engine.spec import ModelSpec, Tuning
from serve_app.engine.tokenization import load_input_tokenizer
from testkit.app import TINY_MAX_TOKENS
from tests.common import spec_for

SHORT = ["how do cats sleep", "x", "embeddings turn text into vectors", "the lazy dog", "search", "warm sun"]
# Tokenizes to more than FITS_TOKENS tokens, within TINY_MAX_TOKENS.
LONG = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 3
FITS_TOKENS = 40  # injected: passes of more padded tokens run out of memory


def fault_spec(path) -> ModelSpec:
    return spec_for(path, name="tiny-sfr", max_batch_tokens=512, tuning=Tuning(cpu_threads=1))


@pytest.fixture(scope="module")
def engine(tiny_family):
    spec = fault_spec(tiny_family["base"])
    return load_input_tokenizer(spec), EmbeddingEngine.load(spec)


def test_a_pass_out_of_memory_is_rerun_in_halves_and_a_row_that_never_fits_fails_alone(engine, base_reference):
    tokenizer, engine = engine
    texts = SHORT + [LONG]
    ids = tokenizer.tokenize_texts(texts, truncate=True)
    assert max(map(len, ids[:-1])) <= FITS_TOKENS < len(ids[-1])
    engine.faults = FaultInjection(oom_above_tokens=FITS_TOKENS)
    try:
        done = engine.embed_counted(ids)
        with pytest.raises(RowsOutOfMemory) as raised:
            engine.embed(ids)
    finally:
        engine.faults = FaultInjection()
    assert done.unfit_rows == (len(texts) - 1,) and raised.value.rows == [len(texts) - 1]
    assert np.isnan(done.vectors[-1]).all()
    # The pass holding the long row, then that row alone.
    assert done.out_of_memory_events >= 2
    np.testing.assert_allclose(done.vectors[:-1], base_reference.embed(SHORT), atol=1e-5)
    # The engine is fine afterwards: the long row fits once the memory is back.
    np.testing.assert_allclose(engine.embed(ids[-1:]), base_reference.embed([LONG]), atol=1e-5)


def test_warm_up_runs_the_largest_pass_and_names_the_setting_to_lower_when_it_does_not_fit(engine, monkeypatch):
    _, engine = engine
    shapes = []
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda batch, rows: shapes.append((len(rows), batch.width)) or forward(batch, rows))
    engine.warm_up()
    # One pass per lane, each 512 padded tokens (the CPU pass size) of TINY_MAX_TOKENS-token rows.
    assert shapes == [(512 // TINY_MAX_TOKENS, TINY_MAX_TOKENS)] * engine.lanes
    engine.faults = FaultInjection(oom_at_warmup=True)
    try:
        with pytest.raises(RuntimeError, match="lower max_batch_tokens \\(or max_input_tokens\\)") as raised:
            engine.warm_up()
    finally:
        engine.faults = FaultInjection()
    assert f"8 rows of {TINY_MAX_TOKENS} tokens" in str(raised.value)
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)


def test_a_failed_pass_cancels_the_calls_queued_passes(engine, monkeypatch):
    tokenizer, engine = engine
    ids = tokenizer.tokenize_texts(SHORT * 100, truncate=True)
    passes = len(engine._plan([len(i) for i in ids]))
    assert passes > engine.lanes + 1
    ran, release = [], threading.Event()

    def failing(batch, rows):
        ran.append(len(rows))
        if len(ran) > 1:  # a lane took another pass before the call cancelled the rest: hold it
            release.wait(30)
        raise RuntimeError(POISONED_MESSAGE)

    monkeypatch.setattr(engine, "_forward", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.embed(ids)
    release.set()
    # Within a class, passes run in order: once this one ran, no pass of the call is left.
    engine._scheduler.submit(RequestClass.BATCH, lambda: None).result()
    assert len(ran) <= engine.lanes + 1  # the failed pass, and at most one more per lane


def test_a_poisoned_device_fails_every_pass_and_the_probe(engine, tmp_path):
    tokenizer, engine = engine
    trigger = tmp_path / "poison"
    engine.faults = FaultInjection(poison_trigger=str(trigger))
    try:
        engine.check_device()  # no trigger yet: healthy
        trigger.touch()
        ids = tokenizer.tokenize_texts(SHORT, truncate=True)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="illegal memory access"):
                engine.embed(ids)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            engine.check_device()
        assert not trigger.exists()  # claimed: no other replica takes it
    finally:
        engine.faults = FaultInjection()


def test_fault_injection_is_off_without_its_variables():
    assert not FaultInjection.from_environment({}).active
    assert FaultInjection.from_environment({OOM_ABOVE_TOKENS: "40"}).oom_above_tokens == 40


def test_rows_out_of_memory_fail_only_their_own_part_of_a_batch():
    from serve_app.engine.parts import per_part

    vectors = np.arange(10, dtype=np.float32).reshape(5, 2)
    parts = [[[1], [2]], [[3], [4], [5]]]  # two parts in one Embedder batch: rows 0-1 and 2-4
    split = per_part(vectors, parts, (3,))
    np.testing.assert_array_equal(split[0], vectors[:2])
    assert isinstance(split[1], RowsOutOfMemory) and split[1].rows == [1]
    np.testing.assert_array_equal(split[1].vectors, vectors[2:])


# ---- the service, over HTTP ---------------------------------------------------------------------

APP = "gpu-faults"
ROUTE = "/gpu-faults"


def embedder_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#Embedder#")}


@pytest.fixture(scope="module")
def fault_app(ray_session, tiny_family, tmp_path_factory, monkeypatch_module):
    """tiny-sfr on two Embedder replicas whose engines inject faults: passes over FITS_TOKENS
    padded tokens run out of memory, and the trigger file poisons one replica's device."""
    from ray import serve

    from serve_app.deployments import app as app_module

    trigger = tmp_path_factory.mktemp("faults") / "poison"
    env = {OOM_ABOVE_TOKENS: str(FITS_TOKENS), POISON_TRIGGER: str(trigger)}
    monkeypatch_module.setattr(app_module, "Embedder", app_module.Embedder.options(
        num_replicas=2, health_check_period_s=1, ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": env}},
    ))
    serve.run(app_module.build_app({"models": [fault_spec(tiny_family["base"]).model_dump(exclude_none=True)],
                                    "auth": {"enabled": False},
                                    "cache": {"max_bytes": 0}}),  # every request reaches an Embedder
              name=APP, route_prefix=ROUTE)
    with httpx.Client(base_url=ray_session.url + ROUTE, timeout=60) as http:
        yield http, trigger
    serve.delete(APP)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def post(http, texts):
    return http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": texts})


def concurrently(http, requests: list[list[str]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda texts: post(http, texts), requests))


def test_an_input_that_does_not_fit_fails_alone_with_503(fault_app, base_reference, ray_session):
    http, _ = fault_app
    requests = [[LONG]] + [SHORT[k : k + 2] for k in range(0, len(SHORT), 2)] + [SHORT]
    responses = concurrently(http, requests)
    assert responses[0].status_code == 503, responses[0].text
    assert responses[0].headers["retry-after"] == "1"
    error = responses[0].json()["error"]
    assert error["code"] == "device_out_of_memory" and error["type"] == "server_error" and error["param"] == "input"
    for texts, response in zip(requests[1:], responses[1:]):
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, base_reference.embed(texts), atol=1e-5)
    # Served on: the replicas are the same, and short requests still get their vectors.
    replicas = embedder_replicas()
    assert post(http, SHORT[:1]).status_code == 200 and embedder_replicas() == replicas
    # The out-of-memory passes were counted (Ray exports metrics every few seconds).
    deadline = time.monotonic() + 30
    while "ray_embeddings_out_of_memory_total{" not in httpx.get(ray_session.metrics_url, timeout=10).text:
        assert time.monotonic() < deadline, "ray_embeddings_out_of_memory_total was never exported"
        time.sleep(1)


def test_a_poisoned_replica_is_replaced_and_every_request_is_answered(fault_app, base_reference):
    http, trigger = fault_app
    before = embedder_replicas()
    assert len(before) == 2
    trigger.touch()
    requests = [SHORT[k : k + 2] for k in range(0, len(SHORT), 2)] * 2
    responses = concurrently(http, requests)
    assert not trigger.exists(), "no pass claimed the poison"
    for texts, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, base_reference.embed(texts), atol=1e-5)
    deadline = time.monotonic() + 90
    while True:  # Serve starts a replacement for the replica that left
        after = embedder_replicas()
        if len(after) == 2 and len(after & before) == 1:
            break
        assert time.monotonic() < deadline, f"replicas before {before}, now {after}"
        time.sleep(1)
    assert post(http, SHORT).status_code == 200
