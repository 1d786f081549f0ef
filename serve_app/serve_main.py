"""`python -m serve_app.serve_main CONFIG`: what `serve run CONFIG` does, plus a clean stop.

`docker stop` and Kubernetes stop a container with SIGTERM, which `serve run` answers with a
stack dump and exit code 15, cutting off the requests in flight. Here SIGTERM (or Ctrl-C)
drains instead:

1. every Serve HTTP proxy stops accepting connections (a new client gets "connection refused",
   which it can retry elsewhere) and reports unhealthy to load balancers, while the requests
   it already holds run to the end: the whole app (Ingress, Tokenizer, Embedder) still serves;
2. once the proxies have finished them, or after the config's largest
   `graceful_shutdown_timeout_s`, Serve shuts down (its replicas now idle; direct-ingress ones
   skip the window Serve keeps them reachable for load balancers, as nothing routes to them
   any more) and the process exits 0.

Serve has no public call for step 1 (its own proxy draining only fails the health check), so
the proxies' HTTP servers are asked to exit as uvicorn does on its own SIGTERM: listener closed,
in-flight requests finished, idle keep-alive connections closed. Configs with direct ingress
alone (deploy/local.yaml), whose Ingress replica listens itself, drain that listener the same
way. Behind HAProxy (deploy/config.yaml), each node's HAProxy is the door: it gets its soft stop
(SIGUSR1: listeners closed, the requests it forwarded answered, then it exits), while the Ingress
replicas keep serving those requests.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import ray
import yaml
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX
from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema

logger = logging.getLogger("serve_app.serve_main")

POLL_S = 0.2


def load_config(path: str) -> ServeDeploySchema:
    with open(path) as file:
        return ServeDeploySchema.model_validate(yaml.safe_load(file))


def grace_s(config: ServeDeploySchema) -> float:
    """How long in-flight requests may take to finish: the largest graceful_shutdown_timeout_s
    of the config, or the Ingress's own (a request lasts as long as the Ingress may drain). The
    wait ends as soon as nothing is in flight, so a long bound costs a quiet service nothing."""
    from serve_app.deployments.ingress import GRACEFUL_SHUTDOWN_TIMEOUT_S

    found = [
        d.graceful_shutdown_timeout_s
        for app in config.applications
        for d in app.deployments
        if isinstance(getattr(d, "graceful_shutdown_timeout_s", None), (int, float))
    ]
    return max(found, default=GRACEFUL_SHUTDOWN_TIMEOUT_S)


def start(config: ServeDeploySchema) -> None:
    """Serve's `serve run CONFIG`, without its blocking loop: a local Ray (or RAY_ADDRESS's)."""
    ray.init(address=os.environ.get("RAY_ADDRESS"), namespace=SERVE_NAMESPACE)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)


# --- draining: runs inside the proxy and Ingress replica actors (through __ray_call__) ----------


def _proxy_stop_accepting(proxy) -> bool:
    """Close the proxy's listener; True if it is an HAProxy manager (then HAProxy is the door)."""
    if hasattr(proxy, "_haproxy"):
        proxy._haproxy.cfg.pass_health_checks = False  # a reload, if one comes, fails health checks
        proxy._haproxy._proc.send_signal(signal.SIGUSR1)  # HAProxy's soft stop (see _haproxy_stopped)
        _stop_node_metrics_polling(proxy)
        return True
    proxy.http_proxy.update_draining(True)  # health checks fail: load balancers move on
    _, server = proxy._start_http_server_task.result()
    server.should_exit = True  # uvicorn: close the listener, finish what is in flight
    return False


def _stop_node_metrics_polling(manager) -> None:
    """The manager polls HAProxy's admin socket for node gauges; once HAProxy exits on its soft
    stop every poll logs a traceback until Serve shuts down. Per-request metrics keep flowing."""
    task = getattr(getattr(manager, "_metrics_collector", None), "_node_metrics_task", None)
    if task is not None:
        task.get_loop().call_soon_threadsafe(task.cancel)  # the task lives on the actor's event loop


def _proxy_stopped(proxy) -> bool:
    if hasattr(proxy, "_haproxy"):
        return _haproxy_stopped(proxy._haproxy)
    task = proxy._running_http_server_task
    return task is None or task.done()


