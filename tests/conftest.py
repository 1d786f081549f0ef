import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.reference import SFRReference  # noqa: E402
from tests.tiny_models import build_family  # noqa: E402

TINY_MAX_TOKENS = 64
SFR_TASK = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("tiny-sfr"))


@pytest.fixture(scope="session")
def base_reference(tiny_family):
    return SFRReference(tiny_family["base"], TINY_MAX_TOKENS)


@pytest.fixture(scope="session")
def merged_reference(tiny_family):
    return SFRReference(tiny_family["merged"], TINY_MAX_TOKENS)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (2 cores: logical CPUs, fractional replicas)."""
    import ray
    from ray import serve

    metrics_port = free_port()
    ray.init(
        address="local",
        _metrics_export_port=metrics_port,  # Prometheus endpoint, checked by the metrics test  # always a fresh instance of our own, never a cluster found on the machine
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    serve.shutdown()
    ray.shutdown()
