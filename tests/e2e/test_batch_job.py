"""The batch job (serve_app.batch) on the test session's Ray instance, against the served app.

Every vector is checked against what the running service returns over HTTP for the same text
and settings, and against the independent references of testkit/reference.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from testkit.app import ROOT, SFR_TASK, TINY_MAX_TOKENS, tiny_sfr_model
from testkit.reference import minilm_reference, reference_long_vector

WORDS = "the quick brown fox jumps over lazy dog cat sleeps in warm sun search vectors".split()


def words(rng, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))


def write_jsonl(path, records) -> None:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))


def read_output(output) -> dict[str, tuple[np.ndarray, int]]:
    table = pads.dataset(output / "embeddings", format="parquet").to_table()
    assert table.schema.field("embedding").type.value_type == pa.float32()
    vectors = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {i: (v, t) for i, v, t in zip(ids, vectors, table["tokens"].to_pylist())}


def read_errors(output) -> set[tuple]:
    lines = (output / "errors.jsonl").read_text().splitlines()
    return {(e["id"], os.path.basename(e["path"]), e["line"], e["error"]) for e in map(json.loads, lines)}


def committed(output) -> list:
    """Checkpoint files of write tasks that committed (Ray Data's two-phase commit)."""
    return [p for p in (output / "_checkpoint").glob("*.parquet") if not p.name.endswith(".pending.parquet")]


def served(http, model: str, texts: list[str], **extra) -> np.ndarray:
    """What /v1/embeddings returns for `texts`, in requests of at most 1000 inputs."""
    rows = []
    for start in range(0, len(texts), 1000):
        body = {"model": model, "input": texts[start : start + 1000], "encoding_format": "float", **extra}
        response = http.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        rows += [d["embedding"] for d in response.json()["data"]]
    return np.array(rows, dtype=np.float32)


def job_config(path, model: dict) -> str:
    """A Serve config in the shape of deploy/local.yaml serving one model."""
    config = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["models"] = [model]
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, tiny_family):
    return job_config(tmp_path_factory.mktemp("batch") / "tiny.yaml", tiny_sfr_model(tiny_family))


def test_config_gives_the_spec_and_the_embedder_resources(tiny_config):
    from serve_app.batch.config import load_job_model

    job = load_job_model(ROOT / "deploy/config.yaml", "SFR-Embedding-Mistral")
    assert job.spec.max_input_tokens == 4096 and job.spec.query_instruction
    assert job.actor_options == {"num_gpus": 1, "num_cpus": 4}
    assert load_job_model(tiny_config, "tiny-sfr").actor_options == {"num_cpus": 1}
    with pytest.raises(ValueError, match="not in"):
        load_job_model(tiny_config, "nope")


def test_engine_actors_fit_the_free_resources(monkeypatch):
    import ray

    from serve_app.batch.job import engine_actors

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0, "GPU": 3.0, "fake_gpu": 2.0})
    assert engine_actors({"num_gpus": 1, "num_cpus": 4}, None) == 3  # one per GPU; CPUs are not counted
    assert engine_actors({"num_cpus": 1}, 2) == 1  # 2 cores, 2 torch threads each
    assert engine_actors({"num_cpus": 0.5}, None) == 4
    assert engine_actors({"num_cpus": 1, "resources": {"fake_gpu": 1}}, 1) == 2
    assert engine_actors({"num_gpus": 4}, None) == 1  # none fits now: one, for the autoscaler to place


def test_queries_from_jsonl_and_parquet_equal_the_service(ray_session, http, tiny_config, base_reference, tmp_path):
    """tiny-sfr (last-token pooling on the appended EOS) with the query instruction; bad rows."""
    from serve_app.batch.config import load_job_model
    from serve_app.batch.job import run

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {f"q-{i}": words(rng, 1, 20) for i in range(40)}
    write_jsonl(corpus / "a.jsonl", [
        *({"id": k, "text": v, "other": 1} for k, v in texts.items()),
        {"id": "empty", "text": ""},       # line 41
        {"id": "number", "text": 5},       # 42
        {"text": "who am i"},              # 43
        "{not json\n",                    # 44
        "\n",                             # 45: blank, skipped
        {"id": "long", "text": "search vectors " * TINY_MAX_TOKENS},  # 46
        {"id": ["a"], "text": "x"},        # 47
        {"id": "none", "text": None},      # 48
    ])
    pq.write_table(pa.table({"id": [7, 8, None], "text": ["seven cats sleep", None, "no id"]}), corpus / "b.parquet")
    texts["7"] = "seven cats sleep"

    job = load_job_model(tiny_config, "tiny-sfr")
    summary = run(job, str(corpus), str(tmp_path / "out"), input_type="query", actors=1)

    got = read_output(tmp_path / "out")
    assert sorted(got) == sorted(texts)
    ids = sorted(texts)
    vectors = np.stack([got[i][0] for i in ids])
    queries = [texts[i] for i in ids]
    np.testing.assert_allclose(vectors, served(http, "tiny-sfr", queries, input_type="query"), atol=1e-5)
    np.testing.assert_allclose(vectors, base_reference.embed(queries, SFR_TASK), atol=1e-5)
    assert [got[i][1] for i in ids] == [len(base_reference.token_ids(texts[i], SFR_TASK)) for i in ids]
    assert read_errors(tmp_path / "out") == {
        ("empty", "a.jsonl", 41, "empty_text"), ("number", "a.jsonl", 42, "invalid_text"),
        (None, "a.jsonl", 43, "missing_id"), (None, "a.jsonl", 44, "invalid_json"),
        ("long", "a.jsonl", 46, "context_length_exceeded"), (None, "a.jsonl", 47, "invalid_id"),
        ("none", "a.jsonl", 48, "missing_text"),
        ("8", "b.parquet", 2, "missing_text"), (None, "b.parquet", 3, "missing_id"),
    }
    assert (summary.documents, summary.errors, summary.errors_in_output) == (len(texts), 9, 9)
    assert summary.tokens == sum(got[i][1] for i in ids)


