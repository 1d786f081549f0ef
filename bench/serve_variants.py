"""A/B of Serve-level settings on our served service: which ones buy throughput on this machine.

    python -m bench.serve_variants                      # search, 3 rounds, ~10 min
    python -m bench.serve_variants --workload bulk --rounds 2

Each variant is deploy/local.yaml with one change. Every round starts each variant on its own
fresh Ray instance (testkit.servers.ServedSystem) and drives the same seeded workload at it
(testkit/loadgen.py, 127.0.0.1 only, bounded in requests and seconds); variants take turns
within a round, so slow drifts of a shared machine hit them alike. Reported: texts/s per round,
each variant's ratio to the shipped config *in the same round*, and the CPU each Serve process
used. Writes bench/.work/serve_variants_<workload>.{md,json} (git-ignored): an A/B is a one-off
question; a run that decides a default is recorded with `--out bench/results/serve_variants_<name>`
and gets its line in docs/decisions.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import yaml

from testkit import workloads as wls
from testkit.harness import LOCAL_CONFIG as SHIPPED
from testkit.harness import WORK, machine, machine_line, stamp, without_direct_ingress, write
from testkit.loadgen import WARMUP_OFFSET, format_summary, run_load_sync, summarize
from testkit.procstats import CpuMeter
from testkit.servers import ServedSystem

from .mixed_traffic import fifo_config


def _app(config: dict) -> dict:
    return config["applications"][0]


def _logging(**fields):
    return lambda config: _app(config).setdefault("logging_config", {}).update(fields)


def _tuning(**fields):
    def change(config: dict) -> None:
        for model in _app(config)["args"]["models"]:
            model.setdefault("tuning", {}).update(fields)
    return change


def _two_embedders(config: dict) -> None:
    """Two one-thread Embedder replicas instead of one with two one-thread lanes."""
    _tuning(cpu_threads=1)(config)
    embedder = next(d for d in _app(config)["deployments"] if d["name"] == "Embedder")
    embedder.update(num_replicas=2, ray_actor_options={"num_cpus": 0.5})


def _replica_env(**env: str):
    return lambda config: _app(config).setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)


# name → (what it changes, how). Process-wide Serve flags (RAY_SERVE_THROUGHPUT_OPTIMIZED, the
# gRPC transport) also govern the proxy and controller; the replica-side subset can be set per
# application. PROCESS_ENV variants set them in the environment `serve run` starts Ray from, as
# an operator's shell would (deploy/local.yaml's direct ingress reaches the controller through
# its controller_options instead).
VARIANTS = {
    "shipped": ("deploy/local.yaml as committed (access log off)", lambda config: None),
    "via-proxy": ("no direct ingress: clients reach the Ingress through Serve's proxy (as before)",
                  without_direct_ingress),
    "one-lane": ("the engine as before lanes: one forward pass at a time on both threads, 2048-token passes",
                 _tuning(cpu_lanes=1, micro_batch_tokens=2048)),
    "one-batch-in-flight": ("the Embedder runs one batch at a time (shipped: one per CPU lane, two here)",
                           _tuning(batches_in_flight=1)),
    "four-batches-in-flight": ("the Embedder runs up to four batches per class at once (shipped: one per CPU lane, two here)",
                               _tuning(batches_in_flight=4)),
    "passes-512": ("the Embedder's CPU passes of at most 512 padded tokens (shipped: 1024), so a batch spreads over the lanes",
                   _tuning(micro_batch_tokens=512)),
    "whole-small-batches": ("a batch smaller than one pass per lane runs in passes of up to 1024 padded tokens "
                            "(shipped: cut into one pass per lane of equal size)",
                            _tuning(spread_small_batches=False)),
    "two-embedders": ("two Embedder replicas of one thread each (shipped: one replica, two one-thread lanes)",
                      _two_embedders),
    "fixed-wait-5ms": ("the Embedder waits 5 ms for a batch even when busy (no adaptive wait)",
                       _tuning(busy_batch_wait_timeout_s=0.005)),
    "batch-wait-10ms": ("the Embedder waits 10 ms for a batch, busy or idle",
                        _tuning(batch_wait_timeout_s=0.01, busy_batch_wait_timeout_s=0.01)),
    "busy-wait-40ms": ("the Embedder waits 40 ms for a batch while busy (shipped: 20 ms)",
                       _tuning(busy_batch_wait_timeout_s=0.04)),
    "batch-wait-20ms": ("the Embedder waits 20 ms for a batch, busy or idle",
                        _tuning(batch_wait_timeout_s=0.02, busy_batch_wait_timeout_s=0.02)),
    "access-log-on": ("Serve's per-request access log lines on in the replicas", _logging(enable_access_log=True)),
    "log-level-warning": ("replicas log at WARNING: also drops the Ingress's own per-request line",
                          _logging(log_level="WARNING")),
    "by-reference": ("every Ingress→Embedder call is a Ray actor call (before: small ones go over Serve's gRPC)",
                     _replica_env(EMBEDDINGS_BY_VALUE_MAX_BYTES="0")),
    "single-path": ("request classes and the vector cache off: one first-come-first-served path "
                    "(mixed_traffic's ours-fifo)", fifo_config),
    "replica-throughput-env": (
        "replicas run user code and the router on the main event loop, buffered request logs "
        "(the replica half of RAY_SERVE_THROUGHPUT_OPTIMIZED)",
        _replica_env(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="0", RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="0",
                     RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE="1000"),
    ),
}

PROCESS_ENV = {
    "proxy-grpc": ("the proxy talks to the Ingress over Serve's gRPC transport instead of Ray actor calls "
                   "(RAY_SERVE_PROXY_USE_GRPC=1)", {"RAY_SERVE_PROXY_USE_GRPC": "1"}),
    "throughput-env": ("RAY_SERVE_THROUGHPUT_OPTIMIZED=1 but without direct ingress (proxy on the config's "
                       "port): gRPC transport, router and user code on the main event loops, buffered request "
                       "logs, GC frozen after start-up",
                       {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}),
    "grpc-everywhere": ("proxy→Ingress and Ingress→Tokenizer/Embedder handles over gRPC "
                        "(RAY_SERVE_USE_GRPC_BY_DEFAULT=1)", {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}),
}
VARIANTS.update({name: (desc, lambda config: None) for name, (desc, _) in PROCESS_ENV.items()})


def write_variant(name: str, base: dict, out_dir: Path) -> Path:
    config = copy.deepcopy(base)
    config = VARIANTS[name][1](config) or config  # a change edits the config, or returns a new one
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure(config: Path, wl: wls.Workload, model: str, load_s: float, max_requests: int,
            env: dict[str, str] | None = None) -> dict:
    served = ServedSystem(config, env=env)
    try:
        served.start()
        common = dict(concurrency=wl.concurrency, extra_body={"truncate": True}, timeout_s=120.0, progress=False)
        run_load_sync(served.base_url, model, wl, max_requests=wl.concurrency, max_duration_s=5.0,
                      index_offset=WARMUP_OFFSET, **common)
        meter = CpuMeter([served.pid]).start()
        result = run_load_sync(served.base_url, model, wl, max_requests=max_requests, max_duration_s=load_s, **common)
        summary = summarize(result)
        summary["cpu"] = meter.stop()
        return summary
    finally:
        served.stop()


def render(res: dict) -> list[str]:
    names = res["variants"]
    rounds = res["rounds"]
    lines = [
        f"# Serve settings A/B: {res['workload']} workload",
        "",
        f"`{res['command']}`, {res['generated']}, {machine_line(res['machine'])}. Each variant is `deploy/local.yaml` "
        f"with one change, started fresh on its own Ray instance each round; {res['load_s']:.0f} s of "
        f"closed-loop load per measurement ({res['clients']} clients); variants take turns within a round.",
        "",
        "| variant | change | texts/s per round | median texts/s | ratio to shipped, same round (median) | failures |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in names:
        tps = [r[name]["texts_per_s"] or 0.0 for r in rounds]
        ratios = [(r[name]["texts_per_s"] or 0.0) / r["shipped"]["texts_per_s"] for r in rounds]
        failures = sum(r[name]["requests"] - r[name]["ok"] for r in rounds)
        lines.append(f"| {name} | {VARIANTS[name][0]} | {', '.join(f'{t:.1f}' for t in tps)} | "
                     f"{statistics.median(tps):.1f} | {statistics.median(ratios):.2f}× | {failures} |")
    # Latency, by request kind where the workload mixes kinds (median over rounds).
    tags = sorted({t for r in rounds for n in names for t in r[n].get("latency_by_tag", {})})
    kinds = [(t, lambda s, t=t: s["latency_by_tag"].get(t, {})) for t in tags] or [("all", lambda s: s["latency"])]
    ms = lambda values: f"{statistics.median(values) * 1000:.0f}" if values else "n/a"  # noqa: E731
    lines += ["", "Latency per request, p50 / p99 ms (median over rounds):", "",
              "| variant | " + " | ".join(kind for kind, _ in kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for name in names:
        cells = []
        for _, stats_of in kinds:
            got = [stats_of(r[name]) for r in rounds]
            cells.append(f"{ms([g['p50_s'] for g in got if g.get('p50_s')])} / "
                         f"{ms([g['p99_s'] for g in got if g.get('p99_s')])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    roles = sorted({role for r in rounds for n in names for role in r[n]["cpu"]["cores_by_role"]})
    lines += ["", "CPU cores used per process during the measured load (mean over rounds):", "",
              "| variant | " + " | ".join(roles) + " | other people's processes |",
              "|---|" + "---:|" * (len(roles) + 1)]
    for name in names:
        mean = lambda f: statistics.mean(f(r[name]["cpu"]) for r in rounds)  # noqa: E731
        cells = [f"{mean(lambda c, role=role: c['cores_by_role'].get(role, 0.0)):.2f}" for role in roles]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean(lambda c: c['foreign_cores']):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="search", choices=sorted(wls.WORKLOADS))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--load-s", type=float, default=20.0)
    p.add_argument("--max-requests", type=int, default=6000)
    p.add_argument("--out", default=None, help="path prefix (default bench/.work/serve_variants_<workload>)")
    args = p.parse_args(argv)
    wall0, facts = time.monotonic(), machine()

    names = [n for n in args.variants.split(",") if n]
    unknown = set(names) - set(VARIANTS)
    if unknown or "shipped" not in names:
        p.error(f"unknown variants {sorted(unknown)}; 'shipped' is required (the baseline)")
    base = yaml.safe_load(SHIPPED.read_text())
    model = _app(base)["args"]["models"][0]["name"]
    wl = wls.get(args.workload)
    out_dir = WORK / "variants"
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = {name: write_variant(name, base, out_dir) for name in names}

    rounds = []
    for k in range(args.rounds):
        order = names[k % len(names):] + names[: k % len(names)]  # rotate who goes first
        results = {}
        for name in order:
            env = PROCESS_ENV.get(name, (None, None))[1]
            results[name] = measure(configs[name], wl, model, args.load_s, args.max_requests, env)
            print(f"[{time.strftime('%H:%M:%S')}] round {k + 1}/{args.rounds} {name}: "
                  f"{format_summary(results[name])}", file=sys.stderr, flush=True)
        rounds.append(results)

    res = {
        **stamp("bench.serve_variants", argv, facts, wall0),
        "workload": args.workload, "clients": wl.concurrency, "load_s": args.load_s,
        "variants": names, "rounds": rounds,
    }
    write(Path(args.out) if args.out else WORK / f"serve_variants_{args.workload}", res, render(res))
    print("\n".join(render(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
