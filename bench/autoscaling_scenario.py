"""Autoscaling on the token backlog, end to end on a 3-node Ray cluster on this machine.

    python -m bench.autoscaling_scenario            # ~4 min; writes bench/results/autoscaling.{png,md,json}
    python -m bench.autoscaling_scenario --quick    # shorter phases (smoke run)

An SFR-like Mistral (testkit/tiny_models.py's tokenizer, hidden 384 / 4 layers: slow enough on
one core for a queue to form) is served by `build_app` on a head node and two worker nodes
with a custom resource `fake_gpu` (2 and 1) standing in for GPUs; the Embedder asks for
`{fake_gpu: 1}` and autoscales 1..3 replicas with TokenBacklogPolicy. An open-loop load
(idle → ramp → plateau → idle) is sampled every 0.5 s: offered and answered rates, tokens in
flight, the backlog the replicas report to the controller, target and running replicas per
node. Exits non-zero unless it scaled up under backlog, used several nodes, scaled back
down, and failed no request other than explicit 503s. bench/replica_kill_scenario.py reuses
the model, texts and config of this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import harness
from bench.loadgen import arrivals, latency_stats, run_load, vectors
from bench.scenario import header
from bench.workloads import Request

MODEL = "tiny-sfr-wide"
FAKE_GPU_WORKERS = [{"fake_gpu": 2}, {"fake_gpu": 1}]


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 384
    intermediate: int = 1024
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2


def build_model(root: Path, shape: ModelShape = ModelShape()) -> Path:
    """An SFR-like model dir: testkit/tiny_models.py's tokenizer and ST files, a wider Mistral."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    from testkit.tiny_models import build_tokenizer, write_sentence_transformers_files

    build_tokenizer(root)
    config = MistralConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(root)), hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, sliding_window=4096, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    MistralModel(config).eval().save_pretrained(root)
    write_sentence_transformers_files(root)
    return root


@contextlib.contextmanager
def model_and_cluster(shape: ModelShape):
    """A temporary SFR-like model, and our cluster of a head and two fake-GPU workers; yields
    (model dir, the cluster's temp dir, {node id: name}) and tears both down."""
    tmp, cluster, temp_dir = Path(tempfile.mkdtemp(prefix="sfr-like-")), None, None
    try:
        model_dir = build_model(tmp / "model", shape)
        cluster, temp_dir, names = harness.start_cluster(FAKE_GPU_WORKERS)
        yield model_dir, temp_dir, names
    finally:
        if cluster is not None:
            harness.stop_ray(temp_dir, cluster)
        shutil.rmtree(tmp, ignore_errors=True)


def text_pool(n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    """Distinct texts from the tiny tokenizer's corpus words (about one token per word)."""
    from testkit.tiny_models import CORPUS

    words, rng, texts = " ".join(CORPUS).split(), random.Random(seed), {}
    while len(texts) < n:
        texts.setdefault(" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))))
    return list(texts)


def serve_config(port: int, model_dir: Path, embedder: dict, max_batch_tokens: int = 2048) -> dict:
    """A `serve run` config: `build_app` with one model, Ingress and Tokenizer on the head."""
    on_head = {"num_cpus": 0.25, "resources": {"head_node": 0.01}}
    model = {"name": MODEL, "source": str(model_dir), "max_input_tokens": 256, "max_batch_tokens": max_batch_tokens,
             "tuning": {"cpu_threads": 1}}  # one core per "GPU"
    return {
        "proxy_location": "HeadOnly",  # every node has IP 127.0.0.1 here: one proxy, one port
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": harness.APP, "route_prefix": "/", "import_path": "serve_app.deployments.app:build_app",
            "runtime_env": {"env_vars": harness.OFFLINE_ENV},
            "args": {"models": [model], "auth": {"enabled": False}},  # loopback only
            "deployments": [{"name": "Ingress", "num_replicas": 1, "ray_actor_options": on_head},
                            {"name": "Tokenizer", "num_replicas": 1, "ray_actor_options": on_head},
                            {"name": "Embedder", **embedder}],
        }],
    }


def checked(dims: int, tokens: list[int], refs: list[np.ndarray] | None = None, atol: float = 1e-4,
            worst: dict | None = None):
    """A `validate` for loadgen: every vector `dims` wide and unit length (or within `atol` of
    its reference; the largest difference seen goes to `worst["max_abs_diff"]`), and usage equal
    to the request's token count."""

    def validate(index: int, payload: dict) -> str | None:
        got = vectors(payload)
        if got.shape[1] != dims:
            return "wrong_shape"
        if refs is not None:
            diff = float(np.max(np.abs(got - refs[index])))
            if worst is not None:
                worst["max_abs_diff"] = max(diff, worst.get("max_abs_diff", 0.0))
            if diff > atol:
                return "wrong_vector"
        if not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4):
            return "not_normalized"
        return None if payload["usage"]["prompt_tokens"] == tokens[index] else "wrong_usage"

    return validate


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
        *header("Embedder autoscaling on the token backlog — scenario on this machine", report,
                "Plot: `autoscaling.png`; every sample and request: `autoscaling.json`. How it works: bench/README.md."),
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
              **harness.stamp("bench.autoscaling_scenario", argv, m, wall0)}
    out = Path(opts.out)
    plot(out.with_suffix(".png"), samples, opts)
    harness.write(out, {**report, "serve_config": config, "samples": samples,
                        "records": [vars(r) for r in result.records]}, markdown(report, opts))
    print(report["summary"], report["checks"], sep="\n")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