def _haproxy_stopped(haproxy) -> bool:
    """HAProxy's soft stop (SIGUSR1) closes its listeners at once and exits once the requests it
    holds are answered; workers of earlier reloads may still hold requests of their own."""
    if haproxy.has_alive_old_procs():
        return False
    try:
        with open(f"/proc/{haproxy._proc.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


def _replica_stop_accepting(replica) -> bool:
    impl = replica._replica_impl
    if getattr(impl, "_direct_ingress_http_server", None) is None:
        return False
    impl._stop_accepting_direct_ingress()
    return True


def _replica_stopped(replica) -> bool:
    task = getattr(replica._replica_impl, "_direct_ingress_http_server_task", None)
    return task is None or task.done()


def _no_deregistration_window(_replica) -> None:
    """A stopping direct-ingress replica stays reachable for a window (30 s) in which load balancers
    drop it. Once the doors are drained nothing routes to it any more, so the window would only
    hold Serve's shutdown past its own timeout; Ray reads the window from this module global."""
    import ray.serve._private.replica as replica_module

    replica_module.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S = 0.0


def serve_actor_names() -> list[str]:
    return [e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == SERVE_NAMESPACE]


def front_doors() -> list[tuple[ray.actor.ActorHandle, object]]:
    """Each actor that takes clients' HTTP (proxies or HAProxy managers; Ingress replicas with
    direct ingress alone), with the function that tells whether it has finished its last request.
    Behind HAProxy the Ingress replicas keep listening: HAProxy forwards what it holds to them."""
    doors, haproxy = [], False
    for name in sorted(serve_actor_names(), key=lambda n: not n.startswith(SERVE_PROXY_NAME)):  # proxies first
        try:
            actor = ray.get_actor(name, namespace=SERVE_NAMESPACE)
            if name.startswith(SERVE_PROXY_NAME):
                haproxy |= ray.get(actor.__ray_call__.remote(_proxy_stop_accepting), timeout=10)
                doors.append((actor, _proxy_stopped))
            elif name.startswith(REPLICA_ID_FULL_ID_STR_PREFIX) and not haproxy:
                if ray.get(actor.__ray_call__.remote(_replica_stop_accepting), timeout=10):
                    doors.append((actor, _replica_stopped))
        except Exception:  # noqa: BLE001 - a door that cannot be drained is shut down with the rest
            logger.warning("could not stop %s accepting requests", name, exc_info=True)
    return doors


def drain(grace: float) -> None:
    """Stop taking requests, then wait (at most `grace` seconds) for those in flight."""
    doors = front_doors()
    logger.info("draining: %d listener(s) closed, waiting up to %.0f s for requests in flight", len(doors), grace)
    deadline = time.monotonic() + grace
    while doors and time.monotonic() < deadline:
        try:
            doors = [(a, done) for a, done in doors if not ray.get(a.__ray_call__.remote(done), timeout=10)]
        except Exception:  # noqa: BLE001 - a listener that died has nothing left to finish
            logger.warning("lost track of a listener while draining", exc_info=True)
            break
        time.sleep(POLL_S)
    if doors:
        logger.warning("%d listener(s) still busy after %.0f s; shutting down anyway", len(doors), grace)


def end_deregistration_windows() -> None:
    """After the drain: replicas stop at once rather than stay reachable for load balancers."""
    for name in serve_actor_names():
        if name.startswith(REPLICA_ID_FULL_ID_STR_PREFIX):
            try:
                ray.get(ray.get_actor(name, namespace=SERVE_NAMESPACE).__ray_call__.remote(_no_deregistration_window), timeout=10)
            except Exception:  # noqa: BLE001 - that replica then waits out the window, as Serve would
                logger.warning("could not end %s's deregistration window", name, exc_info=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a Serve config file, e.g. deploy/config.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config)
    grace = grace_s(config)

    stop = threading.Event()

    def on_stop_signal():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: stop.set())

    on_stop_signal()
    start(config)
    on_stop_signal()  # again: ray.init installs a handler of its own that dumps the stack and dies
    logger.info("serving %s; SIGTERM or Ctrl-C drains and stops", args.config)
    while not stop.wait(1):
        pass
    logger.info("stop requested")
    drain(grace)
    end_deregistration_windows()
    serve.shutdown()
    ray.shutdown()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