def test_killed_run_of_the_local_config_resumes_to_every_id_exactly_once(ray_session, http, tmp_path):
    """deploy/local.yaml itself (all-MiniLM-L6-v2, mean pooling): a run killed once some output
    is committed, then a rerun on the same output."""
    import ray

    from serve_app.batch.config import load_job_model
    from serve_app.batch.job import run

    rng = np.random.default_rng(2)
    texts = {str(i): words(rng, 1, 12) for i in range(2000)}
    corpus = tmp_path / "docs.jsonl"
    write_jsonl(corpus, [{"doc": int(k), "body": v} for k, v in texts.items()] + [{"doc": -1, "body": ""}])
    output = tmp_path / "out"
    config = str(ROOT / "deploy/local.yaml")
    command = [
        sys.executable, "-m", "serve_app.batch", "--config", config, "--model", "all-MiniLM-L6-v2",
        "--input", str(corpus), "--output", str(output), "--id-field", "doc", "--text-field", "body",
        "--address", ray.get_runtime_context().gcs_address, "--actors", "1",
    ]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not committed(output) and time.monotonic() < deadline:
            assert job.poll() is None, "the job ended before committing anything"
            time.sleep(0.05)
        assert job.poll() is None, "the job finished before it could be killed"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()

    summary = run(load_job_model(config, "all-MiniLM-L6-v2"), str(corpus), str(output),
                  id_field="doc", text_field="body", actors=1)
    assert summary.documents < len(texts)  # the killed run's committed work was skipped

    got = read_output(output)
    assert sorted(got) == sorted(texts)
    ids = sorted(texts)
    vectors = np.stack([got[i][0] for i in ids])
    np.testing.assert_allclose(vectors, minilm_reference([texts[i] for i in ids]), atol=1e-5)
    sample = ids[:: len(ids) // 100]
    service = served(http, "all-MiniLM-L6-v2", [texts[i] for i in sample])
    np.testing.assert_allclose(np.stack([got[i][0] for i in sample]), service, atol=1e-5)
    assert read_errors(output) == {("-1", "docs.jsonl", 2001, "empty_text")}


def test_long_documents_are_embedded_in_windows_as_the_service_does(ray_session, http, tiny_family, base_reference,
                                                                    tmp_path):
    """long_input: chunk: an over-long document becomes the service's window mean, with usage's tokens."""
    from serve_app.batch.config import load_job_model
    from serve_app.batch.job import run

    model = {"name": "tiny-sfr-chunk", "source": str(tiny_family["base"]), "max_input_tokens": TINY_MAX_TOKENS,
             "long_input": "chunk"}
    rng = np.random.default_rng(3)
    texts = {f"d-{i}": words(rng, 1, 8) * int(rng.integers(1, 12)) for i in range(30)}
    corpus = tmp_path / "long.jsonl"
    write_jsonl(corpus, [{"id": k, "text": v} for k, v in texts.items()])
    job = load_job_model(job_config(tmp_path / "chunk.yaml", model), "tiny-sfr-chunk")
    run(job, str(corpus), str(tmp_path / "out"), actors=1)

    got = read_output(tmp_path / "out")
    ids = sorted(texts)
    documents = [texts[i] for i in ids]
    np.testing.assert_allclose(np.stack([got[i][0] for i in ids]), served(http, "tiny-sfr-chunk", documents), atol=1e-5)
    expected = [reference_long_vector(base_reference, texts[i], TINY_MAX_TOKENS) for i in ids]  # independent
    np.testing.assert_allclose(np.stack([got[i][0] for i in ids]), np.stack([v for v, _ in expected]), atol=1e-5)
    assert [got[i][1] for i in ids] == [tokens for _, tokens in expected]
    for i in ids[:5]:  # per document: the service's usage counts every window's tokens
        usage = http.post("/v1/embeddings", json={"model": "tiny-sfr-chunk", "input": texts[i]}).json()["usage"]
        assert got[i][1] == usage["prompt_tokens"]
    assert max(got[i][1] for i in ids) > TINY_MAX_TOKENS  # some documents really were windowed
