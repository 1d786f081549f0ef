"""bench.capacity's logic without a server: the service it configures, its request streams and
its sizing arithmetic."""

from types import SimpleNamespace

import pytest

from bench import capacity
from serve_app.engine.simulated_gpu import PRESETS


def test_the_service_keeps_productions_model_settings_and_keys_over_the_simulated_gpu(tmp_path):
    setup = SimpleNamespace(model_dir=tmp_path / "m", keys_file=tmp_path / "keys")
    configs = {path: capacity.service_config(setup, tmp_path / "stats", "fp8", path) for path in capacity.PATHS}
    for config in configs.values():
        app = config["applications"][0]
        (model,) = app["args"]["models"]
        assert model["name"] == capacity.MODEL and model["source"] == str(tmp_path / "m")
        assert app["args"]["auth"] == {"keys_file": str(tmp_path / "keys")}
        assert app["runtime_env"]["env_vars"]["EMBEDDINGS_SIMULATED_GPU"] == f"fp8,stats_dir={tmp_path / 'stats'}"
    assert "controller_options" not in configs["proxy"]
    switches = lambda c: c["controller_options"]["runtime_env"]["env_vars"]  # noqa: E731
    assert switches(configs["direct"])["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in configs["direct"]["applications"][0]["runtime_env"]["env_vars"]
    assert switches(configs["haproxy"]) == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    env = configs["haproxy"]["applications"][0]["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # The A/B path: HAProxy's, with bulk text tokenized at the Tokenizer deployment.
    old_split = configs["haproxy-tokenizer"]["applications"][0]["runtime_env"]["env_vars"]
    assert old_split == env | {"EMBEDDINGS_THREAD_TOKENIZE_MAX_CHARS": "0"}
    assert switches(configs["haproxy-tokenizer"]) == switches(configs["haproxy"])


def test_the_minilm_yardstick_serves_local_models_on_the_cpus_or_its_vectors_over_the_simulated_gpu(tmp_path):
    apps = {}
    for simulated in (False, True):
        setup = SimpleNamespace(model_dir=None, keys_file=tmp_path / "keys", simulated=simulated)
        apps[simulated] = capacity.service_config(setup, tmp_path / "stats", "bf16", "haproxy")["applications"][0]
    for app in apps.values():
        (model,) = app["args"]["models"]
        assert model["name"] == capacity.MINILM and model["source"].startswith("package:")
        assert app["args"]["auth"] == {"keys_file": str(tmp_path / "keys")}
    assert "EMBEDDINGS_SIMULATED_GPU" not in apps[False]["runtime_env"]["env_vars"]
    gpu = apps[True]["runtime_env"]["env_vars"]["EMBEDDINGS_SIMULATED_GPU"]
    assert gpu == f"{capacity.MINILM_GPU},stats_dir={tmp_path / 'stats'}" and "dimensions=384" in gpu


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
             "cpu": {"wall_s": 2.0, "cores_by_role": {"Serve proxy": 0.25, "HAProxy": 0.25, "Ingress": 0.5, "Tokenizer": 0.25,
                                                      "Embedder-SFR-Embedding-Mistral": 0.25, "Ray daemons": 1.0}}}
    sizing = capacity.sizing(phase, max_batch_tokens=16384)
    assert sizing["cpu_ms_per_request"] == pytest.approx(
        {"Serve proxy": 5.0, "HAProxy": 5.0, "Ingress": 10.0, "Tokenizer": 5.0, "Embedder": 5.0})
    assert sizing["front_cpu_ms"] == pytest.approx(25.0) and sizing["total_cpu_ms"] == pytest.approx(30.0)
    for name, gpu in PRESETS.items():
        seconds = 1000 / gpu.tokens_per_s + gpu.pass_ms / 1000 * 1000 / 16384
        assert sizing[name]["gpu_requests_per_s"] == pytest.approx(1 / seconds)
        assert sizing[name]["cores_per_gpu"] == pytest.approx(0.9 / seconds * 0.030)
    assert sizing["fp8"]["cores_per_gpu"] > sizing["bf16"]["cores_per_gpu"]


def test_the_net_front_cost_leaves_out_what_the_front_uses_while_idle():
    # 10 requests over 2 s; the HAProxy manager ("Serve proxy") uses 0.05 cores idle and under load alike.
    phase = {"ok": 10, "cpu": {"wall_s": 2.0, "cores_by_role": {"Serve proxy": 0.05, "HAProxy": 0.05, "Ingress": 0.5,
                                                                 "Embedder-x": 1.0}}}
    idle = {"Serve proxy": 0.05, "Ingress": 0.1, "Embedder": 0.5}
    # Gross: 10 + 10 + 100 ms per request; net: 0 + 10 + 80 (the Embedder is not the front).
    assert capacity.net_front_ms(phase, idle) == pytest.approx(90.0)
