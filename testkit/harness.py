"""What every benchmark (bench/) and scenario (tests/scenarios/) shares: start the service, watch it,
report.

* Start: a Serve config on a fresh, private Ray instance in this process, deployed as
  `serve run CONFIG` deploys it (`start_ray` + `deploy`), or on a multi-node cluster on this
  machine (`start_cluster` + `deploy`); `python -m testkit.harness CONFIG` does the same in a
  process of its own until signalled (testkit/servers.py's ServedSystem runs it).
* Watch: the controller's view of each deployment (`deployments`), Prometheus metrics
  (`scrape`), anything else every few seconds beside the load (`sample_every`).
* Report: the machine (`machine`, `stamp`, `header`), markdown tables (`md_table`, `md_checks`), and
  `write(prefix, report, md_lines)` for .json + .md (plots: `pyplot`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / ".work"  # git-ignored: logs, smoke runs, generated configs
LOCAL_CONFIG = REPO / "deploy" / "local.yaml"
APP = "embeddings"
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
PRODUCTION_CONFIG = REPO / "deploy" / "config.yaml"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    """CPU model, cores, memory and the versions that matter, for every results file."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for pkg in ("ray", "torch", "transformers", "sentence-transformers", "httpx", "aiohttp"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu_model": cpu, "nproc": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "versions": versions, "loadavg_at_start": os.getloadavg()}


def machine_line(m: dict) -> str:
    return (f"{m['cpu_model']}, {m['nproc']} cores, {m['memory_gib']} GiB (load average {m['loadavg_at_start'][0]:.1f} "
            f"at the start); Ray {m['versions']['ray']}, torch {m['versions']['torch']}")


def stamp(module: str, argv: list[str] | None, machine_facts: dict, wall0: float) -> dict:
    """What every results file says of its run: the command, when, where, how long."""
    return {"command": " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)]),
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_facts,
            "wall_s": round(time.monotonic() - wall0, 1)}


# --------------------------------------------------------------------------------------------
# Ports: never a fixed one (others on this machine may hold it)


def port_listeners(port: int) -> set[int]:
    """Pids listening on TCP `port` (any address)."""
    import psutil

    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def port_is_free(port: int) -> bool:
    if port_listeners(port):
        return False
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def haproxy_ports(*taken: int) -> dict[str, str]:
    """Free ports for HAProxy's own listeners (stats, Prometheus), which default to fixed ones
    (8404, 9101): two HAProxy-fronted Serve instances on one machine would collide there.
    `taken`: ports chosen but not bound yet (the clients' port), which free_port could return."""
    stats = next(p for p in iter(free_port, None) if p not in taken)
    metrics = next(p for p in iter(free_port, None) if p not in (stats, *taken))
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}


def free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port_is_free(port):
            return port
    raise RuntimeError("no free port found")


# --------------------------------------------------------------------------------------------
# Ray and Serve in this process


def read_config(path: Path = LOCAL_CONFIG) -> dict:
    return yaml.safe_load(Path(path).read_text())


def without_direct_ingress(config: dict) -> dict:
    """The config with clients going through Serve's Python proxy (no HAProxy, no direct ingress)."""
    config = copy.deepcopy(config)
    config.pop("controller_options", None)
    for app in config["applications"]:
        env = app.get("runtime_env", {}).get("env_vars", {})
        env.pop(DIRECT_INGRESS, None)
        env.pop(HA_PROXY, None)
    return config


def with_direct_ingress_only(config: dict) -> dict:
    """The config with clients on the Ingress replica's own port, no proxy in between
    (`set_client_port` gives the replica that port; one Ingress replica, not redeployable in place)."""
    config = without_direct_ingress(config)
    config["controller_options"] = {"runtime_env": {"env_vars": {DIRECT_INGRESS: "1", "RAY_SERVE_PORT_QUARANTINE_S": "0"}}}
    for app in config["applications"]:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {})[DIRECT_INGRESS] = "1"
    return config


def with_production_front(config: dict) -> dict:
    """The config with deploy/config.yaml's front: HAProxy on the proxy's port, forwarding to Ingress
    replicas that serve HTTP themselves (the controller's and the application's switches, as there)."""
    production = read_config(PRODUCTION_CONFIG)
    config = without_direct_ingress(config)
    config["controller_options"] = copy.deepcopy(production["controller_options"])
    app_env = production["applications"][0]["runtime_env"]["env_vars"]
    for app in config["applications"]:
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env.update({k: v for k, v in app_env.items() if k.startswith("RAY_SERVE_")})
    return config


