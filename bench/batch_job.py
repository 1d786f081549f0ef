"""The batch job's throughput against the in-process engine and the online service, one run.

Three systems embed the same documents with deploy/local.yaml's all-MiniLM-L6-v2, one after
another on this machine:

  in-process  the engine layer in this process (testkit/inprocess.py), 64 documents per call:
              the ceiling.
  job         `serve_app.batch` (Ray Data) on a fresh local Ray instance, from a JSONL file to
              Parquet: the wall time of the whole run, start-up (actors, model load) included,
              and its steady state (from the first output file to the last, by modification time).
  served      the service's bulk path: deploy/local.yaml served (testkit/servers.py), 8 clients
              sending 64 documents per request (testkit/loadgen.py).

Documents are the bulk workload's (testkit/workloads.py) at 20-150 words, so that every one fits
the model's 256 tokens (the job reports longer ones as errors; the others would truncate).
Tokens are counted with the model's tokenizer for every system. Writes
bench/results/batch_job.{md,json}:

    python -m bench.batch_job                    # 8192 documents, ~8 minutes on 2 cores
    python -m bench.batch_job --documents 256 --out bench/.work/batch_job   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from testkit import harness, workloads
from testkit.harness import LOCAL_CONFIG, RESULTS, WORK
from testkit.inprocess import EngineRunner, run_groups
from testkit.loadgen import WARMUP_OFFSET, run_load_sync, summarize
from testkit.servers import ServedSystem

CONFIG = LOCAL_CONFIG
MODEL = "all-MiniLM-L6-v2"
DOCS_PER_REQUEST, CLIENTS = 64, 8
TARGET = 0.9  # the job's tokens/s over the in-process engine's (issue 15)


def run_inprocess(spec, wl, requests: int) -> tuple[dict, np.ndarray]:
    runner = EngineRunner(spec)
    runner(list(wl(WARMUP_OFFSET).texts))  # warm-up, other documents
    vectors = []

    def embed(texts: list[str]) -> np.ndarray:
        vectors.append(runner(texts))
        return vectors[-1]

    records, wall, _ = run_groups(embed, wl, max_requests=requests, max_duration_s=3600)
    return {"wall_s": wall, "failed": sum(not r.ok for r in records)}, np.concatenate(vectors)


def run_job(job_model, wl, requests: int, work: Path) -> tuple[dict, dict]:
    import ray

    from serve_app.batch.job import run

    texts = [t for i in range(requests) for t in wl(i).texts]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    shutil.rmtree(work / "out", ignore_errors=True)
    ray.init(address="local", include_dashboard=False, _temp_dir=f"/tmp/rbj{os.getpid()}", log_to_driver=False)
    try:
        summary = run(job_model, str(work / "corpus.jsonl"), str(work / "out"))
    finally:
        ray.shutdown()
        shutil.rmtree(f"/tmp/rbj{os.getpid()}", ignore_errors=True)
    fragments = sorted(pads.dataset(work / "out/embeddings", format="parquet").get_fragments(),
                       key=lambda f: os.path.getmtime(f.path))
    tables = [f.to_table() for f in fragments]
    steady_tokens = sum(t["tokens"].to_numpy().sum() for t in tables[1:])
    steady_s = os.path.getmtime(fragments[-1].path) - os.path.getmtime(fragments[0].path)
    rows = {i: v for t in tables for i, v in zip(t["id"].to_pylist(), t["embedding"].to_pylist())}
    result = {"wall_s": summary.seconds, "documents": summary.documents, "errors": summary.errors,
              "tokens_reported": summary.tokens, "files": len(fragments),
              "steady_tokens_per_s": steady_tokens / steady_s if steady_s > 0 else None}
    return result, rows


def run_served(wl, requests: int, tokens_of) -> dict:
    served = ServedSystem(CONFIG)
    try:
        started = served.start()
        run_load_sync(served.base_url, MODEL, wl, concurrency=CLIENTS, max_requests=2, max_duration_s=300,
                      index_offset=WARMUP_OFFSET, progress=False)  # warm-up, other documents
        result = run_load_sync(served.base_url, MODEL, wl, concurrency=CLIENTS, max_requests=requests,
                               max_duration_s=3600, timeout_s=300, progress=False)
    finally:
        served.stop()
    summary = summarize(result, tokens_of=tokens_of)
    return {"wall_s": summary["wall_s"], "failed": summary["failed"], "startup_s": started["startup_s"]}


def render(res: dict) -> list[str]:
    base = res["systems"]["in-process"]["tokens_per_s"]
    rows = [[name, f"{s['wall_s']:.1f}", f"{s['tokens_per_s']:,.0f}", f"{s['tokens_per_s'] / base:.2f}×"]
            for name, s in res["systems"].items()]
    job = res["systems"]["job"]
    if job.get("steady_tokens_per_s"):
        rows.append(["job, steady state (first to last output file)", None, f"{job['steady_tokens_per_s']:,.0f}",
                     f"{job['steady_tokens_per_s'] / base:.2f}×"])
    lines = [*harness.header("Batch job vs in-process engine vs online service", res,
                             f"{MODEL} (deploy/local.yaml), {res['documents']} documents of 20-150 words, "
                             f"{res['tokens']:,} tokens (the model's tokenizer, special tokens included)."),
             *harness.md_table(["system", "wall s", "tokens/s", "× in-process"], rows)]
    lines += [f"- job: {job['files']} output files, {job['errors']} error rows; its vectors vs the in-process "
              f"engine's: max |diff| {res['max_abs_diff']:.2e}.",
              f"- target job ≥ {TARGET}× in-process: {job['tokens_per_s'] / base:.2f}× end to end "
              f"({'met' if job['tokens_per_s'] / base >= TARGET else 'not met'})."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=8192, help="a multiple of 64")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    wall0, machine = time.monotonic(), harness.machine()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from serve_app.batch.config import load_job_model
    from serve_app.engine.tokenization import load_input_tokenizer

    job_model = load_job_model(CONFIG, MODEL)
    requests = args.documents // DOCS_PER_REQUEST
    wl = workloads.corpus(CLIENTS)
    tokenizer = load_input_tokenizer(job_model.spec)
    lengths = [sum(map(len, tokenizer.tokenize_texts(list(wl(i).texts)))) for i in range(requests)]
    work = WORK / "batch_job"
    work.mkdir(parents=True, exist_ok=True)

    systems = {}
    print("in-process ...", flush=True)
    systems["in-process"], reference = run_inprocess(job_model.spec, wl, requests)
    print("job ...", flush=True)
    systems["job"], rows = run_job(job_model, wl, requests, work)
    print("served ...", flush=True)
    systems["served (bulk, 8 clients)"] = run_served(wl, requests, lambda i: lengths[i])
    for s in systems.values():
        s["tokens_per_s"] = sum(lengths) / s["wall_s"]
    job_vectors = np.array([rows[str(i)] for i in range(len(reference))], dtype=np.float32)
    res = {**harness.stamp("bench.batch_job", argv, machine, wall0), "documents": requests * DOCS_PER_REQUEST,
           "tokens": sum(lengths), "systems": systems, "max_abs_diff": float(np.abs(job_vectors - reference).max())}
    lines = render(res)
    harness.write(args.out / "batch_job", res, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
