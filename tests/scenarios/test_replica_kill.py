"""Kill an Embedder replica mid-load: every request must still be answered, correctly.

    python -m tests.scenarios.test_replica_kill      # ~2 min; writes bench/results/replica_kill.{md,json}

The cluster, model and config of tests/scenarios/test_autoscaling.py, with the Embedder fixed at 2
replicas (`{fake_gpu: 1}` each). Reference vectors for every text come from
testkit/reference.py's `SFRReference` (one text at a time, from the card), in this process.
`--clients` closed-loop clients send 4 distinct texts per request (from a pool of
`--max-requests` distinct requests, repeated as long as the load lasts); from `--kill-after-s`
on, one of the two replicas is `ray.kill`ed as soon as it holds at least `--min-victim-work`
requests (its own count of requests running or queued in it: tests.scenarios.common.fault_when_busy,
reusable for other faults), so the kill always lands on work in progress. Every response must
be a 200 with each vector within 1e-4 of its own text's reference and the reference token count
in `usage`; requests must span the kill; Serve must replace the replica. Exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from testkit import harness
from testkit.loadgen import latency_stats, run_load
from testkit.workloads import Request
from tests.scenarios.common import (
    FAKE_GPU_WORKERS,
    MODEL,
    ModelShape,
    changes,
    checked,
    fault_when_busy,
    model_and_cluster,
    serve_config,
    serve_log_lines,
    text_pool,
)

MAX_ABS_DIFF = 1e-4


class Repeating(list):
    """Request k of the load is distinct request k mod n: the load runs as long as it must."""

    def __getitem__(self, k):
        return super().__getitem__(k % len(self)) if isinstance(k, int) else super().__getitem__(k)


async def drive(opts, url: str, controller, names, requests: list[Request], tokens, refs) -> dict:
    import ray

    t0, stop, timeline, kill, worst = time.perf_counter(), asyncio.Event(), [], {}, {}

    def look() -> dict:
        return {"running": [(r["replica_id"], names.get(r["node_id"], r["node_id"]), r["actor_name"])
                            for r in harness.running(harness.deployments(controller).get("Embedder", {}))]}

    async def killer():
        replica_id, node, actor = (await asyncio.to_thread(look))["running"][0]
        kill.update(replica_id=replica_id, node=node, actor_name=actor)
        struck = await fault_when_busy(actor, lambda handle: ray.kill(handle, no_restart=True), t0=t0,
                                       not_before_s=opts.kill_after_s, give_up_s=opts.duration_s - opts.after_kill_s,
                                       min_ongoing=opts.min_victim_work)
        kill.update(struck, t_kill_s=struck["t_fault_s"])
        harness.log(f"killed {actor} on {node} at {kill['t_kill_s']} s, holding {struck['ongoing_at_fault']} requests"
                    if struck["t_fault_s"] is not None else f"{actor} never held {opts.min_victim_work} requests: not killed")

    def replaced(sample) -> bool:
        return len(sample["running"]) >= 2 and all(rid != kill.get("replica_id") for rid, _, _ in sample["running"])

    poller = asyncio.create_task(harness.sample_every(0.25, look, stop, t0, timeline))
    result, _ = await asyncio.gather(
        run_load(url + "/v1", MODEL, requests.__getitem__, concurrency=opts.clients, max_requests=1 << 30,
                 max_duration_s=opts.duration_s, timeout_s=opts.request_timeout_s, t0=t0, progress=False,
                 validate=checked(opts.shape.hidden, tokens, refs, MAX_ABS_DIFF, worst)),
        killer())
    give_up = time.perf_counter() + opts.replace_timeout_s  # watch until the replacement is RUNNING (bounded)
    while time.perf_counter() < give_up and not (timeline and replaced(timeline[-1])):
        await asyncio.sleep(0.25)
    stop.set()
    await poller
    t_kill = kill.get("t_kill_s")
    after = [s for s in timeline if t_kill is not None and s["t"] > t_kill]
    gone = (s["t"] for s in after if all(rid != kill.get("replica_id") for rid, _, _ in s["running"]))
    kill["t_victim_gone_s"] = next(gone, None)
    kill["t_two_running_again_s"] = next((s["t"] for s in after if replaced(s)), None)
    return {"result": result, "kill": kill, "timeline": timeline, **worst}


def analyse(run: dict, logs_dir: str) -> dict:
    records, kill = run["result"].records, run["kill"]
    t_kill, back = kill.get("t_kill_s"), kill.get("t_two_running_again_s")
    spanning = [r for r in records if t_kill is not None and r.start_s <= t_kill < r.start_s + r.latency_s]
    failed = [vars(r) for r in records if not r.ok]
    # "Embedder replica lost": a part the Ingress's Embedder client re-sent to the other replica
    retries = serve_log_lines(logs_dir, "*Ingress*", "Embedder replica lost")
    summary = {  # in the order of the results table; times in seconds since the load started
        "requests_answered": len(records), "requests_ok_and_correct": sum(r.ok for r in records),
        "requests_failed": len(failed), "failures_by_kind": sorted({f"{r['status']}:{r['error']}" for r in failed}),
        "vectors_compared_with_their_references": sum(r.n_texts for r in records if r.ok),
        "max_abs_diff_vs_reference": run.get("max_abs_diff"),
        "killed": f"`{kill.get('actor_name')}` on {kill.get('node')}", "killed_at_s": t_kill,
        "requests_the_victim_held_when_killed": kill.get("ongoing_at_fault"),
        "requests_spanning_the_kill": len(spanning), "of_those_ok": sum(r.ok for r in spanning),
        "ingress_chunk_retries_logged": retries, "victim_gone_from_running_at_s": kill.get("t_victim_gone_s"),
        "two_running_again_at_s": back,
        "replacement_after_the_kill_s": round(back - t_kill, 2) if back and t_kill else None,
        "latency": latency_stats([r.latency_s for r in records if r.ok]),
    }
    checks = {
        "replica_was_killed_while_holding_work": bool(kill.get("ongoing_at_fault")),
        "replica_was_killed_mid_load": bool(spanning),
        "every_request_answered_once": sorted(r.index for r in records) == list(range(len(records))),
        "every_request_ok_and_every_vector_matches_its_reference":
            not failed and summary["vectors_compared_with_their_references"] > 0,
        "serve_replaced_the_replica": back is not None,
    }
    return {"summary": summary, "checks": checks, "kill": kill, "failures": failed[:20]}


def markdown(rep: dict, opts) -> list[str]:
    running = [[s["t"], ", ".join(f"{rid} @ {node}" for rid, node, _ in s["running"])]
               for s in changes(rep["timeline"])]
    return [
        *harness.header("Killing an Embedder replica mid-load — scenario on this machine", rep,
                "Every request and the replica timeline: `replica_kill.json`. How it works: tests/scenarios/README.md."),
        f"- Cluster of tests/scenarios/test_autoscaling.py (workers `fake_gpu` {FAKE_GPU_WORKERS}); Embedder fixed at 2 "
        f"replicas, `tuning.cpu_threads: 1`; model hidden {opts.shape.hidden}, {opts.shape.layers} layers.",
        f"- Load: {opts.clients} closed-loop clients for {opts.duration_s:g} s, 4 distinct texts of 20-80 words per "
        f"request; one replica `ray.kill`ed (after {opts.kill_after_s:g} s) as soon as it held at least "
        f"{opts.min_victim_work} requests. A request passes with HTTP 200, indexes "
        f"0..n-1, each vector within {MAX_ABS_DIFF:g} of its own text's `SFRReference` vector, usage equal to the "
        "reference's token count.", "",
        *harness.md_checks(rep["checks"]),
        *harness.md_figures(rep["summary"]),
        "## Embedder replicas RUNNING over time (controller's view, polled every 0.25 s)", "",
        *harness.md_table(["t (s)", "replica @ node"], running),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--max-requests", type=int, default=800, help="distinct requests, repeated while the load lasts")
    p.add_argument("--kill-after-s", type=float, default=10.0, help="the earliest kill: after warm-up")
    p.add_argument("--min-victim-work", type=int, default=2, help="requests the victim must hold when killed")
    p.add_argument("--after-kill-s", type=float, default=10.0, help="load kept up at least this long after the kill")
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--replace-timeout-s", type=float, default=60.0)
    p.add_argument("--max-wall-s", type=float, default=300.0)
    p.add_argument("--out", default=str(harness.RESULTS / "replica_kill"), help="path prefix of .md/.json")
    opts = p.parse_args(argv)
    opts.shape = ModelShape()
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    wall0, m = time.monotonic(), harness.machine()
    with harness.deadline(opts.max_wall_s, "the replica-kill scenario"), \
            model_and_cluster(opts.shape) as (model_dir, temp_dir, names):
        import torch

        from testkit.reference import SFRReference

        torch.set_num_threads(1)  # the references; more threads only oversubscribe a shared 2-core box
        reference, pool, rng = SFRReference(model_dir, max_length=256), text_pool(240, 20, 80, seed=2), random.Random(3)
        ref = {t: reference.embed([t])[0].astype(np.float32) for t in pool}
        distinct = [tuple(rng.sample(pool, 4)) for _ in range(opts.max_requests)]
        requests = Repeating([Request(i, texts, "") for i, texts in enumerate(distinct)])
        refs = Repeating([np.stack([ref[t] for t in texts]) for texts in distinct])
        tokens = Repeating([sum(len(reference.token_ids(t)) for t in texts) for texts in distinct])
        port = harness.free_port()
        controller = harness.deploy(serve_config(port, model_dir, {
            "num_replicas": 2, "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 0.1, "resources": {"fake_gpu": 1}}}))
        harness.wait_healthy(f"http://127.0.0.1:{port}")
        harness.log(f"deployed in {time.monotonic() - wall0:.0f} s; load begins")
        run = asyncio.run(drive(opts, f"http://127.0.0.1:{port}", controller, names, requests, tokens, refs))
        rep = {**analyse(run, temp_dir), **harness.stamp("tests.scenarios.test_replica_kill", argv, m, wall0),
               "timeline": run["timeline"]}
    harness.write(Path(opts.out), {**rep, "records": [vars(r) for r in run["result"].records]}, markdown(rep, opts))
    print(rep["summary"], rep["checks"], sep="\n")
    return 0 if all(rep["checks"].values()) else 1


@pytest.mark.scenario
def test_replica_kill():
    assert main([]) == 0, "a check failed: see bench/results/replica_kill.md"


if __name__ == "__main__":
    sys.exit(main())
