"""Soak test: steady mixed load for minutes, watching every Serve process's memory for a leak.

What it does (bounded: `--minutes` of load, default 10, plus ~1 minute of start-up and
teardown; a hard `signal.alarm` stops it at `--minutes` × 60 + 300 s):

  1. Starts a fresh Ray instance of its own (`ray.init(address="local")`, private temp dir,
     dashboard on a free port — the state API that `list_actors` uses lives there) and
     deploys deploy/local.yaml exactly as `serve run deploy/local.yaml` does (the file parsed
     by Serve's `ServeDeploySchema`, then `serve_start` + `deploy_apps`), on a free port of
     127.0.0.1 instead of 8000.
  2. Finds the PIDs of the Serve proxy, the controller and every replica (Ingress,
     Tokenizer, Embedder) with `ray.util.state.list_actors(detail=True)` (falling back to the
     controller's replica details and the processes' command lines), and re-checks them every
     30 s so that a replaced replica shows up as a new PID instead of a silent gap.
  3. Drives closed-loop mixed load with `bench.loadgen.run_load` (`--clients` clients, default
     8): one short query per request (5–15 words), or, for `--bulk-share` (50 %) of requests,
     64 documents of 20–300 words, all with `"truncate": true` (documents run past
     MiniLM's 256 tokens) and `encoding_format: base64`. Texts are generated per request
     index from `bench.workloads`' helpers without caching, so the load generator's own
     memory stays flat and no two requests repeat.
  4. Every `--sample-s` (5 s) reads VmRSS and RssAnon from /proc/<pid>/status of each of
     those processes (and of this driver, for reference).
  5. Leak verdict per process, on the samples after the warm-up (`--warmup-min`, 1 minute):
     least-squares slope of RSS in MB/min (with its standard error), net growth between the
     first and last 30 s after warm-up, and the slope of each half of that window. A process
     is flagged when the slope is above `--threshold-mb-min` (5 MB/min) *and* the net growth
     confirms it *and* the second half still grows (sustained, not a single allocator step).
     Why 5 MB/min: 7 GB/day, which would take down a replica within days; below it, a run of
     a few minutes cannot separate a leak from the allocator's steps (glibc arenas, pymalloc,
     torch's CPU caching), whose size this run measures as the fit's residual noise.
  6. Writes bench/results/soak.{md,json,png}; exits 1 on any failed request or flagged process.

Usage (repository root, in the venv):

    python -m bench.soak_scenario                 # 10 minutes of load, half of it bulk
    python -m bench.soak_scenario --minutes 1     # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.loadgen import run_load, summarize  # noqa: E402
from bench.scenario_common import clear_deadline, hard_deadline, serve_run, set_client_port, wait_healthy, wait_running  # noqa: E402
from bench.workloads import Request, make_document, make_query  # noqa: E402

RESULTS = REPO / "bench" / "results"
CONFIG = REPO / "deploy" / "local.yaml"
APP = "embeddings"
ENV_VARS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROLE_ORDER = ("Serve proxy", "Ingress", "Tokenizer", "Embedder", "Serve controller", "load generator (driver)")
_REPLICA_CLASS = re.compile(r"ServeReplica:([^:\s]+):([A-Za-z][\w-]*)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Ray and Serve: our own instance, the real config
# ---------------------------------------------------------------------------------------------


def read_config(path: Path = CONFIG) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def start_ray(num_cpus: int | None = None, dashboard: bool = True) -> str:
    """A fresh Ray instance of our own; returns its private temp dir (removed by stop_ray).

    RAY_TMPDIR points at the private dir too, so nothing of this instance lands in /tmp/ray
    where another engineer's `ray.init()` could find it.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rsoak", dir="/tmp")  # short: Unix socket paths are limited
    os.environ["RAY_TMPDIR"] = temp_dir
    kwargs = dict(
        address="local",
        namespace="serve",
        include_dashboard=dashboard,
        log_to_driver=False,
        _temp_dir=os.path.join(temp_dir, "ray"),
        runtime_env={"env_vars": ENV_VARS},
    )
    if dashboard:
        kwargs["dashboard_port"] = free_port()
    if num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    return temp_dir


