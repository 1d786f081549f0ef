"""bench.capacity's logic without a server: the service it configures, its request streams and
its sizing arithmetic."""

import pytest

from bench import capacity
from serve_app.engine.simulated_gpu import PRESETS


def test_the_service_keeps_productions_model_settings_and_keys_over_the_simulated_gpu(tmp_path):
    proxy = capacity.service_config(tmp_path / "m", tmp_path / "keys", tmp_path / "stats", "fp8", direct_ingress=False)
    direct = capacity.service_config(tmp_path / "m", tmp_path / "keys", tmp_path / "stats", "fp8", direct_ingress=True)
    app = proxy["applications"][0]
    (model,) = app["args"]["models"]
    assert model["name"] == capacity.MODEL and model["source"] == str(tmp_path / "m")
    assert app["args"]["auth"] == {"keys_file": str(tmp_path / "keys")}
    assert app["runtime_env"]["env_vars"]["EMBEDDINGS_SIMULATED_GPU"] == f"fp8,stats_dir={tmp_path / 'stats'}"
    assert "controller_options" not in proxy and "controller_options" in direct


def test_queries_are_sent_as_queries_and_documents_as_documents():
    streams = capacity.workloads(doc_words=10)
    assert streams["search"](0).body == {"input_type": "query"}
    assert not hasattr(streams["bulk"](0), "body") and len(streams["bulk"](0).texts) == 64
    batched = streams["search-x16"](2)
    assert len(batched.texts) == 16 and len(set(batched.texts)) == 16
    assert not set(batched.texts) & {streams["search"](i).texts[0] for i in range(64)}  # no cache hits
    tags = {streams["mixed"](i).tag for i in range(40)}
    assert tags == {"search", "bulk"}
    assert all(getattr(r, "body", None) == {"input_type": "query"} for r in map(streams["mixed"], range(40))
               if r.tag == "search")


def test_cores_per_gpu_is_the_cpu_per_request_at_90_percent_of_the_gpus_request_rate():
    # 100 requests of 1000 padded tokens each; 2 s of wall time; CPU by role in cores.
    phase = {"ok": 100, "gpu": {"padded_tokens": 100_000},
             "cpu": {"wall_s": 2.0, "cores_by_role": {"Serve proxy": 0.5, "Ingress": 0.5, "Tokenizer": 0.25,
                                                      "Embedder-SFR-Embedding-Mistral": 0.25, "Ray daemons": 1.0}}}
    sizing = capacity.sizing(phase, max_batch_tokens=16384)
    assert sizing["cpu_ms_per_request"] == pytest.approx(
        {"Serve proxy": 10.0, "Ingress": 10.0, "Tokenizer": 5.0, "Embedder": 5.0})
    assert sizing["front_cpu_ms"] == pytest.approx(25.0) and sizing["total_cpu_ms"] == pytest.approx(30.0)
    for name, gpu in PRESETS.items():
        seconds = 1000 / gpu.tokens_per_s + gpu.pass_ms / 1000 * 1000 / 16384
        assert sizing[name]["gpu_requests_per_s"] == pytest.approx(1 / seconds)
        assert sizing[name]["cores_per_gpu"] == pytest.approx(0.9 / seconds * 0.030)
    assert sizing["fp8"]["cores_per_gpu"] > sizing["bf16"]["cores_per_gpu"]
