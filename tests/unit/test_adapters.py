"""Several LoRA adapters over one loaded base: each model equals its own merged model (checked
against the per-text reference on that merged model), the base is in memory once, and the
config rules that put models on one base into one Embedder deployment."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_app.deployments.app import AppArgs, deployment_names
from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.spec import ModelSpec, Tuning, share_base
from serve_app.engine.tokenization import load_input_tokenizer
from testkit.app import TINY_MAX_TOKENS
from tests.common import TEXTS as ENGINE_TEXTS

TEXTS = ENGINE_TEXTS + ["why do dogs dream about chasing rabbits", "numbers 0 1 2 3 and punctuation"]
MODELS = ("base", "lora", "lora-b")


def spec_for(tiny_family, name: str, **overrides) -> ModelSpec:
    adapter = {"base": None, "lora": "adapter", "lora-b": "adapter2"}[name]
    fields = {"name": name, "source": str(tiny_family["base"]), "max_input_tokens": TINY_MAX_TOKENS,
              "max_batch_tokens": 256, "adapter": str(tiny_family[adapter]) if adapter else None}
    return ModelSpec(**(fields | overrides))


@pytest.fixture(scope="module")
def shared(tiny_family):
    """The bare base and its two adapters in one engine: small passes on two lanes, so that a
    call runs as several passes side by side."""
    specs = [spec_for(tiny_family, name, tuning=Tuning(micro_batch_tokens=64, cpu_lanes=2)) for name in MODELS]
    return EmbeddingEngine.load_models(specs, cpu_threads=2)


@pytest.fixture(scope="module")
def references(base_reference, merged_reference, merged2_reference):
    return {"base": base_reference, "lora": merged_reference, "lora-b": merged2_reference}


@pytest.fixture(scope="module")
def tokenize(tiny_family):
    tokenizer = load_input_tokenizer(spec_for(tiny_family, "base"))
    return lambda texts: tokenizer.tokenize_texts(texts, truncate=True)


def test_each_model_on_a_shared_base_equals_its_merged_model(shared, references, tokenize):
    texts = TEXTS * 3
    models = [MODELS[i % 3] for i in range(len(texts))]  # every pass mixes the three
    ids = tokenize(texts)
    layouts = {"padded, adapters mixed in a pass": (True, 1.0), "padded, one pass per adapter": (False, 1.0),
               "packed (one adapter per row)": (True, 0.0)}
    try:
        for layout, (mix, pack) in layouts.items():
            shared.mix_adapters, shared.pack_above_padding = mix, pack
            got = shared.embed(ids, models=models)
            for model in MODELS:
                rows = [i for i, m in enumerate(models) if m == model]
                expected = references[model].embed([texts[i] for i in rows])
                np.testing.assert_allclose(got[rows], expected, atol=1e-5, err_msg=f"{model}, {layout}")
    finally:
        shared.mix_adapters, shared.pack_above_padding = True, 1.0
    assert np.abs(references["lora"].embed(TEXTS) - references["base"].embed(TEXTS)).max() > 1e-2
    assert np.abs(references["lora-b"].embed(TEXTS) - references["lora"].embed(TEXTS)).max() > 1e-2


def test_passes_of_different_adapters_run_side_by_side(shared, references, tokenize):
    """Calls from several threads, on two lanes: PEFT's own forward(adapter_names=...) shares its
    per-call hooks between threads and fails here (see serve_app/engine/adapters.py)."""
    ids = tokenize(TEXTS)
    expected = {model: references[model].embed(TEXTS) for model in MODELS}
    calls = [[model] * len(ids) for model in MODELS] * 4 + [[MODELS[(i + k) % 3] for i in range(len(ids))]
                                                             for k in range(3)] * 2
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda models: shared.embed(ids, models=models), calls))
    for models, got in zip(calls, results):
        want = np.stack([expected[model][i] for i, model in enumerate(models)])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_shared_base_is_in_memory_once_beside_unmerged_adapters(shared, tiny_family):
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from transformers import AutoModel

    params = dict(shared.model.named_parameters())
    base_params = [p for name, p in params.items() if ".lora_" not in name]
    lora_params = [p for name, p in params.items() if ".lora_" in name]
    base = AutoModel.from_pretrained(tiny_family["base"])
    assert sum(p.numel() for p in base_params) == sum(p.numel() for p in base.parameters())
    assert len({p.data_ptr() for p in base_params}) == len(base_params), "a base weight is held twice"
    saved = sum(t.numel() for a in ("adapter", "adapter2")
                for t in load_file(tiny_family[a] / "adapter_model.safetensors").values())
    assert sum(p.numel() for p in lora_params) == saved  # the adapters' own matrices, nothing more
    layers = [m for m in shared.model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(layer.merged for layer in layers)
    assert shared.resolved_models.keys() == set(MODELS)


def test_a_lone_adapter_is_merged_unless_it_says_otherwise(tiny_family, merged_reference, tokenize):
    ids = tokenize(TEXTS)
    merged = EmbeddingEngine.load(spec_for(tiny_family, "lora"))
    unmerged = EmbeddingEngine.load(spec_for(tiny_family, "lora", merge_adapter=False))
    assert not any(".lora_" in name for name, _ in merged.model.named_parameters())
    assert any(".lora_" in name for name, _ in unmerged.model.named_parameters())
    for engine in (merged, unmerged):
        np.testing.assert_allclose(engine.embed(ids, models=["lora"] * len(ids)), merged_reference.embed(TEXTS),
                                   atol=1e-5)


def test_a_shared_engine_needs_each_rows_model(shared, tokenize):
    ids = tokenize(TEXTS[:2])
    with pytest.raises(ValueError, match="name the model of each"):
        shared.embed(ids)
    with pytest.raises(ValueError, match="'nope' is not one of"):
        shared.embed(ids, models=["base", "nope"])
    with pytest.raises(ValueError, match="one engine per model"):  # its hooks would override the first's
        EmbeddingEngine(shared.model, "cpu", "last_token", True, 64, adapters=shared.adapters)


def test_adapters_keep_the_models_dtype(tiny_family):
    """PEFT's default keeps a bf16 model's adapters in float32 (for training): every pass's LoRA
    products would run in float32."""
    import torch

    engine = EmbeddingEngine.load_models([spec_for(tiny_family, name, dtype="bfloat16") for name in ("base", "lora")])
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}


def test_models_on_one_base_share_one_deployment_named_after_the_first():
    specs = [
        ModelSpec(name="e5", source="intfloat/e5-mistral-7b-instruct"),
        ModelSpec(name="sfr", source="intfloat/e5-mistral-7b-instruct", adapter="org/sfr-lora"),
        ModelSpec(name="own", source="intfloat/e5-mistral-7b-instruct", adapter="org/x", merge_adapter=True),
        ModelSpec(name="other", source="org/other"),
        ModelSpec(name="pinned", source="intfloat/e5-mistral-7b-instruct", revision="v1", adapter="org/y"),
        ModelSpec(name="tenant", source="intfloat/e5-mistral-7b-instruct", adapter="org/z"),
    ]
    assert [[s.name for s in group] for group in share_base(specs)] == [
        ["e5", "sfr", "tenant"], ["own"], ["other"], ["pinned"]]
    tokenizers, embedders = deployment_names(specs)
    # One tokenizer for the base and its adapters; a revision of its own tokenizes apart.
    assert tokenizers == {s.name: "Tokenizer-pinned" if s.name == "pinned" else "Tokenizer-e5" if s.source.startswith("intfloat")
                          else f"Tokenizer-{s.name}" for s in specs}
    assert embedders == {"e5": "Embedder-e5", "sfr": "Embedder-e5", "tenant": "Embedder-e5", "own": "Embedder-own",
                         "other": "Embedder-other", "pinned": "Embedder-pinned"}
    assert deployment_names(specs[:1]) == ({"e5": "Tokenizer"}, {"e5": "Embedder"})


def test_models_on_one_base_must_agree_on_its_deployment_settings():
    models = [{"name": "e5", "source": "s"}, {"name": "sfr", "source": "s", "adapter": "a", "max_batch_tokens": 512}]
    with pytest.raises(ValueError, match="set max_batch_tokens differently"):
        AppArgs.model_validate({"models": models, "auth": {"enabled": False}})
    models[1] = {"name": "sfr", "source": "s", "adapter": "a", "tuning": {"cpu_lanes": 1}}
    with pytest.raises(ValueError, match=r"set tuning\.cpu_lanes differently"):
        AppArgs.model_validate({"models": models, "auth": {"enabled": False}})
    models[1]["merge_adapter"] = True  # its own deployment: nothing to agree on
    AppArgs.model_validate({"models": models, "auth": {"enabled": False}})
    with pytest.raises(ValueError, match="no adapter"):
        ModelSpec(name="m", source="s", merge_adapter=True)
