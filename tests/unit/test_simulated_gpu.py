"""serve_app/engine/simulated_gpu.py: the benchmarks' GPU stand-in, chosen by the environment."""

import os
import threading
import time

import numpy as np
import pytest
import torch

from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.simulated_gpu import ENV, PRESETS, SimulatedGpu, read_stats
from serve_app.engine.tokenization import load_input_tokenizer
from tests.common import TEXTS, spec_for


def test_presets_and_overrides_parse():
    assert SimulatedGpu.parse("bf16") == PRESETS["bf16"]
    assert PRESETS["fp8"].tokens_per_s > PRESETS["bf16"].tokens_per_s
    gpu = SimulatedGpu.parse("fp8, pass_ms=2, dimensions=64")
    assert (gpu.tokens_per_s, gpu.pass_ms, gpu.dimensions) == (PRESETS["fp8"].tokens_per_s, 2.0, 64)
    assert SimulatedGpu.parse("tokens_per_s=1000").pass_seconds(500) == pytest.approx(PRESETS["bf16"].pass_ms / 1000 + 0.5)
    assert SimulatedGpu.from_environment({}) is None
    for bad in ("h100", "rate=5"):
        with pytest.raises(ValueError, match=ENV):
            SimulatedGpu.parse(bad)


@pytest.fixture(scope="module")
def simulated(tiny_family, tmp_path_factory):
    """The engine EmbeddingEngine.load builds with the variable set: slow enough to time, small vectors."""
    stats_dir = tmp_path_factory.mktemp("gpu-stats")
    spec = spec_for(tiny_family["base"], max_batch_tokens=256)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV, f"tokens_per_s=20000,pass_ms=20,stats_dir={stats_dir}")
        engine = EmbeddingEngine.load(spec)
    return load_input_tokenizer(spec), engine, stats_dir


def test_vectors_are_unit_4096_and_depend_only_on_the_ids(simulated):
    tokenizer, engine, _ = simulated
    assert engine.dimensions == 4096 and engine.lanes == 1
    ids = tokenizer.tokenize_texts(TEXTS, truncate=True)
    together = engine.embed(ids)
    assert together.shape == (len(TEXTS), 4096)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.stack([engine.embed([seq])[0] for seq in ids])
    np.testing.assert_array_equal(together, alone)  # not its batch-mates, not its padding
    assert np.abs(together @ together.T - np.eye(len(TEXTS))).max() < 0.2  # distinct texts, distinct vectors


def test_each_pass_spends_the_gpus_time_and_is_counted(simulated):
    _, engine, stats_dir = simulated
    before = read_stats(stats_dir)[os.getpid()]
    done = engine.embed_counted([[1, 5, 2]] * 100)  # 300 tokens: two passes of at most 256
    passes, busy_s, padded = (after - first for after, first in zip(read_stats(stats_dir)[os.getpid()], before))
    assert (passes, padded) == (2, done.padded_tokens) and padded >= 300
    assert busy_s >= 2 * 0.020 + padded / 20000


def test_a_pass_leaves_the_gil_to_other_threads():
    """The replica's event loop must keep running Python while the GPU works, as with a real device:
    a thread spinning in Python beside a 0.3 s pass keeps most of its pace alone (a pass that held
    the GIL would stop it but for a switch interval or so)."""
    model = SimulatedGpu.parse("pass_ms=300,dimensions=8").model()

    def spin_rate(until) -> float:
        spins, start = 0, time.perf_counter()
        while not until():
            spins += 1
        return spins / (time.perf_counter() - start)

    quiet_end = time.perf_counter() + 0.2
    alone = spin_rate(lambda: time.perf_counter() > quiet_end)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (model(input_ids=torch.ones((4, 8), dtype=torch.long)), done.set()))
    worker.start()
    beside = spin_rate(done.is_set)
    worker.join()
    assert model.busy_s >= 0.3 and beside > 0.25 * alone, (beside, alone)
