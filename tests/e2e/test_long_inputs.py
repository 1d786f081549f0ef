"""Long inputs: `long_input: chunk` windows, their combination, and truncation from either side.

The reference is computed here, independently of the code under test, from the tokenizer and
testkit/reference.py's per-text model: tokenize the text without special tokens, cut it into
windows of `max_input_tokens - 2` tokens, give each `<s>` and `</s>`, embed each window alone,
take the mean weighted by the windows' lengths, L2-normalize.
"""

import numpy as np
import pytest

from serve_app.engine.embedder import EmbeddingEngine
from serve_app.engine.errors import InputError
from serve_app.engine.long_inputs import combine_windows, split_windows
from serve_app.engine.tokenization import load_input_tokenizer
from testkit.app import SFR_TASK, TINY_MAX_TOKENS
from testkit.reference import reference_long_vector, reference_windows
from tests.common import LONG, left_truncated_reference, spec_for

SHORT = "how do cats sleep"


@pytest.fixture(scope="module")
def chunking(tiny_family):
    spec = spec_for(tiny_family["base"], long_input="chunk")
    return load_input_tokenizer(spec), EmbeddingEngine.load(spec)


def test_windows_fit_and_carry_the_special_tokens_of_a_lone_input(chunking, base_reference):
    tokenizer, _ = chunking
    (ids,) = tokenizer.tokenize_texts([LONG])
    assert len(ids) > 2 * TINY_MAX_TOKENS  # kept whole for the windows, not refused
    windows = tokenizer.windows(ids)
    assert windows == reference_windows(base_reference, LONG, TINY_MAX_TOKENS)
    assert len(windows) >= 3 and len(windows[-1]) < TINY_MAX_TOKENS  # a last, shorter window
    assert tokenizer.windows(tokenizer.tokenize_texts([SHORT])[0]) == [base_reference.token_ids(SHORT)]


def test_chunked_vector_equals_the_per_window_reference(chunking, base_reference):
    tokenizer, engine = chunking
    ids = tokenizer.tokenize_texts([SHORT, LONG, SHORT])
    windows, counts = split_windows(ids, tokenizer.windows)
    assert counts[0] == counts[2] == 1 and counts[1] >= 3
    vectors = combine_windows(engine.embed(windows), windows, counts, normalize=True)
    expected, _ = reference_long_vector(base_reference, LONG, TINY_MAX_TOKENS)
    np.testing.assert_allclose(vectors[1], expected, atol=1e-5)
    np.testing.assert_allclose(vectors[[0, 2]], base_reference.embed([SHORT, SHORT]), atol=1e-5)


def test_combining_keeps_one_window_inputs_bit_for_bit_and_weights_by_length():
    rows = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    windows = [[1, 2], [1, 2, 3], [1], [5, 6]]
    assert combine_windows(rows, windows, [1, 1, 1, 1], normalize=True) is rows  # nothing to combine
    raw = combine_windows(rows, windows, [1, 2, 1], normalize=False)
    np.testing.assert_array_equal(raw[[0, 2]], rows[[0, 3]])
    np.testing.assert_allclose(raw[1], [3 / 4, 1 / 4])  # weights 3 and 1
    unit = combine_windows(rows, windows, [1, 2, 1], normalize=True)
    np.testing.assert_allclose(unit[1], np.array([3, 1]) / np.sqrt(10), rtol=1e-6)
    assert unit.dtype == np.float32


def test_truncate_wins_over_chunking(chunking, base_reference):
    tokenizer, _ = chunking
    (ids,) = tokenizer.tokenize_texts([LONG], truncate=True)
    assert ids == base_reference.token_ids(LONG)  # the tokenizer's own truncation, EOS kept


def test_an_instructed_query_is_never_chunked(chunking):
    tokenizer, _ = chunking
    with pytest.raises(InputError) as err:
        tokenizer.tokenize_texts([LONG], task=SFR_TASK)
    assert err.value.code == "context_length_exceeded" and "long_input: chunk" in err.value.message


def test_left_truncation_equals_the_tokenizers_own(base_reference, tiny_family):
    tokenizer = load_input_tokenizer(spec_for(tiny_family["base"]))
    expected = left_truncated_reference(base_reference, LONG, TINY_MAX_TOKENS)
    (ids,) = tokenizer.tokenize_texts([LONG], truncate=True, direction="left")
    assert ids == expected and ids[0] == base_reference.tokenizer.bos_token_id
    # Token ids get the same rule: the text's end is kept, and the special tokens.
    (from_ids,) = tokenizer.check_token_ids([base_reference.tokenizer(LONG)["input_ids"]], truncate=True,
                                            direction="left")
    assert from_ids == expected


def test_token_id_inputs_are_windowed_with_the_special_tokens_they_have(chunking):
    tokenizer, _ = chunking
    (ids,) = tokenizer.check_token_ids([list(range(3, 3 + 150))])  # no <s>: the client sent none
    windows = tokenizer.windows(ids)
    assert [w[-1] for w in windows] == [2] * len(windows) and all(w[0] != 1 for w in windows)
    assert [t for w in windows for t in w[:-1]] == list(range(3, 3 + 150))
    assert all(len(w) <= TINY_MAX_TOKENS for w in windows)


# --- served: the app of conftest.py has tiny-sfr-chunk ----------------------------------


def test_served_long_document_is_chunked_and_usage_counts_every_window(http, base_reference):
    body = {"model": "tiny-sfr-chunk", "input": [LONG, SHORT], "encoding_format": "float"}
    first = http.post("/v1/embeddings", json=body).json()
    expected, long_tokens = reference_long_vector(base_reference, LONG, TINY_MAX_TOKENS)
    got = np.array([d["embedding"] for d in first["data"]], dtype=np.float32)
    np.testing.assert_allclose(got[0], expected, atol=1e-5)
    np.testing.assert_allclose(got[1], base_reference.embed([SHORT])[0], atol=1e-5)
    assert first["usage"]["prompt_tokens"] == long_tokens + len(base_reference.token_ids(SHORT))
    # A repeat (its windows cached like inputs of their own) gives the same vectors and usage.
    again = http.post("/v1/embeddings", json=body).json()
    assert again["data"] == first["data"] and again["usage"] == first["usage"]


def test_served_truncate_and_instructed_queries_on_a_chunking_model(http, base_reference):
    cut = http.post("/v1/embeddings", json={"model": "tiny-sfr-chunk", "input": LONG, "truncate": True,
                                            "encoding_format": "float"}).json()
    assert cut["usage"]["prompt_tokens"] == TINY_MAX_TOKENS
    np.testing.assert_allclose(cut["data"][0]["embedding"], base_reference.embed([LONG])[0], atol=1e-5)
    refused = http.post("/v1/embeddings", json={"model": "tiny-sfr-chunk", "input": LONG, "input_type": "query"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
