"""The compiled forward on CPU (compiled.py): vectors equal the reference, compiles stay bounded
whatever the pass shapes, and pass shapes are bucketed as the CUDA graphs need."""

import numpy as np
import pytest
from torch._dynamo.utils import counters

from serve_app.engine.compiled import graph_shapes, pass_shape, repeated_layers
from serve_app.engine.embedder import DEFAULT_COMPILE, EmbeddingEngine
from serve_app.engine.scheduling import RequestClass
from serve_app.engine.spec import ModelSpec, Tuning
from serve_app.engine.tokenization import load_input_tokenizer
from testkit.app import TINY_MAX_TOKENS
from tests.common import TEXTS, spec_for


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled(tiny_family):
    """A compiled engine on the tiny model, warmed up as a replica is before it is ready."""
    spec = spec_for(tiny_family["base"], compile=True, tuning=Tuning(micro_batch_tokens=256, cpu_lanes=2))
    engine = EmbeddingEngine.load(spec, cpu_threads=2)
    before = graphs_compiled()
    engine.warm_up()
    return load_input_tokenizer(spec), engine, graphs_compiled() - before


def test_compiled_vectors_equal_the_reference(compiled, base_reference):
    tokenizer, engine, _ = compiled
    assert engine.compiled and not engine.cuda_graphs  # CUDA graphs: on CUDA only
    ids = tokenizer.tokenize_texts(TEXTS * 4, truncate=True)
    np.testing.assert_allclose(engine.embed(ids), base_reference.embed(TEXTS * 4), atol=1e-5)
    # A row padded to its pass's bucket, beside longer rows, equals the row alone.
    alone = np.stack([engine.embed([seq])[0] for seq in ids[:6]])
    np.testing.assert_allclose(engine.embed(ids[:6]), alone, atol=1e-5)


def test_the_warm_up_compiles_and_no_pass_shape_compiles_again(compiled):
    tokenizer, engine, warm_up_graphs = compiled
    assert 1 <= warm_up_graphs <= 2  # one layer graph, and one for a pass of one row
    rng = np.random.default_rng(0)
    before, shapes = graphs_compiled(), set()
    for n in (1, 2, 3, 5, 8, 13, 21, 34):
        lengths = rng.integers(2, TINY_MAX_TOKENS + 1, size=n).tolist()
        seqs = [[1, *rng.integers(3, 300, size=k - 2).tolist(), 2] for k in lengths]
        request_class = RequestClass.INTERACTIVE if n % 2 else RequestClass.BATCH
        shapes |= {pass_shape(len(p.indices), p.width, engine.max_width, graphs=False)
                   for p in engine._plan(lengths)}
        engine.embed(seqs, request_class)
    assert len(shapes) >= 8  # many pass shapes ran ...
    assert graphs_compiled() == before  # ... and none of them compiled anything


def test_every_layer_runs_the_compiled_layer(compiled):
    _, engine, _ = compiled
    layers = repeated_layers(engine.model)
    assert len(layers) == 2 and all("forward" in vars(layer) for layer in layers)


def test_pass_shapes_are_bucketed_within_bounds():
    assert pass_shape(9, 17, graphs=False) == (9, 32)  # no CUDA graphs: aligned, not a power of two
    for rows in range(1, 130):
        for width in range(1, 700, 7):
            shaped_rows, shaped_width = pass_shape(rows, width, max_width=600)
            assert shaped_rows >= rows and shaped_width >= width
            assert shaped_width <= max(width, 600)
            if rows <= 32 and width <= 64:  # small: a CUDA-graph shape (at most 32 x 64 = GRAPH_MAX_TOKENS)
                assert (shaped_rows, shaped_width) in graph_shapes(600)
            elif (shaped_rows, shaped_width) not in graph_shapes(600):
                assert shaped_rows == rows and shaped_width - width < 16
                assert shaped_width % 16 == 0 or shaped_width == max(width, 600)  # aligned, or capped
    assert len(graph_shapes()) <= 40  # the warm-up records each one on CUDA


def test_compile_setting_defaults_to_the_devices_measured_choice(tiny_family):
    assert DEFAULT_COMPILE == {"cpu": False, "cuda": False}  # until measured: bench.cpu_engine / gpu_engine
    assert not EmbeddingEngine.load(spec_for(tiny_family["base"])).compiled
    with pytest.raises(ValueError):
        ModelSpec(name="m", source="s", compile="sometimes")
    with pytest.raises(ValueError):
        ModelSpec(name="m", source="s", fp8_granularity="column")
    assert ModelSpec(name="m", source="s").fp8_granularity == "row"