def set_client_port(schema, port: int) -> None:
    """Serve the config's API to clients on 127.0.0.1:`port`, as its own port would be.

    Under direct ingress alone (deploy/local.yaml) clients talk to the Ingress replica on the port
    range's one port, and the proxy gets any free port; otherwise (Serve's proxy, or HAProxy in
    front of direct-ingress replicas as in deploy/config.yaml) the proxy's port is moved.
    """
    opts = schema.controller_options
    env = (opts.runtime_env or {}).get("env_vars", {}) if opts else {}
    schema.http_options.host = "127.0.0.1"
    if env.get(DIRECT_INGRESS) == "1" and env.get(HA_PROXY) != "1":
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)  # exclusive
        schema.http_options.port = free_port()
        return
    if env.get(HA_PROXY) == "1":
        env.update(haproxy_ports(port))
    schema.http_options.port = port


def _private_temp_dir(temp_dir: str | None) -> str:
    """A short private dir (Unix socket paths are limited); RAY_TMPDIR points there too, so that
    nothing of this instance lands in /tmp/ray, where another `ray.init()` could find it."""
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="rb", dir="/tmp")
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    os.environ["RAY_TMPDIR"] = temp_dir
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    return temp_dir


def start_ray(num_cpus: int | None = None, metrics_port: int | None = None, temp_dir: str | None = None,
              log_to_driver: bool = False) -> str:
    """A fresh Ray instance of our own (`address="local"`: never one found on the machine), no
    dashboard; returns its temp dir for `stop_ray`. `num_cpus`: default Ray's detection."""
    import ray

    temp_dir = _private_temp_dir(temp_dir)
    kwargs = dict(address="local", namespace="serve", include_dashboard=False, log_to_driver=log_to_driver,
                  _temp_dir=os.path.join(temp_dir, "ray"))
    if num_cpus:
        kwargs["num_cpus"] = num_cpus
    if metrics_port:
        kwargs["_metrics_export_port"] = metrics_port
    try:
        ray.init(**kwargs)
    except Exception:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return temp_dir


def start_cluster(workers: list[dict], head_cpus: int = 2, worker_cpus: int = 1):
    """Our own multi-node cluster on this machine (`ray.cluster_utils.Cluster`): a head with
    resource `head_node` and one node per entry of `workers` (its custom resources).
    Returns (cluster, temp dir, {node id: readable name}); this process is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = _private_temp_dir(None)
    common = dict(object_store_memory=100 * 2**20, include_dashboard=False, temp_dir=os.path.join(temp_dir, "ray"))
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, connect=False,
                      head_node_args=dict(num_cpus=head_cpus, resources={"head_node": 1}, **common))
    names = {cluster.head_node.node_id: "head"}
    for i, resources in enumerate(workers):
        node = cluster.add_node(num_cpus=worker_cpus, resources=resources, **common)
        names[node.node_id] = f"worker-{'abcdefgh'[i]} ({', '.join(f'{k}={v}' for k, v in resources.items())})"
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    return cluster, temp_dir, names


def deploy(config: dict, port: int | None = None, timeout_s: float = 240.0):
    """Deploy a Serve config as `serve run` does (ray/serve/scripts.py: `serve_start` with the
    file's options, then `deploy_apps`), clients on 127.0.0.1:`port` (None: the file's own);
    wait until every application is RUNNING. Returns the controller's handle. Calling it again
    with a changed config is `serve deploy`: a rolling update."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    if port is not None:
        set_client_port(schema, port)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()), controller_options=schema.controller_options)
    client.deploy_apps(schema, _blocking=False)  # applies the config synchronously: status DEPLOYING from here
    names = [app.name for app in schema.applications]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        statuses = {n: serve.status().applications.get(n) for n in names}
        failed = [s for s in statuses.values() if s and str(s.status).endswith("DEPLOY_FAILED")]
        if failed:
            raise RuntimeError(f"deploy failed: {failed[0].message}")
        if all(s and str(s.status).endswith("RUNNING") for s in statuses.values()):
            return client._controller
        time.sleep(0.5)
    raise TimeoutError(f"applications {names} not RUNNING after {timeout_s:.0f} s")


