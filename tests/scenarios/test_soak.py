"""Soak: steady mixed load for minutes, watching every Serve process's memory for a leak.

    python -m tests.scenarios.test_soak                 # 30 min of load, half of it bulk; bench/results/soak.{md,json,png}
    python -m tests.scenarios.test_soak --minutes 1 --out bench/.work/soak    # smoke run

deploy/local.yaml served as `serve run` serves it (testkit/servers.py's ServedSystem: a fresh
private Ray instance, free ports). `--clients` closed-loop clients (testkit/loadgen.py) send one
query (5-15 words) or, for `--bulk-share` of the requests, 64 documents of 20-300 words
(`truncate: true`), every text distinct and none kept in memory. Every `--sample-s` the RSS
and RssAnon of the proxy, controller and every replica (found in the service's process tree
by command line, anew at each sample, so a replaced replica shows as a new pid) and of this
driver. Leak verdict per process after `--warmup-min`: least-squares slope in MB/min with its
standard error, net growth between the first and last 30 s, and each half's slope; flagged
when the slope is over `--threshold-mb-min` (5 MB/min = 7 GB/day), beyond 2 standard errors,
confirmed by the net growth, and still growing in the second half. The target: every Serve
process's slope over the second half at most `--second-half-max-mb-min` (1 MB/min), long
enough after start-up that warm-up steps are over, hence 30 minutes by default. Exits 1 on any
failed request, flagged process or process over that target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from testkit import harness
from testkit.loadgen import run_load, summarize
from testkit.procstats import CpuMeter, roles_under
from testkit.servers import ServedSystem
from testkit.workloads import Workload

ROLE_ORDER = ("Serve proxy", "Ingress", "Tokenizer", "Embedder", "Serve controller", "load generator (driver)")
SERVICE_ROLES = set(ROLE_ORDER[:-1])


def memory_kb(pid: int) -> dict[str, int] | None:
    """VmRSS and RssAnon (kB) from /proc/<pid>/status; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            out = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "RssAnon")}
    except OSError:
        return None
    return out if "VmRSS" in out else None


def processes(root: int) -> dict[str, int]:
    """{"role|pid": pid} of the service's processes (and this driver)."""
    out = {f"load generator (driver)|{os.getpid()}": os.getpid()}
    return out | {f"{role}|{pid}": pid for role, pid in roles_under(root) if role in SERVICE_ROLES}


def _fit(t: np.ndarray, mb: np.ndarray) -> tuple[float, float, float]:
    """(slope MB/min, its standard error, residual std MB) of a least-squares line."""
    if len(t) < 3 or np.ptp(t) == 0:
        return float("nan"), float("nan"), float("nan")
    slope, intercept = np.polyfit(t, mb, 1)
    noise = float(np.sqrt(np.sum((mb - slope * t - intercept) ** 2) / (len(t) - 2)))
    return float(slope), noise / float(np.sqrt(np.sum((t - t.mean()) ** 2))), noise


