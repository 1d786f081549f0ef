"""How many CPU cores a GPU's front end needs: SFR-shaped traffic against a simulated GPU.

    python -m bench.capacity            # both paths, every workload, an offered-load sweep (~20 min)
    python -m bench.capacity --quick    # a smoke run (< 3 min): proxy path, short phases, one offered load;
                                        # writes to bench/.work/capacity/, never to bench/results

The service runs as deployed, with the production config's model settings (deploy/config.yaml's
SFR entry: 16384-token passes, 4096-token batch passes, request classes, cache, API keys on), on
this machine's CPUs, its Embedder over the simulated GPU (serve_app/engine/simulated_gpu.py: an
H200's time per pass at the bf16 rate, 4096-dim vectors) and SFR's real tokenizer
(testkit/sfr_tokenizer.py). Per workload and path (Serve's proxy; direct ingress):

* CPU seconds per request by process role (proxy, Ingress, Tokenizer, Embedder host side), from
  a closed-loop run: each role's CPU time over the run divided by the requests served;
* simulated-GPU utilisation (its busy time over the wall time) and latency, at offered loads
  (open loop) around the rate the front sustained;
* then, per workload, at the bf16 and FP8 rates: the CPU cores that keep one GPU >= 90 % busy,
  and how many GPUs' worth of traffic one 16-core node's CPUs carry.

The GPU's time per request assumes full passes at saturation: the padded tokens a request cost
in the run over the GPU's rate, plus each full pass's fixed cost.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml

from serve_app.engine.spec import ModelSpec
from testkit import workloads as wls
from testkit.harness import (
    LOCAL_CONFIG,
    REPO,
    RESULTS,
    WORK,
    log,
    machine,
    machine_line,
    md_table,
    pyplot,
    stamp,
    without_direct_ingress,
    write,
)
from testkit.loadgen import WARMUP_OFFSET, arrivals, run_load_sync, summarize
from testkit.procstats import CpuMeter
from testkit.servers import ServedSystem

MODEL = "SFR-Embedding-Mistral"
PRODUCTION_CONFIG = REPO / "deploy" / "config.yaml"
TARGET_UTILISATION = 0.9
NODE_CORES = 16
DOC_TOKENS = 512  # the bulk documents' length in SFR tokens
PHASE_INDICES = 50_000  # requests a phase may send
FRONT_ROLES = ("Serve proxy", "Ingress", "Tokenizer")
ROLES = FRONT_ROLES + ("Embedder",)
# Where the FP8 factor comes from (serve_app/engine/simulated_gpu.py states the presets).
RATE_SOURCES = (
    "bf16: ~14.1 GFLOP per SFR token at the ~790 TFLOP/s a bf16 matmul reached on an H200 (~56k tokens/s), "
    "plus ~3 ms per pass to stream 14.2 GB of weights from HBM. FP8: 1.5x bf16's rate (torchao reports "
    "~1.5x for compiled float8 training/inference linears; vLLM's Llama-3.1-8B prefill on H100, 31k bf16 vs "
    "45k FP8 tokens/s, is 1.45x) and half the weight bytes (1.5 ms per pass). Replace both with "
    "bench/results/gpu/ once a GPU run exists."
)


@dataclass(frozen=True)
class Query(wls.Request):
    """A request whose texts are search queries: sent with input_type=query, so that they get
    SFR's instruction (~32 tokens a query, as in production)."""

    body: dict = field(default_factory=lambda: {"input_type": "query"})


@dataclass
class Queries:
    """A workload's requests, its search-like ones sent as queries; with `per_request` > 1, clients
    that batch that many queries in one request."""

    base: wls.Workload
    concurrency: int
    per_request: int = 1

    def __call__(self, index: int) -> wls.Request:
        if self.per_request > 1:
            texts = tuple(self.base(index * self.per_request + k).texts[0] for k in range(self.per_request))
            return Query(index, texts, f"search-x{self.per_request}")
        request = self.base(index)
        return Query(request.index, request.texts, request.tag) if request.tag == "search" else request


def words_per_document(tokenizer, tokens: int) -> int:
    """Words of bench's prose that make `tokens` SFR tokens, on average (measured on samples)."""
    import random

    sample = [wls.make_document(random.Random(i), 200, 200) for i in range(20)]
    per_word = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"]) / (200 * 20)
    return max(1, round((tokens - 2) / per_word))


