"""What the Ingress learns from an Embedder about one of its models, once it has loaded it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    dimensions: int
    max_input_tokens: int
    max_batch_tokens: int
    pooling: str
    normalize: bool  # vectors leave the model normalized
    device: str
