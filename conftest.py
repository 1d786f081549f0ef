import ipaddress
import os
import socket
from types import SimpleNamespace

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from testkit.app import (  # noqa: E402
    MAX_REQUEST_BYTES,
    MAX_REQUEST_TOKENS,
    METERED_TOKENS_PER_MINUTE,
    SFR_TASK,
    TINY_MAX_TOKENS,
    free_port,
    local_config_model,
    tiny_sfr_model,
    tiny_sfr_vocab_model,
)
from testkit.reference import SFRReference  # noqa: E402
from testkit.tiny_models import build_family, build_sfr_vocab_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("tiny-sfr"))


@pytest.fixture(scope="session")
def sfr_vocab_model(tmp_path_factory):
    """A tiny Mistral over SFR's real vocabulary, with SFR-shaped tokenizer files."""
    return build_sfr_vocab_model(tmp_path_factory.mktemp("tiny-sfr-vocab"))


@pytest.fixture(scope="session")
def sfr_vocab_reference(sfr_vocab_model):
    return SFRReference(sfr_vocab_model, TINY_MAX_TOKENS)


@pytest.fixture(scope="session")
def base_reference(tiny_family):
    return SFRReference(tiny_family["base"], TINY_MAX_TOKENS)


@pytest.fixture(scope="session")
def merged_reference(tiny_family):
    return SFRReference(tiny_family["merged"], TINY_MAX_TOKENS)


@pytest.fixture(scope="session")
def merged2_reference(tiny_family):
    return SFRReference(tiny_family["merged2"], TINY_MAX_TOKENS)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (2 cores: logical CPUs, fractional replicas),
    with deploy/config.yaml's front: HAProxy on the session's port, forwarding to the Ingress
    replica, which serves HTTP itself on a port of its own range."""
    import ray
    from ray import serve

    from testkit.harness import PRODUCTION_CONFIG, haproxy_ports, read_config

    front = read_config(PRODUCTION_CONFIG)["controller_options"]["runtime_env"]["env_vars"]
    port = free_port()
    metrics_port = next(p for p in iter(free_port, None) if p != port)
    # The Ingress's port range: not 30000-30999, which a `make serve` beside the suite holds.
    first = next(p for p in iter(free_port, None) if not {port, metrics_port} & set(range(p, p + 50)))
    ingress_ports = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
                     "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first + 50),
                     **haproxy_ports(port, metrics_port, *range(first, first + 50))}
    ray.init(
        address="local",
        _metrics_export_port=metrics_port,  # Prometheus endpoint, checked by the metrics test
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            # Far below the shipped 1 MiB, so the suite's bigger requests take the Ingress's
            # actor-call path to the Embedder and its small ones the gRPC path: both are checked.
            "EMBEDDINGS_BY_VALUE_MAX_BYTES": "16384",
            **front,  # the replicas' switches; the controller's below (it starts HAProxy)
        }},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                controller_options={"runtime_env": {"env_vars": {**front, **ingress_ports}}})
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory) -> SimpleNamespace:
    """Real keys, stored hashed in a keys file: `tester` unlimited, `limited` at 3 requests/min,
    `indexer` whose requests default to the batch class, `metered` at METERED_TOKENS_PER_MINUTE."""
    from serve_app.api.auth import generate_key, hash_key

    names = ("tester", "limited", "indexer", "metered")
    keys = SimpleNamespace(**{name: generate_key() for name in names})
    keys.file = tmp_path_factory.mktemp("auth") / "api_keys"
    keys.file.write_text("".join(f"{name}:{hash_key(getattr(keys, name))}\n" for name in names))
    return keys


@pytest.fixture(scope="session")
def base_url(ray_session, tiny_family, sfr_vocab_model, api_keys):
    """The test app, served once per session: tiny SFR-like models plus deploy/local.yaml's model."""
    from ray import serve

    from serve_app.deployments.app import build_app

    args = {
        "models": [
            tiny_sfr_model(tiny_family),
            # Two adapters of tiny-sfr's base: they, tiny-sfr and tiny-sfr-chunk share one Embedder deployment (one base,
            # adapters unmerged), so they share its settings too.
            {
                "name": "tiny-sfr-lora",
                "source": str(tiny_family["base"]),
                "adapter": str(tiny_family["adapter"]),
                "max_input_tokens": 512,
                "max_batch_tokens": 512,
                "tuning": {"cpu_threads": 2},
            },
            {
                "name": "tiny-sfr-lora-b",
                "source": str(tiny_family["base"]),
                "adapter": str(tiny_family["adapter2"]),
                "max_input_tokens": TINY_MAX_TOKENS,
                "max_batch_tokens": 512,
                "tuning": {"cpu_threads": 2},
            },
            local_config_model(),
            {  # long inputs embedded in windows (tests/e2e/test_long_inputs.py); also on tiny-sfr's base
                "name": "tiny-sfr-chunk",
                "source": str(tiny_family["base"]),
                "max_input_tokens": TINY_MAX_TOKENS,
                "long_input": "chunk",
                "query_instruction": SFR_TASK,
                "max_batch_tokens": 512,
                "tuning": {"cpu_threads": 2},
            },
            tiny_sfr_vocab_model(sfr_vocab_model),
        ],
        "limits": {"max_request_bytes": MAX_REQUEST_BYTES, "max_tokens_per_request": MAX_REQUEST_TOKENS},
        "cache": {"max_bytes": 256 * 1024},  # small, so the suite's traffic also evicts
        "auth": {"keys_file": str(api_keys.file)},
        "rate_limits": {"per_key": {
            "limited": {"requests_per_minute": 3}, "indexer": {"priority": "batch"},
            "metered": {"tokens_per_minute": METERED_TOKENS_PER_MINUTE},
        }},
    }
    serve.run(build_app(args), name="embeddings", route_prefix="/")
    yield ray_session.url
    serve.delete("embeddings")


@pytest.fixture(scope="module")
def http(base_url, api_keys):
    """A client of the test app with the unlimited key."""
    with httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {api_keys.tester}"}) as c:
        yield c


@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection past loopback fails the test: tests stay offline (clients that would
    download a file, such as tiktoken's BPE or LlamaIndex's NLTK data, are caught here)."""
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise OSError(f"a test tried to reach {address}: tests stay offline")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
