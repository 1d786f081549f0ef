"""The container: deploy/Dockerfile agrees with the manifests and the lock, and its command
(`python -m serve_app.serve_main CONFIG`) stops cleanly on SIGTERM, as `docker stop` and
Kubernetes send it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from testkit.app import ROOT, free_port, local_config_model
from testkit.harness import haproxy_ports, with_production_front

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
LOCK = ROOT / "constraints.txt"
IMAGE_TAG = re.compile(r"ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-gpu$")


def locked_version(package: str) -> str:
    for line in LOCK.read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"constraints.txt does not lock {package}")


def pyproject_ray() -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = {d.split("==", 1)[1] for d in deps if re.match(r"ray(\[[^]]*\])?==", d)}
    return pin


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_manifests_and_pyproject_agree_on_ray_and_python():
    ray_version = pyproject_ray()
    assert locked_version("ray") == ray_version
    (base,) = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-gpu", base.strip())
    assert match, f"deploy/Dockerfile starts from {base}, not Ray's GPU image"
    assert match["ray"] == ray_version
    python = match["py"]
    # The lock was resolved on the Python the image runs, within what pyproject.toml admits.
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=") and tuple(map(int, requires[2:].split("."))) <= (3, int(python[1:]))
    (locked_on,) = re.findall(r"^# Resolved on Python (\d+)\.(\d+)$", LOCK.read_text(), re.M)
    assert "".join(locked_on) == python, "constraints.txt was resolved on another Python than the image's"

    service = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert service["rayVersion"] == ray_version
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]
    images = [cluster["image"]] + [
        c["image"]
        for pod in [service["headGroupSpec"], *service["workerGroupSpecs"]]
        for c in pod["template"]["spec"]["containers"]
    ]
    for image in images:
        tag = IMAGE_TAG.search(image.split(":")[-1])
        assert tag, f"{image}: its tag does not name the Ray and Python versions (…-ray<version>-py<python>-gpu)"
        assert (tag["ray"], tag["py"]) == (ray_version, python), f"{image} is not the image deploy/Dockerfile builds"
    assert len(set(images)) == 1, f"the manifests name different images: {sorted(set(images))}"


def test_dockerfile_installs_from_the_lock_and_stops_cleanly():
    instructions = dockerfile_instructions()
    copied = " ".join(arg for op, arg in instructions if op == "COPY")
    assert "constraints.txt" in copied
    installs = [arg for op, arg in instructions if op == "RUN" and "pip install" in arg]
    assert installs and all("-c constraints.txt" in arg for arg in installs), installs
    (command,) = [arg for op, arg in instructions if op == "CMD"]
    assert command.strip().startswith('["python", "-m", "serve_app.serve_main"')


# --- SIGTERM under load ----------------------------------------------------------------------


def drain_config(path: Path, port: int, front: str = "proxy") -> Path:
    """A small config like deploy/local.yaml's, on a port of its own behind Serve's proxy or (front
    "haproxy") behind deploy/config.yaml's front, HAProxy before direct-ingress replicas."""
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "embeddings",
            "route_prefix": "/",
            "import_path": "serve_app.deployments.app:build_app",
            "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
            "args": {"models": [local_config_model() | {"tuning": {"cpu_threads": 1}}], "auth": {"enabled": False}},
            "deployments": [
                {"name": "Ingress", "ray_actor_options": {"num_cpus": 0}},
                {"name": "Tokenizer", "ray_actor_options": {"num_cpus": 0}},
                {"name": "Embedder", "ray_actor_options": {"num_cpus": 0}, "graceful_shutdown_timeout_s": 30},
            ],
        }],
    }  # fmt: skip
    if front == "haproxy":
        config = with_production_front(config)
        config["controller_options"]["runtime_env"]["env_vars"].update(
            haproxy_ports(port)  # not the session's
            # HAProxy's manager polls HAProxy every 10 s; polling often makes a poll after HAProxy's
            # exit (a traceback, once in CI) certain rather than a matter of timing
            | {"RAY_SERVE_HAPROXY_METRICS_REPORT_INTERVAL_S": "0.3"}
        )
    path.write_text(yaml.safe_dump(config))
    return path


class Load:
    """Clients that each send one request after another, a new connection each (so a closed
    listener shows as 'connection refused', never as a reused connection closed under us)."""

    def __init__(self, url: str, clients: int):
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[tuple[float, float, str]] = []  # (sent, answered, outcome)
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self):
        body = {"model": "all-MiniLM-L6-v2", "input": [f"a sentence to embed, number {i}" for i in range(64)]}
        with httpx.Client(timeout=60, headers={"Connection": "close"}) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(self.url, json=body)
                    outcome = str(response.status_code)
                    if response.status_code == 200:
                        assert len(response.json()["data"]) == 64
                except httpx.ConnectError:
                    outcome = "refused"
                    time.sleep(0.05)
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.outcomes.append((sent, time.monotonic(), outcome))

    def ok_count(self) -> int:
        with self.lock:
            return sum(1 for *_, o in self.outcomes if o == "200")


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve_main exited before serving"
        try:
            if httpx.post(url, json={"model": "all-MiniLM-L6-v2", "input": "ready?"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not serving within {timeout} s")


@pytest.mark.parametrize("front", ["proxy", "haproxy"])
def test_sigterm_drains_requests_in_flight_and_exits_0(tmp_path, front):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own Ray, not the session's
    log = (tmp_path / "serve_main.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "serve_app.serve_main", str(drain_config(tmp_path / "config.yaml", port, front))],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    load = Load(url, clients=4)
    try:
        wait_until_serving(url, process, timeout=120)
        for thread in load.threads:
            thread.start()
        deadline = time.monotonic() + 30
        while load.ok_count() < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=90)
    finally:
        load.stop.set()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for thread in load.threads:
            thread.join(timeout=70)
        log.close()
    output = (tmp_path / "serve_main.log").read_text()
    outcomes = load.outcomes
    failed = [o for _, _, o in outcomes if o not in ("200", "refused")]
    assert not failed, f"requests failed around the stop (5xx, reset): {failed[:5]}\n{output[-3000:]}"
    spanning = [o for sent, answered, o in outcomes if sent < stopped_at < answered]
    assert spanning, "no request was in flight when SIGTERM came: the test proved nothing"
    assert all(o == "200" for o in spanning)
    assert returncode == 0, f"serve_main exited {returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert "failed to shut down" not in output, output[-3000:]  # Serve's own stop ran to the end


def test_the_drain_waits_as_long_as_the_longest_graceful_shutdown(tmp_path):
    from serve_app.deployments.ingress import GRACEFUL_SHUTDOWN_TIMEOUT_S
    from serve_app.serve_main import grace_s, load_config

    config = yaml.safe_load(drain_config(tmp_path / "config.yaml", 8000).read_text())
    assert grace_s(load_config(str(tmp_path / "config.yaml"))) == 30
    for deployment in config["applications"][0]["deployments"]:
        deployment.pop("graceful_shutdown_timeout_s", None)
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(config))
    assert grace_s(load_config(str(tmp_path / "bare.yaml"))) == GRACEFUL_SHUTDOWN_TIMEOUT_S
    assert grace_s(load_config(str(ROOT / "deploy" / "config.yaml"))) >= 60
