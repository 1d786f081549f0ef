"""GPU deployment: batches of token ids → vectors, batched across requests by token budget."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import torch
from ray import serve

from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.spec import ModelSpec


def count_tokens(chunks: list[list[list[int]]]) -> int:
    return sum(len(ids) for chunk in chunks for ids in chunk)


@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class Embedder:
    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        # Ray sets OMP_NUM_THREADS from the replica's num_cpus; match torch to it so that
        # replicas sharing a machine don't oversubscribe its cores.
        threads = self.spec.cpu_threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
        torch.set_num_threads(max(1, threads))
        self.engine = EmbeddingEngine.load(self.spec)
        self._embed_batch.set_max_batch_size(self.spec.max_batch_tokens)
        self._embed_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    async def embed(self, chunk: list[list[int]]) -> np.ndarray:
        """Vectors for one chunk (whose tokens fit the batch budget), in order."""
        return await self._embed_batch(chunk)

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, batch_size_fn=count_tokens)
    async def _embed_batch(self, chunks: list[list[list[int]]]) -> list[np.ndarray]:
        flat = [ids for chunk in chunks for ids in chunk]
        # Off the event loop, so new requests keep queueing (and batches fill) while it runs.
        vectors = await asyncio.to_thread(self.engine.embed, flat)
        bounds = np.cumsum([len(chunk) for chunk in chunks])[:-1]
        return np.split(vectors, bounds)

    def describe(self) -> dict:
        resolved = self.engine.resolved
        return {
            "dimensions": self.engine.dimensions,
            "max_input_tokens": resolved.max_input_tokens,
            "max_batch_tokens": self.spec.max_batch_tokens,
            "pooling": resolved.pooling,
            "normalize": self.spec.normalize,
            "device": self.engine.device,
        }
