"""testkit/sfr_tokenizer.py: SFR's real vocabulary, offline, in SFR-shaped files, and the EOS rules over it."""

import json

import pytest
from transformers import AutoTokenizer

from serve_app.engine.spec import ModelSpec
from serve_app.engine.tokenization import load_input_tokenizer
from testkit.app import SFR_TASK, TINY_MAX_TOKENS, local_config_model, tiny_sfr_vocab_model
from testkit.sfr_tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, build_sfr_tokenizer


@pytest.fixture(scope="module")
def sfr_tokenizer_dir(tmp_path_factory):
    return build_sfr_tokenizer(tmp_path_factory.mktemp("sfr-tokenizer"))


def test_files_are_shaped_as_sfrs(sfr_tokenizer_dir):
    config = json.loads((sfr_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_eos_token"] is True and config["eos_token"] == "</s>"
    post = json.loads((sfr_tokenizer_dir / "tokenizer.json").read_text())["post_processor"]
    assert [next(iter(piece.values()))["id"] for piece in post["single"]] == ["<s>", "A"]


def test_the_real_vocabulary_and_the_eos_trap(sfr_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(sfr_tokenizer_dir)
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID)
    # Mistral-7B-v0.1's ids for these words (as its own tokenizer gives them).
    assert tokenizer("Hello world")["input_ids"] == [BOS_ID, 22557, 1526]
    # transformers 5 ignores add_eos_token: the trap SFR's files set.
    assert tokenizer("how do cats sleep")["input_ids"][-1] != EOS_ID


def test_the_service_appends_the_eos_over_the_real_vocabulary(sfr_tokenizer_dir):
    tokenizer = load_input_tokenizer(ModelSpec.model_validate(tiny_sfr_vocab_model(sfr_tokenizer_dir)))
    (query,) = tokenizer.tokenize_texts(["how do cats sleep"], task=SFR_TASK)
    hf = AutoTokenizer.from_pretrained(sfr_tokenizer_dir)
    assert query == hf(f"Instruct: {SFR_TASK}\nQuery: how do cats sleep")["input_ids"] + [EOS_ID]
    (cut,) = tokenizer.tokenize_texts(["many words " * 100], truncate=True)
    assert len(cut) == TINY_MAX_TOKENS and cut[0] == BOS_ID and cut[-1] == EOS_ID


@pytest.mark.parametrize("model", ["sfr", "minilm"])
def test_the_fast_encoder_gives_the_tokenizers_own_ids(model, sfr_tokenizer_dir):
    """The Rust backend's encode_batch_fast, used for speed, against transformers' own call, on
    texts of any script, special-token strings and lengths past MiniLM's tokenizer.json, whose
    truncation (128) and padding (Fixed 128) the fast path must not inherit."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    spec = tiny_sfr_vocab_model(sfr_tokenizer_dir) if model == "sfr" else local_config_model()
    input_tokenizer = load_input_tokenizer(ModelSpec.model_validate(spec))
    hf = input_tokenizer.tokenizer
    assert input_tokenizer.encode.__name__ == "fast"
    words = st.sampled_from(["</s>", "<s>", "[SEP]", "[CLS]", "Straße", "東京", "naïve", "e-mail", "  ", "\n", "🙂"])
    text = st.lists(st.one_of(st.text(max_size=40), words), max_size=60).map(" ".join)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(text, min_size=1, max_size=4))
    def agree(texts):
        assert input_tokenizer.encode(texts) == hf(texts, add_special_tokens=True)["input_ids"]

    agree()
    long = ["word " * 400]
    assert input_tokenizer.encode(long) == hf(long, add_special_tokens=True)["input_ids"]
    assert len(input_tokenizer.encode(long)[0]) > 400
