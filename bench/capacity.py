"""How many CPU cores a GPU's front end needs: SFR-shaped traffic against a simulated GPU.

    python -m bench.capacity            # every path, every workload, an offered-load sweep (~30 min)
    python -m bench.capacity --quick    # a smoke run (< 3 min): production path, short phases, one offered load;
                                        # writes to bench/.work/capacity/, never to bench/results

The service runs as deployed, with the production config's model settings (deploy/config.yaml's
SFR entry: 16384-token passes, 4096-token batch passes, request classes, cache, API keys on), on
this machine's CPUs, its Embedder over the simulated GPU (serve_app/engine/simulated_gpu.py: an
H200's time per pass at the bf16 rate, 4096-dim vectors) and SFR's real tokenizer
(testkit/sfr_tokenizer.py). Per workload and path (`haproxy`: deploy/config.yaml's front, HAProxy
forwarding to Ingress replicas that serve HTTP themselves; `proxy`: Serve's Python proxy, the
front before it; `direct`: clients on the Ingress replica's own port, no proxy at all):

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
import os
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
    with_direct_ingress_only,
    with_production_front,
    without_direct_ingress,
    write,
)
from testkit.loadgen import WARMUP_OFFSET, arrivals, run_load_sync, summarize
from testkit.procstats import CpuMeter
from testkit.servers import ServedSystem

MODEL = "SFR-Embedding-Mistral"
MINILM = "all-MiniLM-L6-v2"
# MiniLM's vectors over a simulated GPU (--embedder simulated): fast enough (a bulk request's
# 12k tokens in ~13 ms) that the front, not the Embedder, is what the closed loop waits for.
MINILM_GPU = "tokens_per_s=1000000,pass_ms=1,dimensions=384"
PRODUCTION_CONFIG = REPO / "deploy" / "config.yaml"
TARGET_UTILISATION = 0.9
NODE_CORES = 16
DOC_TOKENS = 512  # the bulk documents' length in SFR tokens
PHASE_INDICES = 50_000  # requests a phase may send
FRONT_ROLES = ("Serve proxy", "HAProxy", "Ingress", "Tokenizer")
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


def _bulk_at_the_tokenizer(config: dict) -> dict:
    """HAProxy's path with every bulk text request tokenized at the Tokenizer deployment, as
    before the Ingress tokenized them on a thread of its own (serve_app/deployments/tokenizer_client.py)."""
    config = with_production_front(config)
    config["applications"][0]["runtime_env"]["env_vars"]["EMBEDDINGS_THREAD_TOKENIZE_MAX_CHARS"] = "0"
    return config


# How clients reach the Ingress: Serve's Python proxy; HAProxy in front of direct-ingress replicas
# (deploy/config.yaml's front); the Ingress replica's own port, no proxy at all; and HAProxy's
# with bulk requests tokenized the old way (on request only: an A/B, not a path to size by).
PATHS = {"proxy": without_direct_ingress, "haproxy": with_production_front, "direct": with_direct_ingress_only,
         "haproxy-tokenizer": _bulk_at_the_tokenizer}
DEFAULT_PATHS = ("proxy", "haproxy", "direct")


def service_config(setup: SimpleNamespace, stats_dir: Path, gpu: str, path: str) -> dict:
    """deploy/local.yaml's deployments (one replica each: this machine's cores) with API keys on and,
    for SFR, deploy/config.yaml's model settings, the Embedder over the simulated GPU; for MiniLM,
    local.yaml's model on this machine's CPUs or (setup.simulated) its vectors over MINILM_GPU."""
    production = yaml.safe_load(PRODUCTION_CONFIG.read_text())["applications"][0]["args"]
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    app = config["applications"][0]
    # Not production's per-key rate limits: the load generator is one key at many times their rate.
    common = {"auth": {"keys_file": str(setup.keys_file)},
              **{k: production[k] for k in ("limits", "priority", "cache") if k in production}}
    if setup.model_dir is None:
        app["args"] = {"models": app["args"]["models"], **common}
        if setup.simulated:
            app["runtime_env"]["env_vars"]["EMBEDDINGS_SIMULATED_GPU"] = f"{MINILM_GPU},stats_dir={stats_dir}"
        return PATHS[path](config)
    model = copy.deepcopy(production["models"][0])
    model.update(source=str(setup.model_dir), device="auto")
    model.pop("revision", None)
    app["args"] = {"models": [model], **common}
    app["runtime_env"]["env_vars"]["EMBEDDINGS_SIMULATED_GPU"] = f"{gpu},stats_dir={stats_dir}"
    return PATHS[path](config)


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
              phase: int, rate: float | None = None, model: str = MODEL) -> dict:
    """One load phase: closed loop (`rate` None) or open loop at `rate` requests/s. Each `phase`
    sends requests of its own (indices from phase * PHASE_INDICES), so none is a cache hit."""
    common = dict(concurrency=concurrency if rate is None else max(64, concurrency * 4),
                  extra_body={"truncate": True}, timeout_s=120.0, progress=False,
                  headers={"Authorization": f"Bearer {key}"})
    schedule = arrivals(lambda t: rate, duration_s) if rate else None
    meter, before = CpuMeter([served.pid]).start(), clock.read()
    result = run_load_sync(served.base_url, model, source, max_requests=PHASE_INDICES, max_duration_s=duration_s,
                           arrivals=schedule, index_offset=phase * PHASE_INDICES, **common)
    summary = summarize(result)
    gpu = GpuClock.delta(before, clock.read())
    summary["cpu"] = meter.stop()
    summary["gpu"] = gpu | {"utilisation": gpu["busy_s"] / summary["cpu"]["wall_s"]}  # 0 without one
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


def prepare(work: Path, model: str, *, simulated: bool) -> SimpleNamespace:
    """What every run serves and sends: one API key, the workloads and, for SFR, an SFR-shaped model
    directory (SFR's real tokenizer; its tiny weights stay unused under the simulated GPU). SFR
    always runs over the simulated GPU; MiniLM over it with `simulated`, else on the CPUs."""
    from transformers import AutoTokenizer

    from serve_app.api.auth import generate_key, hash_key
    from testkit.tiny_models import build_sfr_vocab_model

    key = generate_key()
    work.mkdir(parents=True, exist_ok=True)
    keys_file = work / "api_keys"
    keys_file.write_text(f"bench:{hash_key(key)}\n")
    if model == "minilm":  # the issue's own yardstick: local.yaml's model, texts of testkit.workloads
        sources = {"search": Queries(wls.search(), 32), "bulk": Queries(wls.bulk(), 8)}
        return SimpleNamespace(model="minilm", model_name=MINILM, model_dir=None, key=key, keys_file=keys_file,
                               sources=sources, simulated=simulated)
    model_dir = build_sfr_vocab_model(work / "sfr-vocab")
    sources = workloads(words_per_document(AutoTokenizer.from_pretrained(model_dir), DOC_TOKENS))
    return SimpleNamespace(model="sfr", model_name=MODEL, model_dir=model_dir, key=key, keys_file=keys_file,
                           sources=sources, simulated=True)


def tokenizing_alone(setup: SimpleNamespace, requests: int = 20) -> dict:
    """CPU per bulk document of tokenizing alone, in this process on one thread (as the
    Tokenizer replicas run: TOKENIZERS_PARALLELISM=false): the floor under the front's CPU per
    bulk document, through transformers' call and through the service's own encoder
    (serve_app/engine/tokenization.py, batch_encoder)."""
    from serve_app.engine.tokenization import load_input_tokenizer
    from testkit.app import local_config_model, tiny_sfr_vocab_model

    spec = local_config_model() if setup.model_dir is None else tiny_sfr_vocab_model(setup.model_dir)
    tokenizer = load_input_tokenizer(ModelSpec.model_validate(spec))
    batches = [list(setup.sources["bulk"](WARMUP_OFFSET + k).texts) for k in range(requests)]
    documents = sum(map(len, batches))

    def cpu_ms_per_document(encode) -> float:
        encode(batches[0])
        start = time.process_time()
        for batch in batches:
            encode(batch)
        return (time.process_time() - start) * 1000 / documents

    return {"documents": documents,
            "tokens_per_document": sum(len(ids) for b in batches for ids in tokenizer.encode(b)) / documents,
            "transformers_ms": cpu_ms_per_document(
                lambda texts: tokenizer.tokenizer(texts, add_special_tokens=True)["input_ids"]),
            "service_ms": cpu_ms_per_document(tokenizer.encode)}


def start_service(run_dir: Path, setup: SimpleNamespace, path: str) -> tuple[ServedSystem, GpuClock, dict]:
    """The service on this path (one of PATHS), started; its GPU clock and config."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    stats_dir = run_dir / "gpu-stats"
    config = service_config(setup, stats_dir, "bf16", path)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    served = ServedSystem(run_dir / "config.yaml")
    try:
        log(f"{run_dir.name}: service started ({served.start()['startup_s']:.0f} s)")
    except BaseException:
        served.stop()
        raise
    return served, GpuClock(stats_dir), config


def warm_up(served: ServedSystem, source, key: str, duration_s: float, model: str = MODEL) -> None:
    run_load_sync(served.base_url, model, source, concurrency=source.concurrency, max_requests=source.concurrency * 2,
                  max_duration_s=duration_s, index_offset=WARMUP_OFFSET, extra_body={"truncate": True},
                  progress=False, headers={"Authorization": f"Bearer {key}"})


def idle_cores(served: ServedSystem, seconds: float) -> dict:
    """Each role's CPU use with no request in flight (metrics, health checks, HAProxy's manager):
    a cost per second, not per request, which a slow request rate spreads over few requests."""
    meter = CpuMeter([served.pid]).start()
    time.sleep(seconds)
    return cpu_per_request({"ok": 1, "cpu": meter.stop() | {"wall_s": 1.0}})


def net_front_ms(phase: dict, idle: dict) -> float:
    """The front's CPU per request beyond what its processes use while idle."""
    wall, ok = phase["cpu"]["wall_s"], max(1, phase["ok"])
    return sum(max(0.0, v - idle.get(role, 0.0) * wall / ok) for role, v in cpu_per_request(phase).items()
               if role in FRONT_ROLES) * 1000


def measure_path(path: str, setup: SimpleNamespace, opts) -> dict:
    served, clock, config = start_service(WORK / "capacity" / setup.model / path, setup, path)
    max_batch_tokens = ModelSpec.model_validate(config["applications"][0]["args"]["models"][0]).max_batch_tokens
    results = {}
    try:
        idle = idle_cores(served, min(10.0, opts.duration))
        for name, source in setup.sources.items():
            if opts.workloads and name not in opts.workloads:
                continue
            warm_up(served, source, setup.key, min(5.0, opts.duration), setup.model_name)
            closed = run_phase(served, clock, source, source.concurrency, opts.duration, setup.key, phase=0,
                               model=setup.model_name)
            sustained = closed["requests_per_s"] or 0.0
            log(f"{path} {name}: {sustained:.1f} req/s closed loop, GPU {closed['gpu']['utilisation']:.1%}")
            sweep = [run_phase(served, clock, source, source.concurrency, opts.duration, setup.key, phase=k,
                               rate=f * sustained, model=setup.model_name)
                     for k, f in enumerate(opts.offered, start=1) if sustained > 0 and setup.model_dir]
            results[name] = {"closed": closed, "sweep": sweep, "sizing": sizing(closed, max_batch_tokens),
                             "idle_cores": idle, "net_front_cpu_ms": net_front_ms(closed, idle)}
    finally:
        served.stop()
    return results


MINILM_INTRO = """The same service and load generator with deploy/local.yaml's model (all-MiniLM-L6-v2, 384-dim
vectors, WordPiece) computed on this machine's CPUs instead of a simulated GPU, API keys on: the
front's CPU per request by role, closed loop. No GPU figures: the Embedder here is the CPU model,
which takes both cores, so that bulk requests come at well under one a second and the front's
idle cost and its contention with the model weigh on each."""
MINILM_SIMULATED_INTRO = f"""The same service and load generator with deploy/local.yaml's model settings, tokenizer
(WordPiece) and 384-dim vectors, API keys on, its Embedder over a simulated GPU
(`{MINILM_GPU}`) rather than the CPU model: the front's CPU per request by role, closed
loop, with nothing else competing for the cores and requests fast enough that the front's idle
cost is spread thin. The same front as on a GPU node serving MiniLM."""


def front_summary(res: dict) -> list[str]:
    """Front CPU per request per path and workload, and its ratio to the proxy path's (same run)."""
    paths = res["paths"]
    rows = []
    for name in next(iter(paths.values()), {}):
        base = paths.get("proxy", {}).get(name, {}).get("sizing", {}).get("front_cpu_ms")
        for path, results in paths.items():
            r = results[name]
            front, net = r["sizing"]["front_cpu_ms"], r.get("net_front_cpu_ms")
            texts = r["closed"]["texts"] / max(1, r["closed"]["ok"])
            rows.append([name, path, f"{front:.2f}", "–" if net is None else f"{net:.2f}", f"{texts:.0f}",
                         f"{front / texts:.2f}", "–" if net is None else f"{net / texts:.2f}",
                         f"{r['closed']['requests_per_s']:.1f}", f"{front / base:.2f}x" if base else "–"])
    lines = ["## Front CPU per request (proxies + Ingress + Tokenizer), closed loop", "",
             "*Net of idle*: less what the same processes use with no request in flight (measured before "
             "the load), which a low request rate spreads over few requests.", ""]
    lines += md_table(["workload", "path", "front CPU ms/request", "net of idle", "texts/request", "ms/text",
                       "net ms/text", "req/s", "vs the proxy path"], rows)
    tok = res.get("tokenizing")
    if tok:
        lines += ["", "## Tokenizing alone", "",
                  f"The bulk workload's documents ({tok['tokens_per_document']:.0f} tokens on average, "
                  f"{tok['documents']}), tokenized in the benchmark's own process on one thread: the floor "
                  "under the front's CPU per bulk document.", ""]
        lines += md_table(["encoder", "CPU ms/document", "vs transformers' call"],
                          [["transformers' tokenizer call", f"{tok['transformers_ms']:.3f}", "1.00x"],
                           ["the service's (encode_batch_fast)", f"{tok['service_ms']:.3f}",
                            f"{tok['service_ms'] / tok['transformers_ms']:.2f}x"]])
    return lines


def render(res: dict) -> list[str]:
    minilm, simulated = res.get("model") == "minilm", res.get("embedder") == "simulated"
    if not minilm:
        title = "# Capacity: CPU cores per GPU for SFR traffic (simulated GPU)"
        intro = ["\n\n".join(__doc__.split("\n\n")[2:]), "", f"GPU rates: {RATE_SOURCES}"]
    elif simulated:
        title, intro = "# Front-end CPU per request, all-MiniLM-L6-v2 over a simulated GPU", [MINILM_SIMULATED_INTRO]
    else:
        title, intro = "# Front-end CPU per request, all-MiniLM-L6-v2 (CPU)", [MINILM_INTRO]
    lines = [title, "", f"`{res['command']}`, {res['generated']}; {machine_line(res['machine'])}; "
             f"{res['wall_s']:.0f} s.", "", *intro, ""]
    if res["quick"]:
        lines += ["**Quick run: a smoke test of the benchmark, not figures to size a deployment by.**", ""]
    lines += front_summary(res)
    for path, results in res["paths"].items():
        lines += [f"## {path}: CPU per request (ms) by role, closed loop", ""]
        rows = []
        for name, r in results.items():
            c, s = r["closed"], r["sizing"]
            rows.append([name, c["ok"], f"{c['requests_per_s']:.1f}", f"{c['gpu']['utilisation']:.1%}",
                         *(f"{s['cpu_ms_per_request'][role]:.2f}" for role in ROLES), f"{s['front_cpu_ms']:.2f}",
                         f"{c['latency']['p50_s'] * 1000:.0f} / {c['latency']['p99_s'] * 1000:.0f}"])
        lines += md_table(["workload", "requests", "req/s", "GPU busy", *ROLES, "front (proxies+Ingress+Tokenizer)",
                           "p50 / p99 ms"], rows)
        sweep_rows = [[name, f"{p['offered_per_s']:.1f}", f"{p['requests_per_s'] or 0:.1f}", f"{p['gpu']['utilisation']:.1%}",
                       f"{(p['latency']['p50_s'] or 0) * 1000:.0f} / {(p['latency']['p99_s'] or 0) * 1000:.0f}", p["failed"]]
                      for name, r in results.items() for p in r["sweep"]]
        if sweep_rows:
            lines += [f"### {path}: simulated-GPU utilisation vs offered load (open loop)", ""]
            lines += md_table(["workload", "offered req/s", "served req/s", "GPU busy", "p50 / p99 ms", "failed"],
                              sweep_rows)
    if minilm:
        return lines
    lines += [f"## Cores per GPU for >= {TARGET_UTILISATION:.0%} simulated-GPU utilisation", "",
              "Cores: the proxy (Serve's, or HAProxy and its manager), Ingress, Tokenizer and the Embedder's host "
              f"side, per request, times the requests/s that keep the GPU {TARGET_UTILISATION:.0%} busy. "
              f"Node: what {NODE_CORES} cores carry, in GPUs' worth of traffic.", ""]
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
    p.add_argument("--model", choices=("sfr", "minilm"), default="sfr",
                   help="sfr: SFR's tokenizer and vectors over the simulated GPU; minilm: local.yaml's model, "
                        "front CPU only (bench/results/capacity_minilm[_simulated])")
    p.add_argument("--embedder", choices=("cpu", "simulated"), default="cpu",
                   help="minilm only: the CPU model, or MiniLM's vectors over a fast simulated GPU (the front "
                        "without the model competing for the cores)")
    p.add_argument("--duration", type=float, default=None, help="seconds per load phase (default 20; quick 4)")
    p.add_argument("--workloads", default=None, help="comma-separated subset of the model's workloads (default all)")
    p.add_argument("--out", default=None, help="results path prefix (default bench/results/capacity[_<model>...]; "
                                               "an A/B of some paths or workloads belongs elsewhere)")
    p.add_argument("--paths", default=None,
                   help=f"comma-separated, of {','.join(PATHS)} (default {','.join(DEFAULT_PATHS)}; quick: haproxy)")
    args = p.parse_args(argv)
    args.duration = args.duration or (4.0 if args.quick else 20.0)
    args.offered = (0.5,) if args.quick else (0.25, 0.5, 0.75, 1.0, 1.5)
    args.workloads = args.workloads.split(",") if args.workloads else None
    paths = (args.paths or ("haproxy" if args.quick else ",".join(DEFAULT_PATHS))).split(",")
    wall0 = time.monotonic()
    facts = machine()

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in the service's replicas
    work = WORK / "capacity"
    simulated = args.model == "sfr" or args.embedder == "simulated"
    setup = prepare(work, args.model, simulated=simulated)
    res = {"quick": args.quick, "model": args.model, "embedder": "simulated" if simulated else "cpu",
           "tokenizing": tokenizing_alone(setup), "paths": {}}
    for path in paths:
        res["paths"][path] = measure_path(path, setup, args)
    res |= stamp("bench.capacity", argv, facts, wall0)
    name = "capacity" if args.model == "sfr" else f"capacity_{args.model}" + ("_simulated" if simulated else "")
    out = Path(args.out) if args.out else (work / name) if args.quick else RESULTS / name
    write(out, res, render(res))
    if args.model == "sfr":
        plot(res, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
