"""Vectors → OpenAI response bytes, straight from numpy (no Python loops over elements)."""

from __future__ import annotations

import base64

import numpy as np
import orjson


def apply_dimensions(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Keep the first `dimensions` components, then re-normalize so cosine stays meaningful."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    return l2_normalize(cut) if normalize else np.ascontiguousarray(cut)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (out of place: arrays from Ray's object store are read-only)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scaled: np.ndarray = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return scaled


def render_embeddings(
    vectors: np.ndarray, model: str, prompt_tokens: int, encoding_format: str
) -> bytes:
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        rows = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        rows = list(vectors)  # orjson writes float32 arrays natively
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