def analyse(samples: list[dict], opts, requests_per_min: float) -> dict[str, dict]:
    series: dict[str, list] = {}
    for s in samples:
        for key, mem in s["procs"].items():
            series.setdefault(key, []).append((s["t"], mem["VmRSS"] / 1024, mem.get("RssAnon", 0) / 1024))
    out, T = {}, opts.threshold_mb_min
    for key, rows in series.items():
        t, rss, anon = (np.array(c) for c in zip(*rows))
        info = {"role": key.split("|")[0], "pid": int(key.split("|")[1]), "samples": len(t),
                "rss_start_mb": round(rss[0], 1), "rss_peak_mb": round(rss.max(), 1), "rss_end_mb": round(rss[-1], 1)}
        post = t >= opts.warmup_min * 60
        if post.sum() < 6:
            out[key] = {**info, "verdict": "too few post-warm-up samples"}
            continue
        tp, rp = t[post] / 60, rss[post]
        slope, se, noise = _fit(tp, rp)
        half = tp <= (tp[0] + tp[-1]) / 2
        edge = max(1, round(30 / opts.sample_s))  # 30 s at each end of the window
        net, window = float(rp[-edge:].mean() - rp[:edge].mean()), float(tp[-1] - tp[0])
        # Above the threshold, beyond noise (2 standard errors), confirmed by the net growth.
        growing = slope > T and slope - 2 * se > 0 and net > T * window / 2
        second = _fit(tp[~half], rp[~half])[0]
        out[key] = {**info, "rss_after_warmup_mb": round(float(rp[:edge].mean()), 1), "net_growth_mb": round(net, 1),
                    "slope_mb_per_min": round(slope, 3), "slope_stderr_mb_per_min": round(se, 3),
                    "slope_halves_mb_per_min": [round(_fit(tp[half], rp[half])[0], 3), round(second, 3)],
                    "anon_slope_mb_per_min": round(_fit(tp, anon[post])[0], 3), "residual_std_mb": round(noise, 2),
                    "kb_per_request": round(slope * 1024 / requests_per_min, 2) if requests_per_min else None,
                    "verdict": "LEAK SUSPECT" if growing and second > T / 2 else
                    "step, then flat (not sustained)" if growing else "flat"}
    return out


def order(key: str) -> tuple:
    role = key.split("|")[0]
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), key)


