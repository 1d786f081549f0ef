"""A simulated GPU for benchmarks of the serving front: SFR's time per pass and 4096-dim vectors,
on a CPU, without a model.

Chosen by the environment, never by a ModelSpec (it is a benchmark's stand-in, not a product
setting): `EMBEDDINGS_SIMULATED_GPU` holds comma-separated items, a preset (`bf16`, `fp8`) and/or
`key=value` overrides of its fields (`tokens_per_s`, `pass_ms`, `dimensions`, `stats_dir`),
e.g. `fp8` or `tokens_per_s=70000,pass_ms=2`.

The engine runs unchanged around it (tokenizer rules, pass planning, request classes, pooling,
normalizing): only the model's forward is replaced. Per pass it sleeps the time an H200 would
take, `pass_ms + padded tokens / tokens_per_s`, one pass at a time (a GPU's single lane), without
holding the GIL, as a real replica waits for its device; and it returns each row's deterministic
unit vector, chosen by a hash of the row's real token ids.

The presets stand until a GPU run calibrates them (docs/performance.md#pending-a-gpu). bf16: SFR
costs ~14.1 GFLOP per token; at the ~790 TFLOP/s a bf16 matmul reached on an H200 that bounds it
near 56k tokens/s; and every pass streams the 14.2 GB of bf16 weights from HBM (~4.8 TB/s), ~3 ms,
the floor of a small pass. FP8: half the weight bytes (1.5 ms), and 1.5x bf16's rate, not the
datasheet's 2x: what compiled float8 linears reach per torchao's and vLLM's published figures
(the sources are cited in bench.capacity's report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ENV = "EMBEDDINGS_SIMULATED_GPU"
# Rows of the table the vectors are drawn from; each is also rotated by a hash-chosen shift, so
# that TABLE_ROWS x dimensions distinct vectors exist.
TABLE_ROWS = 256
# The stats file: passes, busy seconds, padded tokens (what bench.capacity reads for utilisation).
STATS = struct.Struct("<qdq")


@dataclass(frozen=True)
class SimulatedGpu:
    tokens_per_s: float
    pass_ms: float
    dimensions: int = 4096
    # If set, each replica's process writes its counters to <stats_dir>/<pid>.gpu after each pass.
    stats_dir: str | None = None

    @classmethod
    def parse(cls, text: str) -> SimulatedGpu:
        gpu = PRESETS["bf16"]
        overrides: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                if item not in PRESETS:
                    raise ValueError(f"{ENV}: unknown preset {item!r} ({', '.join(PRESETS)})")
                gpu = PRESETS[item]
            elif key in ("tokens_per_s", "pass_ms"):
                overrides[key] = float(value)
            elif key == "dimensions":
                overrides[key] = int(value)
            elif key == "stats_dir":
                overrides[key] = value
            else:
                raise ValueError(f"{ENV}: unknown field {key!r} (tokens_per_s, pass_ms, dimensions, stats_dir)")
        return dataclasses.replace(gpu, **overrides)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SimulatedGpu | None:
        text = environ.get(ENV, "").strip()
        return cls.parse(text) if text else None

    def pass_seconds(self, padded_tokens: int) -> float:
        return self.pass_ms / 1000 + padded_tokens / self.tokens_per_s

    def model(self) -> SimulatedModel:
        return SimulatedModel(self)


PRESETS = {
    "bf16": SimulatedGpu(tokens_per_s=56_000, pass_ms=3.0),
    "fp8": SimulatedGpu(tokens_per_s=84_000, pass_ms=1.5),
}


class SimulatedModel(torch.nn.Module):
    """Stands in for the model: called as the engine calls a transformers encoder, it returns
    hidden states whose every position holds the row's vector (a broadcast view: no memory per
    token). It sees the whole row, so the engine finds it bidirectional and passes the attention
    mask, from which it reads each row's real tokens."""

    def __init__(self, gpu: SimulatedGpu):
        super().__init__()
        self.gpu = gpu
        self.config = SimpleNamespace(hidden_size=gpu.dimensions)
        table = np.random.default_rng(0).standard_normal((TABLE_ROWS, gpu.dimensions)).astype(np.float32)
        self.table = table / np.linalg.norm(table, axis=1, keepdims=True)
        self.passes, self.busy_s, self.padded_tokens = 0, 0.0, 0
        self._lock = threading.Lock()
        self._stats_fd = None
        if gpu.stats_dir:
            Path(gpu.stats_dir).mkdir(parents=True, exist_ok=True)
            self._stats_fd = os.open(Path(gpu.stats_dir) / f"{os.getpid()}.gpu", os.O_RDWR | os.O_CREAT, 0o644)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> SimpleNamespace:
        rows, width = input_ids.shape
        lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [width] * rows
        ids = input_ids.numpy()
        vectors = torch.from_numpy(np.stack([self.vector(ids[r, :n]) for r, n in enumerate(lengths)]))
        self._spend(rows * width)
        return SimpleNamespace(last_hidden_state=vectors[:, None, :].expand(rows, width, self.gpu.dimensions))

    def vector(self, ids: np.ndarray) -> np.ndarray:
        """A unit vector that depends only on the ids: a table row, rotated, both picked by their hash."""
        digest = int.from_bytes(hashlib.blake2b(ids.astype(np.int64).tobytes(), digest_size=8).digest(), "little")
        return np.roll(self.table[digest % TABLE_ROWS], (digest // TABLE_ROWS) % self.gpu.dimensions)

    def _spend(self, padded_tokens: int) -> None:
        """The device's time for the pass: a sleep, which releases the GIL as a CUDA sync does."""
        start = time.perf_counter()
        time.sleep(self.gpu.pass_seconds(padded_tokens))
        spent = time.perf_counter() - start
        with self._lock:
            self.passes += 1
            self.busy_s += spent
            self.padded_tokens += padded_tokens
            if self._stats_fd is not None:
                os.pwrite(self._stats_fd, STATS.pack(self.passes, self.busy_s, self.padded_tokens), 0)


def read_stats(stats_dir: str | Path) -> dict[int, tuple[int, float, int]]:
    """Per replica process id: passes, busy seconds and padded tokens so far."""
    stats = {}
    for path in Path(stats_dir).glob("*.gpu"):
        data = path.read_bytes()
        if len(data) == STATS.size:
            stats[int(path.stem)] = STATS.unpack(data)
    return stats
