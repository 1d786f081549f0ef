"""Steps every bench scenario shares: deploy a Serve config as `serve run` does, wait for it,
and bound the whole run in wall-clock time."""

from __future__ import annotations

import signal
import time

DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def serve_run(schema):
    """The two calls `serve run <config file>` makes (ray/serve/scripts.py); returns the client.

    `schema` is a `ray.serve.schema.ServeDeploySchema`; Ray must already be initialised.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        controller_options=schema.controller_options,
    )
    client.deploy_apps(schema, _blocking=False)
    return client


def set_client_port(schema, port: int) -> None:
    """Serve the config's API to clients on 127.0.0.1:`port`, as its own port would be.

    Under direct ingress (deploy/local.yaml) clients talk to the Ingress replica on the port
    range's one port, and the proxy gets any free port; otherwise the proxy's port is moved.
    """
    from bench.servers import free_port

    env = (schema.controller_options.runtime_env or {}).get("env_vars", {}) if schema.controller_options else {}
    schema.http_options.host = "127.0.0.1"
    if env.get(DIRECT_INGRESS) != "1":
        schema.http_options.port = port
        return
    env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
    env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)  # exclusive
    schema.http_options.port = free_port()


def wait_running(app: str, timeout_s: float = 240.0, poll_s: float = 0.5) -> float:
    """Seconds until application `app` is RUNNING; raises on DEPLOY_FAILED or timeout."""
    from ray import serve

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        status = serve.status().applications.get(app)
        state = str(status.status) if status else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return time.monotonic() - t0
        if state.endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"deploy failed: {status.message}")
        time.sleep(poll_s)
    raise TimeoutError(f"application {app!r} not RUNNING after {timeout_s} s")


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Until `url`/health answers 200 (the service's readiness: every model loaded)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=15, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError("/health never answered 200")


def hard_deadline(seconds: float, what: str) -> None:
    """Raise TimeoutError in the main thread after `seconds`: runs stay bounded."""

    def _alarm(*_):
        raise TimeoutError(f"{what} exceeded its wall-clock limit of {seconds:.0f} s")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(seconds))


def clear_deadline() -> None:
    signal.alarm(0)
