"""The API layer on its own: request parsing, errors, encoding."""

import base64

import numpy as np
import orjson
import pytest

from serve_app.api.encoding import apply_dimensions, render_embeddings
from serve_app.api.errors import OpenAIError, quote
from serve_app.api.limits import InflightTokens, RequestLimits, token_bounds
from serve_app.api.schemas import Inputs, parse_request


def parse(**fields):
    return parse_request({"model": "m"} | fields)


@pytest.mark.parametrize(
    "value, texts, token_ids",
    [
        ("hi", ["hi"], None),
        (["a", "b"], ["a", "b"], None),
        ([1, 2, 3], None, [[1, 2, 3]]),
        ([[1, 2], [3]], None, [[1, 2], [3]]),
    ],
)
def test_every_openai_input_form(value, texts, token_ids):
    inputs = parse(input=value).inputs
    assert (inputs.texts, inputs.token_ids) == (texts, token_ids)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [1.5]}, "input"),
        ({"input": [True]}, "input"),
        ({"input": [[1], [2.0]]}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": None}, "input"),
        ({}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": "8"}, "dimensions"),
        ({"input": "a", "input_type": "passage"}, "input_type"),
        ({"input": "a", "instruction": ""}, "instruction"),
        ({"input": "a", "truncate": "yes"}, "truncate"),
        ({"input": "a", "frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_requests_are_400_with_the_param_named(fields, param):
    with pytest.raises(OpenAIError) as err:
        parse(**fields)
    assert err.value.status == 400 and err.value.param == param
    body = err.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"


def test_missing_model_and_non_object_body():
    with pytest.raises(OpenAIError, match="model"):
        parse_request({"input": "a"})
    with pytest.raises(OpenAIError, match="JSON object"):
        parse_request(["a"])


def test_dimensions_truncate_then_renormalize():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[:1].setflags(write=False)
    vectors.setflags(write=False)  # as arrays that come out of Ray's object store are
    cut = apply_dimensions(vectors[:1], 4, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-6)
    cut = apply_dimensions(vectors, 4, normalize=True)
    expected = vectors[:, :4] / np.linalg.norm(vectors[:, :4], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, rtol=1e-6)
    assert apply_dimensions(vectors, None, True) is vectors
    np.testing.assert_array_equal(apply_dimensions(vectors, 4, normalize=False), vectors[:, :4])


def test_float_and_base64_encode_the_same_float32_values():
    vectors = np.array([[0.1, -0.2, 1e-8], [3.0, 0.0, -1.5]], dtype=np.float32)
    as_float = orjson.loads(render_embeddings(vectors, "m", 7, "float"))
    as_b64 = orjson.loads(render_embeddings(vectors, "m", 7, "base64"))
    assert as_float["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert as_float["object"] == "list" and as_float["model"] == "m"
    for i, (f, b) in enumerate(zip(as_float["data"], as_b64["data"])):
        assert f["index"] == b["index"] == i and f["object"] == "embedding"
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, vectors[i])
        np.testing.assert_array_equal(np.array(f["embedding"], dtype=np.float32), vectors[i])


def test_inflight_token_bound_sheds_with_503_and_recovers():
    from serve_app.api.limits import InflightTokens

    budget = InflightTokens(limit=100)
    budget.acquire(80)
    with pytest.raises(OpenAIError) as err:
        budget.acquire(30)
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
    budget.release(80)
    budget.acquire(500)  # alone, even an over-limit request runs rather than starving forever
    budget.release(500)
    assert budget.current == 0


@pytest.mark.parametrize(
    "fields, quoted",
    [
        ({"input": "a", "encoding_format": "int8"}, '"int8"'),
        ({"input": "a", "dimensions": True}, "true"),  # a JSON boolean is not the integer 1
        ({"input": "a", "dimensions": 1.5}, "1.5"),
        ({"input": [1, True]}, "input[1] is true"),
        ({"input": [[1, 2], [3, False]]}, "not false"),
        ({"input": ["a", 7]}, "input[1] is 7"),
        ({"input": "a", "model": ["m"]}, '["m"]'),
    ],
)
def test_a_400_quotes_the_value_it_rejects(fields, quoted):
    with pytest.raises(OpenAIError) as err:
        parse_request({"model": "m"} | fields)
    assert err.value.status == 400 and quoted in err.value.message


def test_quoted_values_are_bounded():
    long_value = "x" * 10_000
    for fields in ({"input": "a", "encoding_format": long_value}, {"input": "a", long_value: 1}):
        with pytest.raises(OpenAIError) as err:
            parse_request({"model": "m"} | fields)
        assert '"xxxxxxxx' in err.value.message and "…" in err.value.message
        assert len(err.value.message) < 200 and len(err.value.param) <= 40
    nested: list = []
    for _ in range(500):
        nested = [nested]
    assert quote(nested) == "[[[[[…]]]]]"
    assert quote("\ud800") == '"\\ud800"'  # a lone surrogate stays encodable in the error body


def test_token_bounds_before_tokenizing():
    limits = RequestLimits(max_tokens_per_request=1000)
    texts = Inputs(texts=["héllo", "x" * 5000])  # 6 and 5000 UTF-8 bytes, a word each
    assert token_bounds(texts, False, 64, specials=2, instruction_bytes=0, limits=limits) == (6, 1000)  # capped
    assert token_bounds(texts, True, 64, specials=2, instruction_bytes=10, limits=limits) == (6, 18 + 64)
    # 600 words; then 1 with a letter, twice: non-ASCII, and ASCII with a control character
    words = Inputs(texts=["a b c " * 200, "\u0301\t\x00 ... ok"])
    assert token_bounds(words, False, 64, specials=2, instruction_bytes=0, limits=limits)[0] == 602 + 3
    assert token_bounds(words, True, 64, specials=2, instruction_bytes=0, limits=limits)[0] == 64 + 3
    ascii_control = Inputs(texts=["\x01 \x7f ok"])
    assert token_bounds(ascii_control, False, 64, specials=2, instruction_bytes=0, limits=limits)[0] == 1 + 2
    ids = Inputs(token_ids=[[5] * 600, [6] * 500])
    assert token_bounds(ids, False, 64, specials=1, instruction_bytes=0, limits=limits)[0] == 1100  # over: refused untokenized
    assert token_bounds(ids, True, 64, specials=1, instruction_bytes=0, limits=limits) == (0, 128)


def test_inflight_budget_taken_on_an_estimate_settles_on_the_count():
    inflight = InflightTokens(limit=1000)
    inflight.acquire(800)  # admitted on its estimate
    inflight.resize(800, 300)  # tokenized: fewer than estimated, never refused
    inflight.acquire(600)  # the room given back is used
    with pytest.raises(OpenAIError) as info:
        inflight.resize(300, 500)  # growth past the limit, beside another request: 503
    assert info.value.status == 503 and inflight.current == 900  # ... and it still holds 300
    inflight.release(600)
    inflight.resize(300, 5000)  # alone, a request may exceed the limit
    inflight.release(5000)
    assert inflight.current == 0
