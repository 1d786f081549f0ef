"""Run a Serve config file (deploy/local.yaml) on a fresh, private Ray instance until signalled.

What `serve run deploy/local.yaml` does — parse the file with Serve's own `ServeDeploySchema`,
start Serve with the file's `http_options`/`proxy_location`, deploy its applications (their
`args`, `runtime_env` and `deployments:` options) — with three differences that matter on a
machine where other Ray instances (e.g. the test suite's) may be running:

  * `ray.init(address="local")`: always a new instance of our own, never one found on the
    machine (`serve run` without --address may attach to an existing cluster);
  * no dashboard (its port would collide), and its own temp dir (`--temp-dir`);
  * `--port` moves the port clients use (the benchmark uses it only when 8000 is taken): the
    Ingress's own port under direct ingress, else the proxy's.

Started by bench/cpu_serving.py as a subprocess in its own session; SIGINT or SIGTERM shuts
Serve and Ray down and exits. Usage:

    python -m bench.serve_local deploy/local.yaml [--port 8000] [--temp-dir /tmp/rb123]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import yaml

from bench.scenario_common import serve_run, set_client_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--temp-dir", default=None)
    p.add_argument("--num-cpus", type=int, default=None, help="default: Ray's detection, as `serve run`")
    args = p.parse_args(argv)

    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.schema import ServeDeploySchema

    with open(args.config) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    if args.port is not None:
        set_client_port(config, args.port)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    init_kwargs = dict(address="local", namespace=SERVE_NAMESPACE, include_dashboard=False)
    if args.temp_dir:
        init_kwargs["_temp_dir"] = args.temp_dir
    if args.num_cpus:
        init_kwargs["num_cpus"] = args.num_cpus
    ray.init(**init_kwargs)
    try:
        serve_run(config)
        print(f"DEPLOYING {args.config} (clients: port {args.port or 'as configured'}; "
              f"Serve proxy: http://{config.http_options.host}:{config.http_options.port})", flush=True)
        # Every second until the applications run, then every 10 s as `serve run` does: polled
        # every second, this driver took 0.02-0.03 of the 2 cores the measured service runs on
        # (bench.cpu_serving's CPU table, "Ray driver"); now at most 0.01.
        reported, poll_s = None, 1.0
        while not stop.wait(poll_s):
            statuses = {name: app.status for name, app in serve.status().applications.items()}
            if statuses != reported:
                print(f"STATUS {statuses}", flush=True)
                reported = statuses
                if any(str(s).endswith("DEPLOY_FAILED") for s in statuses.values()):
                    print("DEPLOY_FAILED", flush=True)
                    return 1
            poll_s = 10.0 if statuses and all(str(s).endswith("RUNNING") for s in statuses.values()) else 1.0
        return 0
    finally:
        print("SHUTTING DOWN", flush=True)
        t0 = time.time()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print(f"SHUT DOWN in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