def workloads(doc_words: int) -> dict:
    docs = dict(doc_words=(doc_words, doc_words))
    search = wls.search()
    return {
        "search": Queries(search, search.concurrency),
        "bulk": Queries(wls.Workload("bulk", 8, f"64 documents of {DOC_TOKENS} SFR tokens per request",
                                     bulk_share=1.0, **docs), 8),
        "mixed": Queries(wls.Workload("mixed", 16, f"75 % one query, 25 % 64 documents of {DOC_TOKENS} tokens",
                                      bulk_share=0.25, **docs), 16),
        "search-x16": Queries(wls.search(seed=1), 8, per_request=16),  # not search's queries: no cache hits
    }


def service_config(model_dir: Path, keys_file: Path, stats_dir: Path, gpu: str, direct_ingress: bool) -> dict:
    """deploy/local.yaml's deployments (one replica each: this machine's cores) with
    deploy/config.yaml's model settings and API keys, the Embedder over the simulated GPU."""
    production = yaml.safe_load(PRODUCTION_CONFIG.read_text())["applications"][0]["args"]
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    app = config["applications"][0]
    model = copy.deepcopy(production["models"][0])
    model.update(source=str(model_dir), device="auto")
    model.pop("revision", None)
    app["args"] = {
        "models": [model],
        "auth": {"keys_file": str(keys_file)},
        # Not production's per-key rate limits: the load generator is one key at many times their rate.
        **{k: production[k] for k in ("limits", "priority", "cache") if k in production},
    }
    app["runtime_env"]["env_vars"]["EMBEDDINGS_SIMULATED_GPU"] = f"{gpu},stats_dir={stats_dir}"
    return config if direct_ingress else without_direct_ingress(config)


class GpuClock:
    """The simulated GPU's counters (all Embedder replicas of this run) between two reads."""

    def __init__(self, stats_dir: Path):
        self.stats_dir = stats_dir

    def read(self) -> tuple[int, float, int]:
        from serve_app.engine.simulated_gpu import read_stats

        totals = [0, 0.0, 0]
        for values in read_stats(self.stats_dir).values():
            totals = [a + b for a, b in zip(totals, values)]
        return tuple(totals)

    @staticmethod
    def delta(before, after) -> dict:
        passes, busy_s, padded = (a - b for a, b in zip(after, before))
        return {"passes": passes, "busy_s": busy_s, "padded_tokens": padded}


def run_phase(served: ServedSystem, clock: GpuClock, source, concurrency: int, duration_s: float, key: str,
              phase: int, rate: float | None = None) -> dict:
    """One load phase: closed loop (`rate` None) or open loop at `rate` requests/s. Each `phase`
    sends requests of its own (indices from phase * PHASE_INDICES), so none is a cache hit."""
    common = dict(concurrency=concurrency if rate is None else max(64, concurrency * 4),
                  extra_body={"truncate": True}, timeout_s=120.0, progress=False,
                  headers={"Authorization": f"Bearer {key}"})
    schedule = arrivals(lambda t: rate, duration_s) if rate else None
    meter, before = CpuMeter([served.pid]).start(), clock.read()
    result = run_load_sync(served.base_url, MODEL, source, max_requests=PHASE_INDICES, max_duration_s=duration_s,
                           arrivals=schedule, index_offset=phase * PHASE_INDICES, **common)
    summary = summarize(result)
    gpu = GpuClock.delta(before, clock.read())
    summary["cpu"] = meter.stop()
    summary["gpu"] = gpu | {"utilisation": gpu["busy_s"] / summary["cpu"]["wall_s"]}
    summary["offered_per_s"] = rate
    return summary


def cpu_per_request(phase: dict) -> dict:
    """CPU seconds per served request, by role (every Embedder deployment counts as `Embedder`)."""
    ok, wall = max(1, phase["ok"]), phase["cpu"]["wall_s"]
    out = dict.fromkeys(ROLES, 0.0)
    for role, cores in phase["cpu"]["cores_by_role"].items():
        name = "Embedder" if role.startswith("Embedder") else role
        if name in out:
            out[name] += cores * wall / ok
    return out


def gpu_seconds_per_request(phase: dict, gpu, max_batch_tokens: int) -> float:
    """At saturation: the padded tokens a request cost, at the GPU's rate, in full passes."""
    padded = phase["gpu"]["padded_tokens"] / max(1, phase["ok"])
    return padded / gpu.tokens_per_s + gpu.pass_ms / 1000 * padded / max_batch_tokens


