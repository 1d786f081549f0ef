"""TEI's API (POST /embed, POST /, POST /tokenize, GET /info) on the served test app, called with
the real `huggingface_hub.InferenceClient` and httpx; vectors against testkit/reference.py.

TEI's routes serve the app's first model, tiny-sfr (args.tei.model unset).
"""

import json

import httpx
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.api import tei
from serve_app.api.errors import OpenAIError
from serve_app.deployments.app import AppArgs
from testkit.app import MAX_REQUEST_BYTES, SFR_TASK, TINY_MAX_TOKENS
from tests import common as fuzz
from tests.common import DOCS, LONG, QUERY, left_truncated_reference, post_body

pytestmark = pytest.mark.usefixtures("loopback_only")  # tests stay offline


@pytest.fixture(autouse=True)
def hub_client_may_connect(monkeypatch):
    """The test session sets HF_HUB_OFFLINE=1 (nothing may reach a model hub), under which
    huggingface_hub refuses every request, even to a local URL. These tests' requests go to the
    served app only, as loopback_only makes sure."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def client(base_url, api_keys):
    return InferenceClient(model=base_url, token=api_keys.tester)


def test_feature_extraction_equals_reference_on_both_routes(base_url, api_keys, client, base_reference):
    expected = base_reference.embed(DOCS)
    np.testing.assert_allclose(client.feature_extraction(DOCS), expected, atol=1e-5)  # POST /
    on_embed = InferenceClient(model=f"{base_url}/embed", token=api_keys.tester)
    np.testing.assert_allclose(on_embed.feature_extraction(DOCS), expected, atol=1e-5)
    one = client.feature_extraction(DOCS[0])
    assert one.shape == (1, expected.shape[1])  # TEI answers a single input as a batch of one
    np.testing.assert_allclose(one[0], expected[0], atol=1e-5)


def test_prompt_name_query_applies_the_query_instruction(client, base_reference):
    got = client.feature_extraction(QUERY, prompt_name="query")
    np.testing.assert_allclose(got[0], base_reference.embed([QUERY], SFR_TASK)[0], atol=1e-5)


def test_truncation_from_either_side_and_dimensions(client, base_reference):
    right = client.feature_extraction(LONG, truncate=True)
    np.testing.assert_allclose(right[0], base_reference.embed([LONG])[0], atol=1e-5)
    left = client.feature_extraction(LONG, truncate=True, truncation_direction="left")
    expected_left = base_reference.embed_ids(left_truncated_reference(base_reference, LONG, TINY_MAX_TOKENS))
    np.testing.assert_allclose(left[0], expected_left, atol=1e-5)
    cut = client.feature_extraction(DOCS[0], dimensions=16)[0]
    full = base_reference.embed(DOCS[:1])[0][:16]
    np.testing.assert_allclose(cut, full / np.linalg.norm(full), atol=1e-5)  # cut, then normalized


def test_refusals_reach_the_client_as_422(client):
    for call in (lambda: client.feature_extraction(LONG),  # too long, and truncate not asked for
                 lambda: client.feature_extraction(DOCS[0], normalize=False),  # tiny-sfr normalizes
                 lambda: client.feature_extraction(DOCS[0], prompt_name="nope")):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 422
        assert err.value.response.json()["error_type"] == "Validation"


def test_same_pipeline_and_cache_as_the_openai_route(http, base_reference):
    text = "a text sent through both front doors"
    tei_response = http.post("/embed", json={"inputs": [text]})
    openai_response = http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": [text], "encoding_format": "float"})
    assert tei_response.json() == [openai_response.json()["data"][0]["embedding"]]  # bit for bit
    assert tei_response.headers["x-request-class"] == "interactive"
    n_tokens = len(base_reference.token_ids(text))
    assert int(tei_response.headers["x-compute-tokens"]) == n_tokens == openai_response.json()["usage"]["prompt_tokens"]
    ids = base_reference.tokenizer(text)["input_ids"]  # token-id inputs, as TEI accepts them
    assert http.post("/embed", json={"inputs": ids}).json() == tei_response.json()


BAD_REQUESTS = [
    ({"inputs": []}, 400, "Empty"),
    ({"inputs": ["x"] * 2049}, 422, "Validation"),  # over max_inputs_per_request (TEI: max_client_batch_size)
    ({"inputs": 123}, 422, "Validation"),
    ({"inputs": ["x", ""]}, 422, "Validation"),
    ({"inputs": [[1, 2], "x"]}, 422, "Validation"),
    ({"inputs": [1, 99999]}, 422, "Validation"),  # out of the vocabulary
    ({"inputs": "x", "truncation_direction": "middle"}, 422, "Validation"),
    ({"inputs": "x", "dimensions": 65}, 422, "Validation"),
    ({"inputs": [1, 2], "prompt_name": "query"}, 422, "Validation"),  # no instruction on token ids
    ({"inputs": "x", "normalize": False}, 422, "Validation"),
    (b"{not json", 422, "Validation"),
    (b'{"inputs": "' + b"a" * MAX_REQUEST_BYTES + b'"}', 413, "Validation"),
]


@pytest.mark.parametrize("body, status, error_type", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_errors_have_tei_shape_and_status(http, body, status, error_type):
    response = post_body(http, "/embed", body)
    assert response.status_code == status
    error = response.json()
    assert set(error) == {"error", "error_type"} and error["error"] and error["error_type"] == error_type


def test_unknown_fields_are_ignored_as_tei_does(http, base_reference):
    got = http.post("/embed", json={"inputs": "x", "model": "anything", "user": "u"}).json()
    np.testing.assert_allclose(got[0], base_reference.embed(["x"])[0], atol=1e-5)


def test_api_keys_are_required(base_url, api_keys):
    for route, method in (("/embed", "POST"), ("/", "POST"), ("/tokenize", "POST"), ("/info", "GET")):
        response = httpx.request(method, f"{base_url}{route}", json={"inputs": "x"})
        assert response.status_code == 401 and response.json()["error_type"] == "Unauthorized"
    with pytest.raises(HfHubHTTPError) as err:
        InferenceClient(model=base_url, token="sk-wrong").feature_extraction("x")
    assert err.value.response.status_code == 401


def test_tokenize_shows_what_the_model_sees(http, base_reference):
    text = "ünï cats sleep"
    (tokens,) = http.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tokens] == base_reference.token_ids(text)  # <s> ... </s> appended
    assert set(tokens[0]) == {"id", "text", "special", "start", "stop"}
    for token in (tokens[0], tokens[-1]):
        assert token["special"] and token["start"] is None and token["stop"] is None
    assert [tokens[0]["text"], tokens[-1]["text"]] == ["<s>", "</s>"]
    data = text.encode("utf-8")
    for token in tokens[1:-1]:  # spans are UTF-8 byte offsets, as TEI's
        assert not token["special"] and data[token["start"] : token["stop"]].decode("utf-8", "replace") == token["text"]
    assert tokens[-2]["stop"] == len(data)
    plain, query = http.post("/tokenize", json={"inputs": [text, QUERY], "add_special_tokens": False}).json()
    assert [t["id"] for t in plain] == base_reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    (instructed,) = http.post("/tokenize", json={"inputs": QUERY, "prompt_name": "query"}).json()
    assert [t["id"] for t in instructed] == base_reference.token_ids(QUERY, SFR_TASK)


def test_info_and_health_through_the_client(base_url, api_keys, tiny_family):
    # These two calls need the provider named (the client's default is none).
    client = InferenceClient(model=base_url, token=api_keys.tester, provider="hf-inference")
    info = client.get_endpoint_info()
    assert info["model_id"] == str(tiny_family["base"]) and info["served_model_name"] == "tiny-sfr"
    assert info["model_type"] == {"embedding": {"pooling": "last_token"}}
    assert (info["model_dtype"], info["max_input_length"], info["max_client_batch_size"]) == ("float32", TINY_MAX_TOKENS, 2048)
    assert info["max_batch_tokens"] == 512 and info["auto_truncate"] is False
    assert client.health_check()


tei_requests = st.fixed_dictionaries({}, optional={
    "inputs": fuzz.inputs,
    "normalize": st.one_of(st.booleans(), fuzz.json_value),
    "truncate": st.one_of(st.booleans(), fuzz.json_value),
    "truncation_direction": st.one_of(st.sampled_from(["right", "Left", "middle"]), fuzz.json_value),
    "prompt_name": st.one_of(st.sampled_from(["query", "nope"]), fuzz.json_value),
    "dimensions": st.one_of(st.integers(min_value=-3, max_value=100), fuzz.json_value),
    "add_special_tokens": st.one_of(st.booleans(), fuzz.json_value),
})


def check_tei(response: httpx.Response) -> None:
    assert response.status_code in (200, 400, 422), response.text  # never 424/5xx: the service's fault
    body = response.json()
    if response.status_code == 200:
        assert isinstance(body, list) and body and all(isinstance(row, list) for row in body)
    else:
        assert set(body) == {"error", "error_type"}


@settings(fuzz.FUZZ, max_examples=300)
@given(payload=tei_requests, route=st.sampled_from(["/embed", "/tokenize"]))
def test_fuzzed_requests_get_tei_answers(http, payload, route):
    check_tei(http.post(route, content=json.dumps(payload), headers={"content-type": "application/json"}))


@settings(fuzz.FUZZ, max_examples=100)
@given(body=fuzz.raw_bodies)
def test_fuzzed_bodies_get_tei_answers(http, body):
    check_tei(http.post("/", content=body, headers={"content-type": "application/json"}))


# --- the schema's rules, without a server ------------------------------------------------------


@pytest.mark.parametrize("status, code, expected", [
    (429, "rate_limit_exceeded", (429, "Overloaded")),
    (503, "overloaded", (429, "Overloaded")),  # backpressure: TEI's "model is overloaded"
    (503, "not_ready", (503, "Unhealthy")),
    (500, "internal_error", (424, "Backend")),
])
def test_error_mapping_keeps_retry_after(status, code, expected):
    response = tei.tei_error(OpenAIError(status, "m", None, code, {"Retry-After": "1"}))
    assert (response.status_code, response.headers["retry-after"]) == (expected[0], "1")
    assert response.body == b'{"error":"m","error_type":"%s"}' % expected[1].encode()


def test_a_model_that_does_not_normalize_gives_its_own_vectors_or_normalized_ones():
    raw = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_array_equal(tei.tei_vectors(raw, None, normalize=False, model_normalizes=False), raw)
    np.testing.assert_allclose(tei.tei_vectors(raw, None, normalize=True, model_normalizes=False), raw / 13)
    np.testing.assert_allclose(tei.tei_vectors(raw, 2, normalize=True, model_normalizes=False), [[0.6, 0.8]])
    np.testing.assert_array_equal(tei.tei_vectors(raw, 2, normalize=False, model_normalizes=False), raw[:, :2])
    unit = raw / 13
    assert tei.tei_vectors(unit, None, normalize=True, model_normalizes=True) is unit  # as /v1/embeddings


def test_tei_model_must_be_a_served_model():
    args = {"models": [{"name": "a", "source": "x"}], "auth": {"enabled": False}}
    assert AppArgs.model_validate(args | {"tei": {"model": "a"}}).tei.model == "a"
    with pytest.raises(ValueError, match="tei.model 'b'"):
        AppArgs.model_validate(args | {"tei": {"model": "b"}})