def plot(path: Path, samples: list[dict], per_process: dict, records, opts, title: str) -> None:
    plt = harness.pyplot()
    if plt is None:
        return
    keys = sorted(per_process, key=order)
    rows = (len(keys) + 2) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys + ["load"]):
        ax.axvspan(0, opts.warmup_min, color="0.9", zorder=0)
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
        if key == "load":
            for tag in ("search", "bulk"):
                starts = [r.start_s / 60 for r in records if r.tag == tag]
                counts, edges = np.histogram(starts, bins=max(1, int(opts.minutes * 6)))
                ax.plot(edges[:-1], counts / (np.diff(edges) * 60), ".-", ms=3, lw=1, label=f"{tag} requests/s")
            ax.set_title("load: requests sent per second (closed loop)", fontsize=9)
            ax.legend(fontsize=7)
            continue
        t, rss, anon = zip(*[(s["t"] / 60, s["procs"][key]["VmRSS"] / 1024, s["procs"][key].get("RssAnon", 0) / 1024)
                             for s in samples if key in s["procs"]])
        ax.plot(t, rss, ".-", ms=3, lw=1, label="RSS")
        ax.plot(t, anon, ".-", ms=2, lw=0.8, alpha=0.6, label="RssAnon")
        info = per_process[key]
        if "slope_mb_per_min" in info:
            tp = np.array([x for x in t if x >= opts.warmup_min])
            mid = np.mean([r for x, r in zip(t, rss) if x >= opts.warmup_min])
            ax.plot(tp, mid + info["slope_mb_per_min"] * (tp - tp.mean()), "r--", lw=1,
                    label=f"fit {info['slope_mb_per_min']:+.2f} MB/min")
        ax.set_title(f"{key.replace('|', ' pid ')} — {info['verdict']}", fontsize=9)
        ax.set_ylabel("MB")
        ax.legend(fontsize=7, loc="lower right")
    for extra in list(axes.flat)[len(keys) + 1:]:
        extra.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rep: dict, opts) -> list[str]:
    s, name = rep["summary"], Path(opts.out).name
    lat, cpu = s["latency"], rep["cpu"]
    rows = []
    for key in sorted(rep["per_process"], key=order):
        p = rep["per_process"][key]
        if "slope_mb_per_min" not in p:
            rows.append([p["role"], p["pid"], p["rss_start_mb"], None, p["rss_end_mb"], p["rss_peak_mb"]] + [None] * 6
                        + [p["verdict"]])
            continue
        rows.append([p["role"], p["pid"], p["rss_start_mb"], p["rss_after_warmup_mb"], p["rss_end_mb"],
                     p["rss_peak_mb"], f"{p['net_growth_mb']:+.1f}",
                     f"{p['slope_mb_per_min']:+.2f} (± {2 * p['slope_stderr_mb_per_min']:.2f})",
                     " / ".join(f"{x:+.2f}" for x in p["slope_halves_mb_per_min"]),
                     f"{p['anon_slope_mb_per_min']:+.2f}", p["residual_std_mb"], p["kb_per_request"], p["verdict"]])
    return [
        *harness.header("Soak test: memory of every Serve process under steady mixed load", rep,
                f"Every sample: `{name}.json`; plot: `{name}.png`. How it works: tests/scenarios/README.md."),
        f"- deploy/local.yaml as `serve run` deploys it, on a fresh Ray instance of its own "
        f"({opts.num_cpus or 'detected'} CPUs).",
        f"- Load: {opts.clients} closed-loop clients for {opts.minutes:g} min; {100 * (1 - opts.bulk_share):.0f} % one "
        f"query of 5–15 words, {100 * opts.bulk_share:.0f} % 64 documents of 20–300 words; `truncate: true`, "
        f"base64; every text distinct. RSS and RssAnon every {opts.sample_s:g} s; warm-up {opts.warmup_min:g} min "
        f"(grey); leak threshold {opts.threshold_mb_min:g} MB/min.", "",
        *harness.md_table(["requests", "ok", "failed", "failures", "requests/s", "texts/s", "p50 ms", "p99 ms",
                           "max ms"], [[s["requests"], s["ok"], s["failed"], s["failures"] or None,
                                        f"{s['requests_per_s'] or 0:.1f}", f"{s['texts_per_s'] or 0:.1f}",
                                        *(harness.ms(lat[k]) for k in ("p50_s", "p99_s", "max_s"))]]),
        *harness.md_table(["kind", "requests", "p50 ms", "p99 ms", "max ms"], [
            [tag, v["n"], harness.ms(v["p50_s"]), harness.ms(v["p99_s"]), harness.ms(v["max_s"])]
            for tag, v in s.get("latency_by_tag", {}).items()]),
        "CPU (cores, whole load): " + ", ".join(f"{r} {v:.2f}" for r, v in cpu["cores_by_role"].items() if v >= 0.01)
        + f"; other people's processes {cpu['foreign_cores']:.2f}.", "",
        "## Memory per process", "",
        *harness.md_table(["process", "pid", "RSS start MB", "after warm-up MB", "end MB", "peak MB", "net growth MB",
                           "slope MB/min (± 2·SE)", "1st / 2nd half MB/min", "RssAnon slope MB/min",
                           "residual noise MB", "slope per request, KB", "verdict"], rows),
        "The load generator (this driver) is listed for reference only: it shares the machine, not the service.", "",
        f"- Failed requests: **{s['failed']}** of {s['requests']} ({'PASS' if s['failed'] == 0 else 'FAIL'}).",
        f"- Leak suspects among the service's processes: **{', '.join(rep['leak_suspects']) or 'none'}** "
        f"({'PASS' if not rep['leak_suspects'] else 'FAIL'}).",
        f"- Serve processes whose second-half slope exceeds {opts.second_half_max_mb_min:g} MB/min: "
        f"**{', '.join(rep['over_second_half_target']) or 'none'}** "
        f"({'PASS' if not rep['over_second_half_target'] else 'FAIL'}).",
        f"- Process set stable (no replica replaced): {'yes' if rep['stable_processes'] else 'no'}.",
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="load duration (default 30)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--bulk-share", type=float, default=0.5, help="fraction of requests that are 64-document bulk")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-min", type=float, default=1.0)
    p.add_argument("--threshold-mb-min", type=float, default=5.0)
    p.add_argument("--second-half-max-mb-min", type=float, default=1.0,
                   help="the target: each Serve process's RSS slope over the second half at most this")
    p.add_argument("--max-requests", type=int, default=200_000, help="a cap on requests (the duration ends it first)")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's logical CPUs (default: detected, as `serve run`)")
    p.add_argument("--out", default=str(harness.RESULTS / "soak"), help="path prefix of .md/.json/.png")
    opts = p.parse_args(argv)
    if not 0 < opts.minutes <= 120 or opts.clients < 1:
        p.error("--minutes must be in (0, 120] and --clients ≥ 1: runs are always bounded")
    return opts


