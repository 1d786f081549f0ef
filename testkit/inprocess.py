"""The in-process ceiling: the same texts, in the same request-sized groups, with no server.

`EngineRunner` is our engine layer (serve_app.engine: the service's tokenization rules and
`EmbeddingEngine`) called directly; `SentenceTransformerRunner` is sentence-transformers'
`encode`, for orientation. `run_groups` feeds a workload's requests to one of them one group
after another in this process and records them like the load generator does, so the same
`loadgen.summarize` applies.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from testkit.loadgen import RequestRecord


class EngineRunner:
    def __init__(self, spec):
        from serve_app.engine.embedder import EmbeddingEngine
        from serve_app.engine.tokenization import load_input_tokenizer

        self.spec = spec
        self.tokenizer = load_input_tokenizer(spec)
        self.engine = EmbeddingEngine.load(spec)

    def __call__(self, texts: list[str]) -> np.ndarray:
        # truncate=True: what the benchmark asks of the service too (docs run past 256 tokens).
        return self.engine.embed(self.tokenizer.tokenize_texts(texts, None, True))


class SentenceTransformerRunner:
    def __init__(self, model_dir: str, batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device="cpu")
        self.batch_size = batch_size  # sentence-transformers' default

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)


def run_groups(
    fn: Callable[[list[str]], np.ndarray],
    source: Callable[[int], object],
    *,
    max_requests: int,
    max_duration_s: float,
    merge: int = 1,
    index_offset: int = 0,
) -> tuple[list[RequestRecord], float, str]:
    """Call `fn` on the texts of `merge` consecutive requests at a time, back to back.

    Returns (records, wall seconds, what stopped it). A merged call's time is recorded as the
    latency of each request in it.
    """
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = t0 + max_duration_s
    k, stopped_by = 0, "requests"
    while k < max_requests:
        if time.perf_counter() >= deadline:
            stopped_by = "duration"
            break
        reqs = [source(index_offset + i) for i in range(k, min(k + merge, max_requests))]
        texts = [t for r in reqs for t in r.texts]
        start = time.perf_counter()
        vectors = fn(texts)
        end = time.perf_counter()
        ok = vectors.shape[0] == len(texts)
        for r in reqs:
            records.append(RequestRecord(r.index, r.tag, 0, start - t0, end - start, len(r.texts),
                                         200 if ok else 0, None if ok else "wrong_item_count"))
        k += len(reqs)
    return records, time.perf_counter() - t0, stopped_by
