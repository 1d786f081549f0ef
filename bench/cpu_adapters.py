"""Several LoRA adapters over one base on CPU, in-process: passes that mix adapters, one pass per
adapter, and merged models, in the same run.

    python -m bench.cpu_adapters                                # ~4 min on 2 cores
    python -m bench.cpu_adapters --texts 0.05 --rounds 1 --out /tmp/cpu_adapters   # smoke run

A random-weight Mistral (4 layers, hidden 512, fp32, sdpa) and two random LoRA adapters of rank
8 on every linear layer (the shape of SFR-Embedding-Mistral's adapter), unmerged in one
`EmbeddingEngine` (2 one-thread lanes, 1024-token passes); each text is for the bare base or one
of the two adapters, a third each, shuffled. Settings:
  * merged: the plain model on every text, which is what each model costs in a deployment of
    its own with its adapter merged (merge_adapter: true): no LoRA work in a pass;
  * 1 adapter, unmerged: every text for one adapter: what keeping a lone adapter unmerged costs;
  * 3 models, mixed passes: a pass takes rows of all three, PEFT adds each row's own adapter;
  * 3 models, a pass per adapter: each pass holds one adapter's rows.
Workloads: docs (512 tokens), mixed (log-uniform 16-1024) and queries (32) as one call each, and
query groups: calls of 6 queries (2 per model), the size of an interactive batch; calls run
two at a time, as an Embedder replica runs two batches on two lanes. Median of --rounds rounds,
settings taking turns within a round. Writes bench/results/cpu_adapters.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from serve_app.engine.embedder import CPU_MICRO_BATCH_TOKENS, EmbeddingEngine

from .cpu_engine import RESULTS, intro, run_header, write_report
from .gpu_engine import (LORA_MODELS, add_random_adapters, build_random_model, log_uniform_lengths, lora_engine,
                         mistral_config, random_text, run_engine, run_lora)

MERGED = "merged (plain model: no LoRA in a pass)"
MIXED = "3 models, mixed passes"


def workloads(rng: np.random.Generator, vocab: int, scale: float) -> dict[str, list[list[list[int]]]]:
    """Per workload, its calls (lists of token-id sequences)."""
    n = lambda k: max(3, int(k * scale))  # noqa: E731
    return {
        "docs": [[random_text(rng, 512, vocab) for _ in range(n(48))]],
        "mixed": [[random_text(rng, k, vocab) for k in log_uniform_lengths(rng, n(96), 16, 1024)]],
        "queries": [[random_text(rng, 32, vocab) for _ in range(n(768))]],
        "query groups": [[random_text(rng, 32, vocab) for _ in range(6)] for _ in range(n(96))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--texts", type=float, default=1.0, help="workload size factor")
    p.add_argument("--out", default=str(RESULTS / "cpu_adapters"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = mistral_config("check")
    plain = EmbeddingEngine(build_random_model(config, "cpu", torch.float32, seed=0), "cpu", "last_token", True,
                            CPU_MICRO_BATCH_TOKENS, cpu_threads=args.threads)
    # Lanes: one per torch thread (set above), as deploy/local.yaml runs.
    shared = lora_engine(add_random_adapters(build_random_model(config, "cpu", torch.float32, seed=0), 2, 8, seed=1),
                         "cpu", CPU_MICRO_BATCH_TOKENS)
    rng = np.random.default_rng(0)
    calls = workloads(rng, config.vocab_size, args.texts)
    names = list(LORA_MODELS)
    models = {w: [[names[k % 3] for k in rng.permutation(len(c))] for c in cs] for w, cs in calls.items()}
    settings = {
        MERGED: lambda seqs, _: run_engine(plain, seqs),
        "1 adapter, unmerged": lambda seqs, _: run_lora(shared, seqs, True, ["a"] * len(seqs)),
        MIXED: lambda seqs, row_models: run_lora(shared, seqs, True, row_models),
        "3 models, a pass per adapter": lambda seqs, row_models: run_lora(shared, seqs, False, row_models),
    }

    def run(setting: str, workload: str):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(settings[setting], calls[workload], models[workload]))
        return time.perf_counter() - t0, done

    for workload in calls:  # warm-up
        for setting in settings:
            run(setting, workload)
    times = {(s, w): [] for s in settings for w in calls}
    vectors = {}
    for _ in range(args.rounds):
        for workload in calls:
            for setting in settings:
                seconds, done = run(setting, workload)
                times[(setting, workload)].append(seconds)
                vectors[(setting, workload)] = done
    rows = []
    for workload, cs in calls.items():
        tokens = sum(len(seq) for call in cs for seq in call)
        merged_s = statistics.median(times[(MERGED, workload)])
        for setting in settings:
            median = statistics.median(times[(setting, workload)])
            done = vectors[(setting, workload)]
            real, padded = sum(stats.real_tokens for _, stats in done), sum(stats.padded_tokens for _, stats in done)
            ours = np.concatenate([v for v, _ in done])
            mixed = np.concatenate([v for v, _ in vectors[(MIXED, workload)]])
            rows.append({
                "workload": workload, "setting": setting, "tokens_per_s": tokens / median, "rounds_s": times[(setting, workload)],
                "vs_merged": merged_s / median, "padding": 1 - real / padded,
                # Grouping passes must not change a vector: the same models as the mixed passes.
                "max_abs_diff_vs_mixed": float(np.abs(ours - mixed).max()) if setting.startswith("3 models") else None,
            })
    res = {
        **run_header("bench.cpu_adapters", argv),
        "model": "random Mistral, 4 layers, hidden 512, fp32, sdpa; 2 random LoRA adapters, rank 8 on every linear layer",
        "threads": args.threads, "micro_batch_tokens": CPU_MICRO_BATCH_TOKENS, "rounds": args.rounds,
        "workloads": {w: f"{len(cs)} call(s), {sum(map(len, cs))} texts, {sum(len(s) for c in cs for s in c)} tokens"
                      for w, cs in calls.items()},
        "rows": rows,
    }
    lines = [
        "# Several LoRA adapters over one base, on CPU",
        "",
        intro(res, f"{res['model']}; in-process, {args.threads} one-thread lanes, {CPU_MICRO_BATCH_TOKENS}-token "
              "passes, two calls at a time. Texts go to the bare base and the two adapters, a third each", args.rounds),
        "",
        "| workload | setting | tokens/s | × merged | padding | max abs diff vs mixed passes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = "–" if r["max_abs_diff_vs_mixed"] is None else f"{r['max_abs_diff_vs_mixed']:.1e}"
        lines.append(f"| {r['workload']} | {r['setting']} | {r['tokens_per_s']:,.0f} | {r['vs_merged']:.2f}× "
                     f"| {r['padding']:.1%} | {diff} |")
    write_report(Path(args.out), res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