async def soak(opts, served: ServedSystem, model: str):
    t0, stop, samples = time.perf_counter(), asyncio.Event(), []

    def sample() -> dict:
        procs = {key: mem for key, pid in processes(served.pid).items() if (mem := memory_kb(pid))}
        return {"procs": procs}

    sampler = asyncio.create_task(harness.sample_every(opts.sample_s, sample, stop, t0, samples))
    wl = Workload("soak", opts.clients, "", opts.seed, bulk_share=opts.bulk_share, cache=False)
    result = await run_load(served.base_url, model, wl, concurrency=opts.clients, max_requests=opts.max_requests,
                            max_duration_s=opts.minutes * 60, extra_body={"truncate": True},
                            timeout_s=opts.request_timeout_s, t0=t0, progress=False, label="soak")
    stop.set()
    await sampler
    return result, samples


def main(argv=None) -> int:
    opts = parse_args(argv)
    wall0, m = time.monotonic(), harness.machine()
    served = ServedSystem(harness.LOCAL_CONFIG, num_cpus=opts.num_cpus)
    try:
        with harness.deadline(opts.minutes * 60 + 300, "the soak"):
            model = harness.read_config()["applications"][0]["args"]["models"][0]["name"]
            served.start()
            harness.log(f"serving on {served.base_url}; {opts.minutes:g} min of load begins")
            meter = CpuMeter([served.pid], self_role="load generator (driver)").start()
            result, samples = asyncio.run(soak(opts, served, model))
            cpu = meter.stop()
    finally:
        served.stop()
    summary = summarize(result)
    per_process = analyse(samples, opts, summary["requests"] / (result.wall_s / 60) if result.wall_s else 0.0)
    suspects = [k.replace("|", " pid ") for k, p in per_process.items()
                if p["role"] in SERVICE_ROLES and p["verdict"] == "LEAK SUSPECT"]
    over_target = [k.replace("|", " pid ") for k, p in per_process.items() if p["role"] in SERVICE_ROLES
                   and p.get("slope_halves_mb_per_min", [0, 0])[1] > opts.second_half_max_mb_min]
    rep = {**harness.stamp("tests.scenarios.test_soak", argv, m, wall0), "options": vars(opts), "summary": summary,
           "cpu": cpu, "per_process": per_process, "leak_suspects": suspects, "over_second_half_target": over_target,
           "stable_processes": len({frozenset(s["procs"]) for s in samples}) <= 1}
    out = Path(opts.out)
    plot(out.with_suffix(".png"), samples, per_process, result.records, opts,
         f"Soak: deploy/local.yaml, {opts.clients} clients mixed load, {opts.minutes:g} min — "
         f"{summary['requests']} requests, {summary['failed']} failed")
    harness.write(out, {**rep, "samples": samples}, markdown(rep, opts))
    for key in sorted(per_process, key=order):
        p = per_process[key]
        print(f"{key:40s} start {p['rss_start_mb']:7.1f} MB  end {p['rss_end_mb']:7.1f} MB  "
              f"slope {p.get('slope_mb_per_min', float('nan')):+.2f} MB/min  {p['verdict']}")
    return 0 if summary["failed"] == 0 and not suspects and not over_target else 1


@pytest.mark.scenario
def test_soak():
    assert main([]) == 0, "a check failed: see bench/results/soak.md"


if __name__ == "__main__":
    sys.exit(main())
