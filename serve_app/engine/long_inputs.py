"""Long inputs embedded in windows (`long_input: chunk`): one vector per input from its windows.

`InputTokenizer.windows` cuts an over-long input into windows that each fit the model; every
window is embedded as a sequence of its own (so it is batched and cached like any input), and
`combine_windows` makes the input's vector: the mean of its windows' vectors weighted by their
lengths in tokens, re-normalized if the model normalizes. vLLM's chunked processing combines
chunks the same way (a mean weighted by each chunk's token count).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def split_windows(
    sequences: list[list[int]], windows_of: Callable[[list[int]], list[list[int]]]
) -> tuple[list[list[int]], list[int]]:
    """Every input's windows, input after input, and how many windows each input has."""
    windows, counts = [], []
    for ids in sequences:
        parts = windows_of(ids)
        windows.extend(parts)
        counts.append(len(parts))
    return windows, counts


def combine_windows(vectors: np.ndarray, windows: list[list[int]], counts: list[int], normalize: bool) -> np.ndarray:
    """One row per input from the rows of its windows (`vectors`, one per window, in order).

    An input of one window keeps its row as computed, bit for bit; several windows give their
    token-weighted mean (in float64), L2-normalized if `normalize`, as float32.
    """
    if len(counts) == len(windows):
        return vectors
    out = np.empty((len(counts), vectors.shape[1]), dtype=np.float32)
    start = 0
    for i, count in enumerate(counts):
        rows = vectors[start : start + count]
        if count == 1:
            out[i] = rows[0]
        else:
            weights = np.array([len(w) for w in windows[start : start + count]], dtype=np.float64)
            mean = weights @ rows.astype(np.float64) / weights.sum()
            if normalize:
                mean /= max(np.linalg.norm(mean), np.finfo(np.float64).tiny)
            out[i] = mean
        start += count
    return out