def sizing(phase: dict, max_batch_tokens: int) -> dict:
    """Per GPU rate: cores for >= 90 % of one GPU, and GPUs' worth of traffic per 16-core node."""
    from serve_app.engine.simulated_gpu import PRESETS

    cpu = cpu_per_request(phase)
    front, total = sum(cpu[r] for r in FRONT_ROLES), sum(cpu.values())
    out = {"cpu_ms_per_request": {r: v * 1000 for r, v in cpu.items()}, "front_cpu_ms": front * 1000,
           "total_cpu_ms": total * 1000}
    for name, gpu in PRESETS.items():
        capacity = 1.0 / gpu_seconds_per_request(phase, gpu, max_batch_tokens) if phase["gpu"]["padded_tokens"] else None
        cores = TARGET_UTILISATION * capacity * total if capacity else None
        out[name] = {"gpu_requests_per_s": capacity, "cores_per_gpu": cores,
                     "gpus_per_16_core_node": NODE_CORES / cores if cores else None}
    return out


def prepare(work: Path) -> SimpleNamespace:
    """What every run serves and sends: an SFR-shaped model directory (SFR's real tokenizer; its tiny
    weights stay unused under the simulated GPU), one API key, and the workloads."""
    from transformers import AutoTokenizer

    from serve_app.api.auth import generate_key, hash_key
    from testkit.tiny_models import build_sfr_vocab_model

    model_dir = build_sfr_vocab_model(work / "sfr-vocab")
    key = generate_key()
    keys_file = work / "api_keys"
    keys_file.write_text(f"bench:{hash_key(key)}\n")
    sources = workloads(words_per_document(AutoTokenizer.from_pretrained(model_dir), DOC_TOKENS))
    return SimpleNamespace(model_dir=model_dir, key=key, keys_file=keys_file, sources=sources)


