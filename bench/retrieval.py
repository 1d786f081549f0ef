"""Retrieval quality through the HTTP API: a BEIR-format dataset, embedded by the service.

    python -m bench.retrieval --url http://127.0.0.1:8000 --model all-MiniLM-L6-v2 --dataset DIR
    python -m bench.retrieval --url http://HEAD:8000 --model SFR-Embedding-Mistral --dataset scifact \\
        --instruction "Given a scientific claim, retrieve documents that support or refute the claim"

DIR holds BEIR's files: corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id",
"text"}) and qrels/<split>.tsv (query-id, corpus-id, score, after a header line). Everything is
embedded with the official `openai` client: documents as `title + " " + text` (as BEIR and MTEB
join them) with no instruction, queries with `input_type: query` (the model's configured
`query_instruction`) or, with `--instruction`, that task (MTEB's per-dataset instructions).
Exact cosine search in numpy; nDCG@10, recall@100 and MRR@10 from pytrec_eval (trec_eval's
measures; MRR@10 is its reciprocal rank over each query's top 10). Queries without judgements
are skipped, and a document never counts for a query with its own id (BEIR's rule). Writes
bench/results/retrieval_<dataset>.{md,json} unless --out says otherwise. The API key, if the
service wants one, comes from OPENAI_API_KEY.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DEPTH = 100  # hits kept per query: enough for recall@100
Embed = Callable[[list[str]], np.ndarray]


@dataclass
class Dataset:
    doc_ids: list[str]
    docs: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_beir(directory: Path, split: str = "test") -> Dataset:
    qrels: dict[str, dict[str, int]] = {}
    with open(directory / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        next(f)  # header: query-id, corpus-id, score
        for line in f:
            if line.strip():
                qid, did, score = line.rstrip("\n").split("\t")[:3]
                qrels.setdefault(qid, {})[did] = int(score)
    corpus = _jsonl(directory / "corpus.jsonl")
    queries = [q for q in _jsonl(directory / "queries.jsonl") if q["_id"] in qrels]
    return Dataset(
        doc_ids=[str(d["_id"]) for d in corpus],
        docs=[(d.get("title", "") + " " + d["text"]).strip() for d in corpus],
        query_ids=[str(q["_id"]) for q in queries],
        queries=[q["text"] for q in queries],
        qrels={qid: qrels[qid] for qid in (str(q["_id"]) for q in queries)},
    )


def api_embedder(client, model: str, batch_size: int, concurrency: int, desc: str, **extra) -> Embed:
    """Texts → vectors over the API, `concurrency` requests of `batch_size` texts in flight."""

    def embed(texts: list[str]) -> np.ndarray:
        from tqdm import tqdm

        batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]

        def one(batch: list[str]) -> np.ndarray:
            response = client.embeddings.create(model=model, input=batch, extra_body=extra or None)
            return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], np.float32)

        with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(texts), desc=desc, unit="text") as bar:
            parts = []
            for part in pool.map(one, batches):  # map keeps the batches' order
                parts.append(part)
                bar.update(len(part))
        return np.concatenate(parts)

    return embed


def search(query_vecs: np.ndarray, doc_vecs: np.ndarray, depth: int = DEPTH) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine search: each query's top `depth` document indices and scores, best first."""
    q = query_vecs / np.linalg.norm(query_vecs, axis=1, keepdims=True)
    d = doc_vecs / np.linalg.norm(doc_vecs, axis=1, keepdims=True)
    depth = min(depth, len(d))
    top_idx, top_scores = [], []
    for start in range(0, len(q), 256):  # bounded memory on large corpora
        scores = q[start : start + 256] @ d.T
        idx = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        part = np.take_along_axis(scores, idx, axis=1)
        order = np.argsort(-part, axis=1, kind="stable")
        top_idx.append(np.take_along_axis(idx, order, axis=1))
        top_scores.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(top_idx), np.concatenate(top_scores)


def metrics(data: Dataset, top_idx: np.ndarray, top_scores: np.ndarray) -> dict[str, float]:
    import pytrec_eval

    run = {
        qid: {data.doc_ids[i]: float(s) for i, s in zip(idx, scores) if data.doc_ids[i] != qid}
        for qid, idx, scores in zip(data.query_ids, top_idx, top_scores)
    }
    top10 = {qid: dict(sorted(hits.items(), key=lambda h: -h[1])[:10]) for qid, hits in run.items()}
    deep = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    shallow = pytrec_eval.RelevanceEvaluator(data.qrels, {"recip_rank"}).evaluate(top10)
    per_query = {"ndcg@10": (deep, "ndcg_cut_10"), "recall@100": (deep, "recall_100"), "mrr@10": (shallow, "recip_rank")}
    return {name: float(np.mean([table[qid][key] for qid in data.query_ids])) for name, (table, key) in per_query.items()}


def evaluate(data: Dataset, embed_queries: Embed, embed_documents: Embed) -> dict:
    started = time.perf_counter()
    doc_vecs = embed_documents(data.docs)
    query_vecs = embed_queries(data.queries)
    embed_s = time.perf_counter() - started
    return {
        "metrics": metrics(data, *search(query_vecs, doc_vecs)),
        "documents": len(data.docs),
        "queries": len(data.queries),
        "dimensions": int(doc_vecs.shape[1]),
        "embed_seconds": round(embed_s, 2),
    }


def render_md(result: dict) -> str:
    m = result["metrics"]
    query_side = f"instruction `{result['instruction']}`" if result["instruction"] else "`input_type: query`"
    return "\n".join([
        f"# Retrieval: {result['dataset']} ({result['split']}) through the API",
        "",
        f"`{result['command']}`, {result['date']}.",
        "",
        f"Model `{result['model']}` at {result['url']}: {result['documents']} documents (no instruction), "
        f"{result['queries']} judged queries ({query_side}), {result['dimensions']}-dim vectors, exact "
        f"cosine search; embedding took {result['embed_seconds']} s. Metrics from pytrec_eval.",
        "",
        "| nDCG@10 | recall@100 | MRR@10 |",
        "|---|---|---|",
        f"| {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {m['mrr@10']:.4f} |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000 (/v1 is appended)")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, type=Path, help="a BEIR-format directory")
    p.add_argument("--split", default="test")
    p.add_argument("--instruction", default=None, help="query task instead of the model's query_instruction")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", default=None, help="path without suffix (default bench/results/retrieval_<dataset>)")
    args = p.parse_args(argv)

    import openai

    # The key comes from the environment only, so it never lands in a results file or `ps`.
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "unused"),
                           timeout=600, max_retries=5)
    data = load_beir(args.dataset, args.split)
    query_side = {"instruction": args.instruction} if args.instruction else {"input_type": "query"}
    result = {
        "dataset": args.dataset.name, "split": args.split, "model": args.model, "url": args.url,
        "instruction": args.instruction, "date": dt.date.today().isoformat(),
        "command": shlex.join(["python", "-m", "bench.retrieval", *(sys.argv[1:] if argv is None else argv)]),
    }
    result |= evaluate(
        data,
        api_embedder(client, args.model, args.batch_size, args.concurrency, "queries", **query_side),
        api_embedder(client, args.model, args.batch_size, args.concurrency, "documents"),
    )
    out = str(args.out or RESULTS / f"retrieval_{args.dataset.name}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(out + ".md").write_text(render_md(result))
    print(render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