def stop_ray(temp_dir: str | None) -> None:
    import ray
    from ray import serve

    for step in (serve.shutdown, ray.shutdown):
        try:
            step()
        except Exception as exc:  # noqa: BLE001 — best effort, keep tearing down
            log(f"teardown: {step.__qualname__}: {exc!r}")
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def deploy_config(doc: dict, port: int, timeout_s: float = 240.0) -> None:
    """Deploy as `serve run <config>` does, on 127.0.0.1:`port`; wait for RUNNING."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(doc)
    set_client_port(schema, port)
    serve_run(schema)
    wait_running(APP, timeout_s)


# ---------------------------------------------------------------------------------------------
# Which processes, and their memory
# ---------------------------------------------------------------------------------------------


def _role_of_class(class_name: str) -> str | None:
    m = _REPLICA_CLASS.search(class_name or "")
    if m:
        return m.group(2) if m.group(1) == APP else None
    if class_name == "ProxyActor":
        return "Serve proxy"
    if class_name == "ServeController":
        return "Serve controller"
    return None


def find_serve_pids() -> tuple[dict[str, list[int]], str]:
    """{role: [pid, ...]} for the proxy, the controller and each deployment's replicas.

    `list_actors(detail=True)` first (the state API, served by this instance's dashboard);
    if that fails, the controller's replica details plus the command lines of this
    instance's processes.
    """
    roles: dict[str, list[int]] = {}
    try:
        import ray
        from ray.util.state import list_actors

        # Our instance's GCS address: without it the state API refuses to pick among the
        # Ray instances other people run on this machine.
        address = ray.get_runtime_context().gcs_address
        for actor in list_actors(address=address, detail=True, filters=[("state", "=", "ALIVE")], limit=1000,
                                 timeout=15):
            role = _role_of_class(actor.class_name)
            if role and actor.pid:
                roles.setdefault(role, []).append(int(actor.pid))
        if roles.get("Serve proxy") and roles.get("Embedder"):
            return {r: sorted(p) for r, p in roles.items()}, "ray.util.state.list_actors"
    except Exception as exc:  # noqa: BLE001
        log(f"list_actors failed ({exc!r}); falling back to the controller's details")
    return _pids_from_controller_and_cmdlines(), "controller details + /proc cmdline"


def _pids_from_controller_and_cmdlines() -> dict[str, list[int]]:
    import psutil
    from ray import serve

    roles: dict[str, list[int]] = {}
    client = serve.context._get_global_client()
    import ray

    details = ray.get(client._controller.get_serve_instance_details.remote(), timeout=15)
    for name, dep in (details.get("applications", {}).get(APP, {}).get("deployments", {}) or {}).items():
        for r in dep.get("replicas", []) or []:
            if str(r.get("state")).endswith("RUNNING") and r.get("pid"):
                roles.setdefault(name, []).append(int(r["pid"]))
    ours = {c.pid for c in psutil.Process().children(recursive=True)}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] not in ours:
            continue
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "ProxyActor" in cmd:
            roles.setdefault("Serve proxy", []).append(proc.info["pid"])
        elif "ServeController" in cmd:
            roles.setdefault("Serve controller", []).append(proc.info["pid"])
    return {r: sorted(p) for r, p in roles.items()}


def read_memory_kb(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon, RssFile (kB) from /proc/<pid>/status; None if the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return out if "VmRSS" in out else None


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def mixed_source(seed: int, bulk_share: float, docs_per_bulk: int):
    """index → Request: 1 query (5–15 words) or `docs_per_bulk` documents (20–300 words).

    The same texts as `bench.workloads` would draw (its helpers, a per-index seeded RNG), but
    nothing is cached: a long soak must not grow the load generator's memory.
    """

    def source(index: int) -> Request:
        rng = random.Random(f"soak:{seed}:{index}")
        if rng.random() < bulk_share:
            return Request(index, tuple(make_document(rng, 20, 300) for _ in range(docs_per_bulk)), "bulk")
        return Request(index, (make_query(rng, 5, 15),), "search")

    return source


class CountingSource:
    """Wraps a source: counts requests issued, by kind (run_load calls source once per request)."""

    def __init__(self, source):
        self.source = source
        self.issued: dict[str, int] = {}

    def __call__(self, index: int):
        req = self.source(index)
        self.issued[req.tag] = self.issued.get(req.tag, 0) + 1
        return req


# ---------------------------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------------------------


async def soak(opts, url: str, model: str) -> dict:
    counting = CountingSource(mixed_source(opts.seed, opts.bulk_share, opts.docs_per_bulk))
    pids, pid_source = await asyncio.to_thread(find_serve_pids)
    log(f"processes ({pid_source}): {pids}")
    pid_history = [{"t": 0.0, "pids": pids}]
    samples: list[dict] = []
    t0 = time.perf_counter()

    def take_sample() -> None:
        t = time.perf_counter() - t0
        procs = {}
        for role, plist in pids.items():
            for pid in plist:
                mem = read_memory_kb(pid)
                if mem is not None:
                    procs[f"{role}|{pid}"] = mem
        me = read_memory_kb(os.getpid())
        if me:
            procs[f"load generator (driver)|{os.getpid()}"] = me
        samples.append({"t": round(t, 2), "issued": dict(counting.issued), "procs": procs})

    take_sample()
    load = asyncio.create_task(
        run_load(
            url + "/v1", model, counting,
            concurrency=opts.clients,
            max_requests=opts.max_requests,
            max_duration_s=opts.minutes * 60.0,
            extra_body={"truncate": True},
            timeout_s=opts.request_timeout_s,
            progress=False,
            label="soak",
        )
    )
    next_sample = t0 + opts.sample_s
    next_pid_check = t0 + 30.0
    last_report = t0
    while not load.done():
        await asyncio.wait({load}, timeout=max(0.0, next_sample - time.perf_counter()))
        now = time.perf_counter()
        if now >= next_pid_check and not load.done():
            new, _ = await asyncio.to_thread(find_serve_pids)
            if new != pids:
                log(f"process set changed: {pids} → {new}")
                pids = new
                pid_history.append({"t": round(now - t0, 2), "pids": new})
            next_pid_check = now + 30.0
        if now >= next_sample:
            take_sample()
            next_sample += opts.sample_s
            while next_sample < now:
                next_sample += opts.sample_s
        if now - last_report >= 30.0:
            last_report = now
            s = samples[-1]
            rss = ", ".join(f"{k.split('|')[0]} {v['VmRSS'] / 1024:.0f}" for k, v in s["procs"].items())
            log(f"t={s['t']:.0f}s issued {sum(s['issued'].values())} {s['issued']}; RSS MB: {rss}")
    result = load.result()
    take_sample()
    return {"result": result, "samples": samples, "pid_history": pid_history, "pid_source": pid_source}


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def _fit(ts_min: np.ndarray, mb: np.ndarray) -> tuple[float, float, float]:
    """(slope MB/min, its standard error, residual std MB) of a least-squares line."""
    if len(ts_min) < 3 or np.ptp(ts_min) == 0:
        return float("nan"), float("nan"), float("nan")
    slope, intercept = np.polyfit(ts_min, mb, 1)
    resid = mb - (slope * ts_min + intercept)
    dof = len(ts_min) - 2
    resid_std = float(np.sqrt(np.sum(resid**2) / dof)) if dof > 0 else float("nan")
    se = resid_std / float(np.sqrt(np.sum((ts_min - ts_min.mean()) ** 2)))
    return float(slope), float(se), resid_std


def analyse(samples: list[dict], opts, requests_per_min: float) -> dict:
    series: dict[str, dict] = {}
    for s in samples:
        for key, mem in s["procs"].items():
            entry = series.setdefault(key, {"t": [], "rss_kb": [], "anon_kb": []})
            entry["t"].append(s["t"])
            entry["rss_kb"].append(mem["VmRSS"])
            entry["anon_kb"].append(mem.get("RssAnon", 0))
    warm_s = opts.warmup_min * 60.0
    T = opts.threshold_mb_min
    out = {}
    for key, e in series.items():
        role, pid = key.split("|")
        t = np.array(e["t"])
        rss = np.array(e["rss_kb"]) / 1024.0
        anon = np.array(e["anon_kb"]) / 1024.0
        post = t >= warm_s
        info = {
            "role": role,
            "pid": int(pid),
            "samples": len(t),
            "first_seen_s": float(t[0]),
            "last_seen_s": float(t[-1]),
            "rss_start_mb": round(float(rss[0]), 1),
            "rss_peak_mb": round(float(rss.max()), 1),
            "rss_end_mb": round(float(rss[-1]), 1),
        }
        if post.sum() >= 6:
            tp, rp, ap = t[post] / 60.0, rss[post], anon[post]
            slope, se, noise = _fit(tp, rp)
            anon_slope, anon_se, _ = _fit(tp, ap)
            half = tp <= (tp[0] + tp[-1]) / 2
            slope_1, _, _ = _fit(tp[half], rp[half])
            slope_2, _, _ = _fit(tp[~half], rp[~half])
            edge = max(1, int(round(30.0 / opts.sample_s)))  # 30 s at each end of the window
            at_warm, at_end = float(np.mean(rp[:edge])), float(np.mean(rp[-edge:]))
            window_min = float(tp[-1] - tp[0])
            net = at_end - at_warm
            # Above the threshold, distinguishable from noise (2 standard errors), and confirmed by
            # the net growth between the two ends of the window.
            growing = slope > T and slope - 2 * se > 0 and net > T * window_min / 2
            sustained = slope_2 > T / 2
            if growing and sustained:
                verdict = "LEAK SUSPECT"
            elif growing:
                verdict = "step, then flat (not sustained)"
            else:
                verdict = "flat"
            info.update(
                rss_after_warmup_mb=round(at_warm, 1),
                rss_at_end_mb=round(at_end, 1),
                net_growth_mb=round(net, 1),
                window_min=round(window_min, 2),
                slope_mb_per_min=round(slope, 3),
                slope_stderr_mb_per_min=round(se, 3),
                slope_first_half_mb_per_min=round(slope_1, 3),
                slope_second_half_mb_per_min=round(slope_2, 3),
                residual_std_mb=round(noise, 2),
                anon_slope_mb_per_min=round(anon_slope, 3),
                kb_per_request=round(slope * 1024 / requests_per_min, 2) if requests_per_min else None,
                verdict=verdict,
            )
        else:
            info["verdict"] = "too few post-warm-up samples"
        out[key] = info
    return {"per_process": out, "series": series}


def role_sort_key(key: str) -> tuple:
    role = key.split("|")[0]
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), key)


def plot(path: Path, analysis: dict, samples: list[dict], opts, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return False
    keys = sorted(analysis["series"], key=role_sort_key)
    n = len(keys) + 1
    cols = 2
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.8 * rows), squeeze=False)
    warm = opts.warmup_min
    for ax, key in zip(axes.flat, keys):
        e, info = analysis["series"][key], analysis["per_process"][key]
        t = np.array(e["t"]) / 60.0
        rss = np.array(e["rss_kb"]) / 1024.0
        anon = np.array(e["anon_kb"]) / 1024.0
        ax.plot(t, rss, ".-", ms=3, lw=1, label="RSS")
        ax.plot(t, anon, ".-", ms=2, lw=0.8, alpha=0.6, label="RssAnon")
        if "slope_mb_per_min" in info:
            post = t >= warm
            tp = t[post]
            slope = info["slope_mb_per_min"]
            intercept = float(np.mean(rss[post]) - slope * np.mean(tp))
            ax.plot(tp, slope * tp + intercept, "r--", lw=1, label=f"fit {slope:+.2f} MB/min")
        ax.axvspan(0, warm, color="0.9", zorder=0)
        ax.set_title(f"{key.replace('|', ' pid ')} — {info['verdict']}", fontsize=9)
        ax.set_xlabel("minutes")
        ax.set_ylabel("MB")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    ax = axes.flat[len(keys)]
    t = np.array([s["t"] for s in samples])
    for tag in ("search", "bulk"):
        counts = np.array([s["issued"].get(tag, 0) for s in samples], dtype=float)
        dt = np.diff(t)
        rate = np.diff(counts) / np.where(dt > 0, dt, np.nan)
        ax.plot(t[1:] / 60.0, rate, ".-", ms=3, lw=1, label=f"{tag} requests/s")
    ax.axvspan(0, warm, color="0.9", zorder=0)
    ax.set_title("load: requests issued per second (closed loop)", fontsize=9)
    ax.set_xlabel("minutes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for extra in list(axes.flat)[len(keys) + 1:]:
        extra.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_markdown(path: Path, report: dict, opts) -> None:
    s = report["summary"]
    lat = s["latency"]
    by_tag = s.get("latency_by_tag", {})
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    lines = [
        "# Soak test: memory of every Serve process under steady mixed load",
        "",
        f"Generated by `{report['command']}` on {report['generated']} ({report['machine']}). "
        f"Every sample: `{Path(opts.out).name}.json`; plot: `{Path(opts.out).name}.png`.",
        "",
        "## Setup",
        "",
        f"- deploy/local.yaml deployed as `serve run` does, on our own Ray instance ({report['ray_cpus']} CPUs), "
        f"port {report['port']} of 127.0.0.1; processes found with {report['pid_source']}.",
        f"- Load: `bench.loadgen.run_load`, {opts.clients} closed-loop clients for {opts.minutes:g} min; "
        f"{100 * (1 - opts.bulk_share):.0f} % one query of 5–15 words, {100 * opts.bulk_share:.0f} % "
        f"{opts.docs_per_bulk} documents of 20–300 words; `truncate: true`, base64; every text distinct.",
        f"- RSS (VmRSS) and RssAnon from /proc/<pid>/status every {opts.sample_s:g} s. Warm-up: the first "
        f"{opts.warmup_min:g} min (grey in the plot); leak fit over the rest.",
        f"- Verdict: **LEAK SUSPECT** when the post-warm-up slope > {opts.threshold_mb_min:g} MB/min and > 2 standard "
        "errors, the net growth "
        f"(mean of the last 30 s − mean of the first 30 s after warm-up) > half of what that slope implies, "
        f"and the second half of the window still grows at > {opts.threshold_mb_min / 2:g} MB/min. "
        f"{opts.threshold_mb_min:g} MB/min = {opts.threshold_mb_min * 1440 / 1024:.1f} GB/day: a replica would die "
        "within days; slower growth is below what a run of minutes can tell from allocator steps "
        "(see the residual noise and slope ± 2·SE columns).",
        "",
        "## Load",
        "",
        "| requests sent | ok | failed | failures | requests/s | texts/s | tokens/s | p50 ms | p99 ms | max ms |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| {s['requests']} | {s['ok']} | {s['failed']} | {s['failures'] or '—'} | {s['requests_per_s'] or 0:.1f} | "
        f"{s['texts_per_s'] or 0:.1f} | {s['tokens_per_s'] or 0:.0f} | {ms(lat['p50_s'])} | {ms(lat['p99_s'])} | "
        f"{ms(lat['max_s'])} |",
        "",
    ]
    if by_tag:
        lines += ["| kind | requests | p50 ms | p90 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
        for tag, l in by_tag.items():
            lines.append(f"| {tag} | {l['n']} | {ms(l['p50_s'])} | {ms(l['p90_s'])} | {ms(l['p99_s'])} | {ms(l['max_s'])} |")
        lines.append("")
    cpu = report.get("cpu") or {}
    if cpu:
        roles = ", ".join(f"{r} {v:.2f}" for r, v in cpu.get("cores_by_role", {}).items() if v >= 0.01)
        lines += [
            f"CPU (cores, whole load phase): ours {cpu.get('ours_cores', 0):.2f} ({roles}); "
            f"other people's processes {cpu.get('foreign_cores', 0):.2f}.",
            "",
        ]
    lines += [
        "## Memory per process",
        "",
        "| process | pid | RSS start MB | after warm-up MB | end MB | peak MB | net growth MB | slope MB/min (± 2·SE) "
        "| 1st / 2nd half MB/min | RssAnon slope MB/min | residual noise MB | slope per request, KB | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(report["per_process"], key=role_sort_key):
        p = report["per_process"][key]
        if "slope_mb_per_min" not in p:
            lines.append(f"| {p['role']} | {p['pid']} | {p['rss_start_mb']} | | {p['rss_end_mb']} | {p['rss_peak_mb']} "
                         f"| | | | | | | {p['verdict']} |")
            continue
        lines.append(
            f"| {p['role']} | {p['pid']} | {p['rss_start_mb']} | {p['rss_after_warmup_mb']} | {p['rss_at_end_mb']} | "
            f"{p['rss_peak_mb']} | {p['net_growth_mb']:+.1f} | {p['slope_mb_per_min']:+.2f} (± "
            f"{2 * p['slope_stderr_mb_per_min']:.2f}) | {p['slope_first_half_mb_per_min']:+.2f} / "
            f"{p['slope_second_half_mb_per_min']:+.2f} | {p['anon_slope_mb_per_min']:+.2f} | {p['residual_std_mb']:.2f} | "
            f"{p['kb_per_request']} | {p['verdict']} |"
        )
    lines += [
        "",
        "The load generator (this driver) is listed for reference only: it shares the machine, not the service.",
        "",
        "## Verdict",
        "",
        f"- Failed requests: **{s['failed']}** of {s['requests']} ({'PASS' if s['failed'] == 0 else 'FAIL'}).",
        f"- Leak suspects among the service's processes: **{', '.join(report['leak_suspects']) or 'none'}** "
        f"({'PASS' if not report['leak_suspects'] else 'FAIL'}).",
        f"- Process set stable (no replica replaced during the run): "
        f"{'yes' if len(report['pid_history']) == 1 else 'no: ' + str(report['pid_history'])}.",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--bulk-share", type=float, default=0.5, help="fraction of requests that are 64-document bulk")
    p.add_argument("--docs-per-bulk", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-min", type=float, default=1.0)
    p.add_argument("--threshold-mb-min", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=200_000, help="hard cap on requests (the duration usually ends it)")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's logical CPUs (default: detected, as `serve run`)")
    p.add_argument("--out", default=str(RESULTS / "soak"), help="path prefix of .md/.json/.png")
    p.add_argument("--from-json", default=None,
                   help="no run: redo the analysis (--warmup-min, --threshold-mb-min) of a saved soak .json")
    opts = p.parse_args(argv)
    if opts.minutes <= 0 or opts.minutes > 120 or opts.clients < 1:
        p.error("--minutes must be in (0, 120] and --clients ≥ 1: runs are always bounded")
    return opts


SERVICE_ROLES = {"Serve proxy", "Ingress", "Tokenizer", "Embedder", "Serve controller"}


def finish(base: dict, samples: list[dict], opts, out: Path) -> dict:
    """Leak analysis, plot, markdown and json from a run's samples (also used by --from-json)."""
    import json

    summary = base["summary"]
    wall_s = base.get("load_wall_s") or summary.get("wall_s") or 0.0
    rpm = summary["requests"] / (wall_s / 60.0) if wall_s else 0.0
    analysis = analyse(samples, opts, rpm)
    suspects = [k.replace("|", " pid ") for k, p in analysis["per_process"].items()
                if p["role"] in SERVICE_ROLES and p["verdict"] == "LEAK SUSPECT"]
    report = dict(base, per_process=analysis["per_process"], leak_suspects=suspects,
                  passed=summary["failed"] == 0 and not suspects)
    report["analysis_options"] = {k: getattr(opts, k) for k in ("warmup_min", "threshold_mb_min")}
    title = (f"Soak: deploy/local.yaml, {opts.clients} clients mixed load, {opts.minutes:g} min — "
             f"{summary['requests']} requests, {summary['failed']} failed")
    plot(out.with_suffix(".png"), analysis, samples, opts, title)
    out.with_suffix(".json").write_text(json.dumps(dict(report, samples=samples), indent=1, default=str))
    write_markdown(out.with_suffix(".md"), report, opts)
    log(f"requests {summary['requests']}, failed {summary['failed']} {summary['failures']}; "
        f"leak suspects: {suspects or 'none'}")
    for key in sorted(analysis["per_process"], key=role_sort_key):
        p = analysis["per_process"][key]
        print(f"{key:40s} start {p['rss_start_mb']:7.1f} MB  end {p['rss_end_mb']:7.1f} MB  "
              f"slope {p.get('slope_mb_per_min', float('nan')):+.2f} MB/min  {p['verdict']}")
    return report


def reanalyse(opts) -> int:
    """--from-json: redo the analysis and the files from a saved run (its load options kept)."""
    import json

    saved = json.loads(Path(opts.from_json).read_text())
    samples = saved.pop("samples")
    for key in ("minutes", "clients", "bulk_share", "docs_per_bulk", "sample_s"):
        setattr(opts, key, saved["options"][key])
    base = {k: v for k, v in saved.items()
            if k not in ("per_process", "leak_suspects", "passed", "analysis_options")}
    report = finish(base, samples, opts, Path(opts.out))
    return 0 if report["passed"] else 1


def main(argv=None) -> int:
    opts = parse_args(argv)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if opts.from_json:
        return reanalyse(opts)
    wall0 = time.monotonic()
    hard_deadline(opts.minutes * 60 + 300, "the soak")
    temp_dir = None
    try:
        import ray

        from bench.procstats import CpuMeter

        doc = read_config()
        model = doc["applications"][0]["args"]["models"][0]["name"]
        temp_dir = start_ray(opts.num_cpus, dashboard=True)
        ray_cpus = ray.cluster_resources().get("CPU")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"Ray up ({ray_cpus} CPUs, temp {temp_dir}); deploying {CONFIG.relative_to(REPO)} on {url}")
        deploy_config(doc, port)
        wait_healthy(url)
        log(f"deployed and healthy after {time.monotonic() - wall0:.0f} s; {opts.minutes:g} min of load begins")
        meter = CpuMeter([os.getpid()], self_role="load generator (driver)").start()
        run = asyncio.run(soak(opts, url, model))
        cpu = meter.stop()
        result = run["result"]
        base = {
            "command": "python -m bench.soak_scenario" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip(),
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{os.cpu_count()} CPUs shared with other jobs; Ray {ray.__version__}",
            "ray_cpus": ray_cpus,
            "port": port,
            "options": {k: v for k, v in vars(opts).items()},
            "pid_source": run["pid_source"],
            "pid_history": run["pid_history"],
            "summary": summarize(result),
            "stopped_by": result.stopped_by,
            "load_wall_s": result.wall_s,
            "cpu": cpu,
        }
        report = finish(base, run["samples"], opts, out)
        log(f"wrote {out}.{{md,json,png}} ({time.monotonic() - wall0:.0f} s in all)")
        return 0 if report["passed"] else 1
    finally:
        clear_deadline()
        stop_ray(temp_dir)


if __name__ == "__main__":
    sys.exit(main())