def start_service(run_dir: Path, setup: SimpleNamespace, direct: bool) -> tuple[ServedSystem, GpuClock, dict]:
    """The service on this path (proxy or direct ingress), started; its GPU clock and config."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    stats_dir = run_dir / "gpu-stats"
    config = service_config(setup.model_dir, setup.keys_file, stats_dir, "bf16", direct)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    served = ServedSystem(run_dir / "config.yaml")
    try:
        log(f"{run_dir.name}: service started ({served.start()['startup_s']:.0f} s)")
    except BaseException:
        served.stop()
        raise
    return served, GpuClock(stats_dir), config


def warm_up(served: ServedSystem, source, key: str, duration_s: float) -> None:
    run_load_sync(served.base_url, MODEL, source, concurrency=source.concurrency, max_requests=source.concurrency * 2,
                  max_duration_s=duration_s, index_offset=WARMUP_OFFSET, extra_body={"truncate": True},
                  progress=False, headers={"Authorization": f"Bearer {key}"})


def measure_path(path: str, direct: bool, setup: SimpleNamespace, opts) -> dict:
    served, clock, config = start_service(WORK / "capacity" / path, setup, direct)
    max_batch_tokens = ModelSpec.model_validate(config["applications"][0]["args"]["models"][0]).max_batch_tokens
    results = {}
    try:
        for name, source in setup.sources.items():
            warm_up(served, source, setup.key, min(5.0, opts.duration))
            closed = run_phase(served, clock, source, source.concurrency, opts.duration, setup.key, phase=0)
            sustained = closed["requests_per_s"] or 0.0
            log(f"{path} {name}: {sustained:.1f} req/s closed loop, GPU {closed['gpu']['utilisation']:.1%}")
            sweep = [run_phase(served, clock, source, source.concurrency, opts.duration, setup.key, phase=k,
                               rate=f * sustained)
                     for k, f in enumerate(opts.offered, start=1) if sustained > 0]
            results[name] = {"closed": closed, "sweep": sweep, "sizing": sizing(closed, max_batch_tokens)}
    finally:
        served.stop()
    return results


def render(res: dict) -> list[str]:
    lines = ["# Capacity: CPU cores per GPU for SFR traffic (simulated GPU)", "",
             f"`{res['command']}`, {res['generated']}; {machine_line(res['machine'])}; {res['wall_s']:.0f} s.", "",
             "\n\n".join(__doc__.split("\n\n")[2:]), "", f"GPU rates: {RATE_SOURCES}", ""]
    if res["quick"]:
        lines += ["**Quick run: a smoke test of the benchmark, not figures to size a deployment by.**", ""]
    for path, results in res["paths"].items():
        lines += [f"## {path}: CPU per request (ms) by role, closed loop", ""]
        rows = []
        for name, r in results.items():
            c, s = r["closed"], r["sizing"]
            rows.append([name, c["ok"], f"{c['requests_per_s']:.1f}", f"{c['gpu']['utilisation']:.1%}",
                         *(f"{s['cpu_ms_per_request'][role]:.2f}" for role in ROLES), f"{s['front_cpu_ms']:.2f}",
                         f"{c['latency']['p50_s'] * 1000:.0f} / {c['latency']['p99_s'] * 1000:.0f}"])
        lines += md_table(["workload", "requests", "req/s", "GPU busy", *ROLES, "front (proxy+Ingress+Tokenizer)",
                           "p50 / p99 ms"], rows)
        sweep_rows = [[name, f"{p['offered_per_s']:.1f}", f"{p['requests_per_s'] or 0:.1f}", f"{p['gpu']['utilisation']:.1%}",
                       f"{(p['latency']['p50_s'] or 0) * 1000:.0f} / {(p['latency']['p99_s'] or 0) * 1000:.0f}", p["failed"]]
                      for name, r in results.items() for p in r["sweep"]]
        if sweep_rows:
            lines += [f"### {path}: simulated-GPU utilisation vs offered load (open loop)", ""]
            lines += md_table(["workload", "offered req/s", "served req/s", "GPU busy", "p50 / p99 ms", "failed"],
                              sweep_rows)
    lines += [f"## Cores per GPU for >= {TARGET_UTILISATION:.0%} simulated-GPU utilisation", "",
              "Cores: proxy (on the proxy path), Ingress, Tokenizer and the Embedder's host side, per request, "
              f"times the requests/s that keep the GPU {TARGET_UTILISATION:.0%} busy. Node: what {NODE_CORES} cores "
              "carry, in GPUs' worth of traffic.", ""]
    rows = []
    for path, results in res["paths"].items():
        for name, r in results.items():
            s = r["sizing"]
            cell = lambda v, f="{:.1f}": "–" if v is None else f.format(v)  # noqa: E731
            rows.append([path, name, f"{s['total_cpu_ms']:.2f}",
                         *(cell(s[rate][k], f) for rate in ("bf16", "fp8")
                           for k, f in (("gpu_requests_per_s", "{:.0f}"), ("cores_per_gpu", "{:.1f}"),
                                        ("gpus_per_16_core_node", "{:.2f}")))])
    lines += md_table(["path", "workload", "CPU ms/request", "bf16: GPU req/s", "bf16: cores/GPU",
                       "bf16: GPUs per 16 cores", "FP8: GPU req/s", "FP8: cores/GPU", "FP8: GPUs per 16 cores"], rows)
    return lines


def plot(res: dict, out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (util, cpu) = plt.subplots(1, 2, figsize=(13, 5))
    for path, results in res["paths"].items():
        for name, r in results.items():
            sustained = r["closed"]["requests_per_s"] or 1.0
            points = sorted((p["offered_per_s"] / sustained, p["gpu"]["utilisation"] * 100) for p in r["sweep"])
            line, = util.plot([x for x, _ in points], [y for _, y in points], "o-", label=f"{name} ({path})")
            util.axhline(r["closed"]["gpu"]["utilisation"] * 100, color=line.get_color(), linestyle=":", linewidth=1)
    util.set(xlabel="offered load / the closed loop's requests/s (dotted: the closed loop)",
             ylabel="simulated GPU busy (%)", title="GPU utilisation vs offered load", ylim=(0, 100))
    util.legend(fontsize=7)
    entries = [(f"{name}\n{path}", r["sizing"]["cpu_ms_per_request"]) for path, results in res["paths"].items()
               for name, r in results.items()]
    labels = [e[0] for e in entries]
    bottoms = [0.0] * len(entries)
    for role in ROLES:
        values = [e[1][role] for e in entries]
        cpu.bar(labels, values, bottom=bottoms, label=role)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    cpu.set(ylabel="CPU ms per request", title="CPU per request by role (closed loop)")
    cpu.tick_params(axis="x", labelsize=6)
    cpu.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 3 min), results under bench/.work/capacity")
    p.add_argument("--duration", type=float, default=None, help="seconds per load phase (default 20; quick 4)")
    p.add_argument("--paths", default=None, help="comma-separated: proxy,direct (default both; quick: proxy)")
    args = p.parse_args(argv)
    args.duration = args.duration or (4.0 if args.quick else 20.0)
    args.offered = (0.5,) if args.quick else (0.25, 0.5, 0.75, 1.0, 1.5)
    paths = (args.paths or ("proxy" if args.quick else "proxy,direct")).split(",")
    wall0 = time.monotonic()
    facts = machine()

    work = WORK / "capacity"
    setup = prepare(work)
    res = {"quick": args.quick, "paths": {}}
    for path in paths:
        res["paths"][path] = measure_path(path, path == "direct", setup, args)
    res |= stamp("bench.capacity", argv, facts, wall0)
    out = (work / "capacity") if args.quick else RESULTS / "capacity"
    write(out, res, render(res))
    plot(res, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