def stop_ray(temp_dir: str | None, cluster=None) -> None:
    import ray
    from ray import serve

    steps = [serve.shutdown, ray.shutdown] + ([cluster.shutdown] if cluster is not None else [])
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - best effort: keep tearing down
            log(f"teardown: {step.__qualname__}: {exc!r}")
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Until `url`/health answers 200 (the service's readiness: every model loaded)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=15, trust_env=False).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError("/health never answered 200")


def deployments(controller, app: str = APP) -> dict[str, dict]:
    """The controller's details of each deployment of `app` (target_num_replicas, replicas with
    replica_id, state, node_id, actor_name, pid)."""
    import ray

    details = ray.get(controller.get_serve_instance_details.remote(), timeout=15)
    return details.get("applications", {}).get(app, {}).get("deployments") or {}


def running(deployment: dict) -> list[dict]:
    return [r for r in deployment.get("replicas") or [] if str(r.get("state")).endswith("RUNNING")]


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise TimeoutError in the main thread after `seconds`: every run stays bounded."""

    def _alarm(*_):
        raise TimeoutError(f"{what} exceeded its wall-clock limit of {seconds:.0f} s")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)


# --------------------------------------------------------------------------------------------
# Watching


async def sample_every(period_s: float, fn, stop: asyncio.Event, t0: float, samples: list | None = None) -> list[dict]:
    """`fn()` (blocking; run in a thread) every `period_s` until `stop`, appended to `samples`
    (readable while this runs) as {"t": seconds since t0, **fn()}. A sample that fails is
    logged and skipped: a missed sample is not a failed run."""
    samples = [] if samples is None else samples
    while not stop.is_set():
        t = time.perf_counter() - t0
        try:
            samples.append({"t": round(t, 2), **await asyncio.to_thread(fn)})
        except Exception as exc:  # noqa: BLE001
            log(f"sample at {t:.1f} s failed: {exc!r}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, period_s - (time.perf_counter() - t0 - t)))
    return samples


def scrape(url: str, prefix: str = "") -> dict[str, float]:
    """Prometheus text from `url` → {'name{label="v",...}': value}, for the names starting
    with `prefix` (prometheus_client's parser)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10, trust_env=False).text):
        for s in family.samples:
            if s.name.startswith(prefix):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = out.get(f"{s.name}{{{labels}}}", 0.0) + s.value
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float | None:
    """The sum of a metric over all its label sets; None when the endpoint does not have it."""
    values = [v for k, v in metrics.items() if k.split("{", 1)[0] == name]
    return sum(values) if values else None


# --------------------------------------------------------------------------------------------
# Reporting


def header(title: str, report: dict, what: str) -> list[str]:
    """A report opens with its title, the command, when, on what machine, and `what`."""
    return [f"# {title}", "", f"`{report['command']}`, {report['generated']}; "
            f"{machine_line(report['machine'])}. {what}", ""]


def md_table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "–" if v is None else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def md_figures(figures: dict) -> list[str]:
    """A summary dict as a two-column table: names from its keys, latency stats in ms."""
    def cell(v):
        if isinstance(v, dict) and "p50_s" in v:
            return " / ".join(f"{k[:-2]} {ms(v[k])}" for k in ("p50_s", "p99_s", "max_s")) + f" ms (n={v['n']})"
        if isinstance(v, float):
            return round(v) if abs(v) >= 1000 or v.is_integer() else f"{v:.2e}" if abs(v) < 0.01 else round(v, 3)
        return v

    return md_table(["figure", "value"], [[k.replace("_", " "), cell(v)] for k, v in figures.items()])


def md_checks(checks: dict[str, bool]) -> list[str]:
    rows = [[name.replace("_", " "), "PASS" if ok else "**FAIL**"] for name, ok in checks.items()]
    return md_table(["check", "result"], rows)


def ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f}"


def write(prefix: Path, report: dict, md_lines: list[str]) -> None:
    """`prefix`.json (everything) and `prefix`.md (for people), side by side."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    prefix.with_suffix(".md").write_text("\n".join(md_lines) + "\n")
    log(f"wrote {prefix}.md, .json")


def pyplot():
    """matplotlib's pyplot without a display, or None (and a warning) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot (pip install -e '.[bench]')")
        return None
    return plt


# --------------------------------------------------------------------------------------------
# `python -m testkit.harness CONFIG`: `serve run CONFIG` on a private Ray instance, until signalled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a config on a fresh private Ray instance until SIGINT/SIGTERM.")
    p.add_argument("config")
    p.add_argument("--port", type=int, default=None, help="the clients' port (default: the file's)")
    p.add_argument("--temp-dir", default=None)
    p.add_argument("--num-cpus", type=int, default=None, help="default: Ray's detection, as `serve run`")
    p.add_argument("--metrics-port", type=int, default=None, help="Ray's Prometheus endpoint")
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    temp_dir = start_ray(args.num_cpus, args.metrics_port, args.temp_dir, log_to_driver=True)
    try:
        deploy(read_config(Path(args.config)), args.port)
        print(f"RUNNING {args.config} (clients: port {args.port or 'as configured'})", flush=True)
        while not stop.wait(1.0):  # no status polling once running: it would cost the measured machine CPU
            pass
        return 0
    finally:
        t0 = time.time()
        stop_ray(None if args.temp_dir else temp_dir)
        print(f"SHUT DOWN in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
