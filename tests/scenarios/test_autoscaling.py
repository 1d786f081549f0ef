"""Autoscaling on the token backlog, end to end on a 3-node Ray cluster on this machine.

    python -m tests.scenarios.test_autoscaling            # ~4 min; writes bench/results/autoscaling.{png,md,json}
    python -m tests.scenarios.test_autoscaling --quick    # shorter phases (smoke run)

An SFR-like Mistral (testkit/tiny_models.py's tokenizer, hidden 384 / 4 layers: slow enough on
one core for a queue to form) is served by `build_app` on a head node and two worker nodes
with a custom resource `fake_gpu` (2 and 1) standing in for GPUs; the Embedder asks for
`{fake_gpu: 1}` and autoscales 1..3 replicas with TokenBacklogPolicy. An open-loop load
(idle → ramp → plateau → idle) is sampled every 0.5 s: offered and answered rates, tokens in
flight, the backlog the replicas report to the controller, target and running replicas per
node. Exits non-zero unless it scaled up under backlog, used several nodes, scaled back
down, and failed no request other than explicit 503s. The model, texts and config live in
tests/scenarios/common.py (test_replica_kill.py uses them too).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from testkit import harness
from testkit.loadgen import arrivals, latency_stats, run_load
from testkit.workloads import Request
from tests.scenarios.common import FAKE_GPU_WORKERS, MODEL, ModelShape, checked, model_and_cluster, serve_config, text_pool


@dataclass
class Phase:
    name: str
    duration_s: float
    rate_from: float  # requests per second at the phase's start
    rate_to: float  # ... and at its end (linear in between)


def rate_at(phases: list[Phase], t: float) -> tuple[str, float]:
    start = 0.0
    for phase in phases:
        if t < start + phase.duration_s:
            return phase.name, phase.rate_from + (t - start) / phase.duration_s * (phase.rate_to - phase.rate_from)
        start += phase.duration_s
    return "end", 0.0


def poll(controller, node_names: dict[str, str]) -> dict:
    """Embedder replicas per node and the backlog each replica last reported to the controller
    (`record_autoscaling_stats`: exactly what TokenBacklogPolicy sums, without the handle queues)."""
    import ray
    from ray.serve._private.common import DeploymentID

    dep = harness.deployments(controller).get("Embedder", {})
    by_node: dict[str, int] = {}
    for r in harness.running(dep):
        node = node_names.get(r.get("node_id"), r.get("node_id"))
        by_node[node] = by_node.get(node, 0) + 1
    starting = sum(str(r.get("state")).endswith(("STARTING", "PENDING_MIGRATION", "RECOVERING"))
                   for r in dep.get("replicas") or [])
    metrics = ray.get(controller._get_metrics_for_deployment_for_testing.remote(
        DeploymentID(name="Embedder", app_name=harness.APP)), timeout=10)

    def latest_sum(name):
        points = [max(s, key=lambda p: p.timestamp) for s in metrics.get(name) or [] if s]
        return sum(float(p.value) for p in points) if points else None

    return {"target_replicas": dep.get("target_num_replicas"), "running_replicas": sum(by_node.values()),
            "starting_replicas": starting, "replicas_by_node": by_node,
            "backlog_tokens": latest_sum("backlog_tokens"), "backlog_requests": latest_sum("backlog_requests")}


async def drive(opts, url: str, controller, node_names, requests: list[Request], tokens: list[int]) -> tuple:
    t0, stop, samples = time.perf_counter(), asyncio.Event(), []
    sampler = asyncio.create_task(harness.sample_every(opts.sample_s, lambda: poll(controller, node_names), stop, t0,
                                                       samples))
    load_end = sum(p.duration_s for p in opts.phases[:-1])  # the last phase is the idle tail
    schedule = arrivals(lambda t: rate_at(opts.phases, t)[1], load_end, len(requests))
    result = await run_load(url + "/v1", MODEL, requests.__getitem__, concurrency=opts.max_in_flight,
                            max_requests=len(requests), max_duration_s=load_end, arrivals=schedule,
                            timeout_s=opts.request_timeout_s, validate=checked(opts.shape.hidden, tokens), t0=t0,
                            progress=False)
    # The idle tail: a whole idle phase after the last response at least (a late load drains past
    # its schedule), ended early once one replica is left and stays so for 5 s.
    drained = time.perf_counter() - t0
    tail_end = max(sum(p.duration_s for p in opts.phases), drained + opts.phases[-1].duration_s)
    while time.perf_counter() - t0 < tail_end:
        after = [s for s in samples if s["t"] > drained][-10:]
        if len(after) == 10 and all(s["running_replicas"] == 1 and s["target_replicas"] == 1 for s in after):
            break
        await asyncio.sleep(0.5)
    stop.set()
    return result, await sampler, load_end


def client_side(samples: list[dict], records, tokens: list[int], phases: list[Phase]) -> None:
    """Add to each sample what the client saw: offered rate, requests sent / answered in the
    last second, and requests and tokens sent but not yet answered (everything in the service)."""
    sent = [(r.start_s + r.send_delay_s, r.start_s + r.latency_s, tokens[r.index]) for r in records]
    for s in samples:
        t = s["t"]
        s["phase"], s["offered_rps"] = rate_at(phases, t)
        s["sent_rps"] = sum(t - 1 < a <= t for a, _, _ in sent)
        s["done_rps"] = sum(t - 1 < b <= t for _, b, _ in sent)
        s["in_flight_requests"] = sum(a <= t < b for a, b, _ in sent)
        s["in_flight_tokens"] = sum(n for a, b, n in sent if a <= t < b)


def analyse(samples: list[dict], records, opts, load_end: float) -> dict:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok and r.status != 503]

    def first(pred, after=None):
        return next((s["t"] for s in samples if (after is None or s["t"] >= after) and pred(s)), None)

    def rel(t, ref):
        return None if t is None or ref is None else round(t - ref, 1)

    over = first(lambda s: (s["backlog_tokens"] or 0) > opts.target_backlog_tokens)
    last = max((r.start_s + r.latency_s for r in records), default=None)
    peak = max(samples, key=lambda s: s["running_replicas"])
    nodes = sorted({n for s in samples for n, c in s["replicas_by_node"].items() if c})
    t = {f"{kind}_{n}_at_s": first(lambda s, kind=kind, n=n: (s[f"{kind}_replicas"] or 0) >= n)
         for n in (2, 3) for kind in ("target", "running")}
    down = first(lambda s: s["running_replicas"] == 1, after=last) if last else None
    summary = {  # in the order of the results table; times in seconds since the load started
        "requests_sent": len(records), "requests_ok": len(ok), "requests_503": sum(r.status == 503 for r in records),
        "requests_failed_other": len(failed), "failure_kinds": sorted({f"{r.status}:{r.error}" for r in failed}),
        "tokens_embedded": sum(r.usage_tokens or 0 for r in ok), "latency": latency_stats([r.latency_s for r in ok]),
        "requests_that_waited_for_a_client_slot": sum(r.send_delay_s > 0.01 for r in records),
        "max_running_embedder_replicas": peak["running_replicas"],
        "max_target_replicas": max(s["target_replicas"] or 0 for s in samples),
        "replicas_by_node_at_the_peak": peak["replicas_by_node"], "nodes_that_ran_an_embedder": ", ".join(nodes),
        "max_backlog_tokens_reported_by_replicas": max(s["backlog_tokens"] or 0 for s in samples),
        "max_tokens_in_flight_client_side": max(s["in_flight_tokens"] for s in samples),
        "load_starts_at_s": first(lambda s: s["offered_rps"] > 0), "backlog_over_target_at_s": over, **t,
        "scale_up_backlog_over_target_to_3_running_s": rel(t["running_3_at_s"], over),
        "load_ends_at_s": load_end, "last_response_at_s": round(last, 2) if last else None,
        "target_back_to_1_at_s": first(lambda s: s["target_replicas"] == 1, after=last) if last else None,
        "running_back_to_1_at_s": down, "scale_down_last_response_to_1_running_s": rel(down, last),
    }
    checks = {
        "scaled_up_under_backlog": over is not None and (t["running_2_at_s"] or -1) >= over,
        "reached_max_replicas_3": peak["running_replicas"] >= 3,
        "replicas_on_more_than_one_node": len(nodes) >= 2,
        "scaled_down_after_load": down is not None,
        "no_failures_except_503": not failed,
    }
    return {"summary": summary, "checks": checks}


def plot(path: Path, samples: list[dict], opts) -> None:
    plt = harness.pyplot()
    if plt is None:
        return
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True, constrained_layout=True)
    start, shades = 0.0, {"idle": "#f2f2f2", "ramp": "#fff3d6", "plateau": "#ffe0e0"}
    for phase in opts.phases:
        for ax in axes:
            ax.axvspan(start, start + phase.duration_s, color=shades.get(phase.name, "#e6f0ff"), zorder=0)
        axes[0].text(start + phase.duration_s / 2, 1.01, phase.name, transform=axes[0].get_xaxis_transform(),
                     ha="center", fontsize=8)
        start += phase.duration_s
    ax = axes[0]
    for key, label, style in (("offered_rps", "offered (scheduled arrival rate)", dict(color="black", lw=1.5)),
                              ("sent_rps", "sent (last 1 s)", dict(color="tab:blue", lw=1)),
                              ("done_rps", "answered (last 1 s)", dict(color="tab:green", lw=1))):
        ax.plot(t, [s[key] for s in samples], label=label, **style)
    ax.set(ylabel="requests / s", xlim=(0, t[-1] + 1 if t else start))
    ax.set_title(f"Embedder autoscaling on the token backlog (TokenBacklogPolicy, target {opts.target_backlog_tokens} "
                 "tokens/replica; 3-node Ray cluster on one machine)", fontsize=10, pad=16)
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    ax.plot(t, [s["in_flight_tokens"] for s in samples], color="tab:purple",
            label="tokens sent, not yet answered (client)")
    ax.plot(t, [np.nan if s["backlog_tokens"] is None else s["backlog_tokens"] for s in samples], color="tab:red",
            label="backlog tokens reported by Embedder replicas (sum; what the policy reads)")
    for k in (1, 2, 3):
        ax.axhline(k * opts.target_backlog_tokens, color="gray", ls=":", lw=0.8)
    ax.set_ylabel("tokens (dotted: 1, 2, 3 x target)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    nodes = sorted({n for s in samples for n in s["replicas_by_node"]})
    if nodes:
        ax.stackplot(t, [[s["replicas_by_node"].get(n, 0) for s in samples] for n in nodes], step="post", alpha=0.7,
                     labels=[f"running on {n}" for n in nodes])
    ax.step(t, [s["target_replicas"] or 0 for s in samples], where="post", color="black", lw=1.5,
            label="target replicas (autoscaler)")
    ax.set(ylabel="Embedder replicas", ylim=(0, 3.6), yticks=[0, 1, 2, 3], xlabel="seconds since the load started")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict, opts) -> list[str]:
    return [
        *harness.header("Embedder autoscaling on the token backlog — scenario on this machine", report,
                "Plot: `autoscaling.png`; every sample and request: `autoscaling.json`. "
                "How it works: tests/scenarios/README.md."),
        f"- Cluster: head (controller, proxy, Ingress, Tokenizer) + 2 workers with `fake_gpu` {FAKE_GPU_WORKERS}; "
        "Embedder `{fake_gpu: 1, num_cpus: 0.1}`, `tuning.cpu_threads: 1`, autoscaling 1..3, "
        f"`TokenBacklogPolicy(target_backlog_tokens={opts.target_backlog_tokens})`, upscale/downscale delay "
        f"{opts.upscale_delay_s}/{opts.downscale_delay_s} s, look-back {opts.look_back_period_s} s, metrics every "
        f"{opts.metrics_interval_s} s.",
        f"- Model: SFR-like Mistral, hidden {opts.shape.hidden}, {opts.shape.layers} layers, fp32; "
        "max_batch_tokens 2048.",
        f"- Load: open loop, {opts.texts_per_request} texts of {opts.min_words}-{opts.max_words} words per request, at "
        f"most {opts.max_in_flight} in flight (latency from the scheduled time); phases: "
        + ", ".join(f"{p.name} {p.duration_s:g} s ({p.rate_from:g}→{p.rate_to:g} req/s)" for p in opts.phases)
        + ".", "",
        *harness.md_checks(report["checks"]),
        *harness.md_figures({**report["summary"], "whole_scenario_wall_s": report["wall_s"]}),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter phases (smoke run)")
    p.add_argument("--target-backlog-tokens", type=int, default=3000)
    p.add_argument("--peak-rps", type=float, default=30.0)
    p.add_argument("--max-in-flight", type=int, default=48)
    p.add_argument("--max-requests", type=int, default=1500)
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--max-wall-s", type=float, default=480.0)
    p.add_argument("--out", default=str(harness.RESULTS / "autoscaling"), help="path prefix of .png/.md/.json")
    opts = p.parse_args(argv)
    opts.shape, opts.texts_per_request, opts.min_words, opts.max_words = ModelShape(), 4, 60, 140
    opts.upscale_delay_s, opts.downscale_delay_s, opts.look_back_period_s, opts.metrics_interval_s = 2.0, 10.0, 2.0, 0.5
    opts.sample_s, r = 0.5, opts.peak_rps
    d = (4, 10, 15, 30) if opts.quick else (8, 20, 40, 40)
    opts.phases = [Phase("idle", d[0], 0, 0), Phase("ramp", d[1], 1, r), Phase("plateau", d[2], r, r),
                   Phase("stop-idle", d[3], 0, 0)]
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    wall0, m = time.monotonic(), harness.machine()
    with harness.deadline(opts.max_wall_s, "the autoscaling scenario"), \
            model_and_cluster(opts.shape) as (model_dir, _, names):
        from transformers import AutoTokenizer

        tokenizer, rng = AutoTokenizer.from_pretrained(model_dir), random.Random(1)
        pool = text_pool(600, opts.min_words, opts.max_words)
        requests = [Request(i, tuple(rng.sample(pool, opts.texts_per_request)), "") for i in range(opts.max_requests)]
        # What the service feeds the model: <s> + text + the appended </s>.
        tokens = [sum(len(tokenizer(t)["input_ids"]) + 1 for t in r.texts) for r in requests]
        port = harness.free_port()
        embedder = {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.1, "resources": {"fake_gpu": 1}},
                    "autoscaling_config": {
                        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 3,
                        "upscale_delay_s": opts.upscale_delay_s, "downscale_delay_s": opts.downscale_delay_s,
                        "look_back_period_s": opts.look_back_period_s, "metrics_interval_s": opts.metrics_interval_s,
                        "policy": {"policy_function": "serve_app.deployments.autoscaling:TokenBacklogPolicy",
                                   "policy_kwargs": {"target_backlog_tokens": opts.target_backlog_tokens}}}}
        config = serve_config(port, model_dir, embedder)
        controller = harness.deploy(config)
        harness.wait_healthy(f"http://127.0.0.1:{port}")
        harness.log(f"deployed on {list(names.values())} in {time.monotonic() - wall0:.0f} s; load begins")
        result, samples, load_end = asyncio.run(drive(opts, f"http://127.0.0.1:{port}", controller, names,
                                                      requests, tokens))
    client_side(samples, result.records, tokens, opts.phases)
    report = {**analyse(samples, result.records, opts, load_end),
              **harness.stamp("tests.scenarios.test_autoscaling", argv, m, wall0)}
    out = Path(opts.out)
    plot(out.with_suffix(".png"), samples, opts)
    harness.write(out, {**report, "serve_config": config, "samples": samples,
                        "records": [vars(r) for r in result.records]}, markdown(report, opts))
    print(report["summary"], report["checks"], sep="\n")
    return 0 if all(report["checks"].values()) else 1


@pytest.mark.scenario
def test_autoscaling():
    assert main([]) == 0, "a check failed: see bench/results/autoscaling.md"


if __name__ == "__main__":
    sys.exit(main())
