"""10,000 generated requests against the running service, from its own OpenAPI document.

Schemathesis reads each POST route's request schema from /openapi.json (with the served model
names put in, so that many requests reach the models) and generates requests that conform to it
and requests that break it (wrong types, missing and unknown fields, bodies that are not JSON).
Each generated request is sent as it is and with VARIANTS - 1 hostile edits drawn by hypothesis
(a field set to a boolean, null, a huge number, a deep or long value, a field dropped, an unknown
one added): schemathesis spends most of the run's time per case, the edits almost none.
Whatever arrives, the answer is never a 5xx, and it is either the route's success body or its
error shape (OpenAI's; TEI's on TEI's routes). The service is still correct after.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.common import FUZZ

VARIANTS = 10  # requests per generated case, sent concurrently: the case, and 9 hostile edits of it
OPENAI_CASES = 800  # x VARIANTS requests to /v1/embeddings
TEI_CASES = 200  # x VARIANTS to TEI's /embed, / and /tokenize
_DEEP: list = []
for _ in range(300):
    _DEEP = [_DEEP]
HOSTILE = [True, False, None, 0, -1, 2**64, -(2**63) - 1, 1.5, 1e308, "", "\x00", "x" * 5000, [], [[]], {}, [True],
           [[1, True]], [1, None], ["a", 1], [""], ["a"] * 3000, [[5] * 3000], _DEEP, {"input": "nested"}]



@pytest.fixture(scope="module")
def concurrent_http(base_url, api_keys):
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {api_keys.tester}"},
                      limits=httpx.Limits(max_connections=VARIANTS)) as c:
        yield c


@pytest.fixture(scope="module")
def operations(concurrent_http) -> dict[str, st.SearchStrategy]:
    """Per POST route of the service's OpenAPI document: schemathesis's cases, valid or not."""
    document = concurrent_http.get("/openapi.json").json()
    # The tiny models: the session's real one (all-MiniLM-L6-v2) costs a 22M-parameter forward per
    # request on 2 cores, behind the same pipeline.
    served = [card["id"] for card in concurrent_http.get("/v1/models").json()["data"] if card["id"].startswith("tiny-")]
    for operations in document["paths"].values():
        if "post" in operations:
            schema = operations["post"]["requestBody"]["content"]["application/json"]["schema"]
            if "model" in schema["properties"]:  # most requests name a served model, some an unknown one
                schema["properties"]["model"] = {"enum": served + ["no-such-model"]}
    api = schemathesis.openapi.from_dict(document)
    return {
        route: st.one_of(*(api[route]["POST"].as_strategy(generation_mode=mode) for mode in GenerationMode))
        for route in ("/v1/embeddings", "/embed", "/", "/tokenize")
    }


def encoded(body) -> bytes:
    if isinstance(body, bytes):
        return body
    try:
        return json.dumps(body).encode()
    except TypeError:  # schemathesis's "no body at all"
        return b""


def variants(data: st.DataObject, body) -> list[bytes]:
    """The case's body, and VARIANTS - 1 hostile edits of it (of an object body)."""
    bodies = [encoded(body)]
    for k in range(VARIANTS - 1):
        if not isinstance(body, dict) or not body:
            edited = data.draw(st.sampled_from(HOSTILE))
        elif k % 4 == 2:  # a field dropped
            dropped = data.draw(st.sampled_from(sorted(body)))
            edited = {f: v for f, v in body.items() if f != dropped}
        elif k % 4 == 3:  # an unknown field
            edited = body | {data.draw(st.text(min_size=1, max_size=12)): data.draw(st.sampled_from(HOSTILE))}
        else:  # a field set to a hostile value
            edited = body | {data.draw(st.sampled_from(sorted(body))): data.draw(st.sampled_from(HOSTILE))}
        bodies.append(encoded(edited))
    return bodies


def send_all(http: httpx.Client, route: str, bodies: list[bytes]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(
            lambda body: http.post(route, content=body, headers={"content-type": "application/json"}), bodies
        ))


def check_openai(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(body["data"])))
        assert all(isinstance(d["embedding"], (list, str)) for d in body["data"])
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body


def check_tei(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:  # /embed and /: vectors; /tokenize: tokens; one list per input
        assert isinstance(body, list) and body and all(isinstance(row, list) for row in body)
    else:
        assert set(body) == {"error", "error_type"}, body


def test_the_openapi_document_describes_every_request_body(concurrent_http):
    document = concurrent_http.get("/openapi.json").json()
    for route in ("/v1/embeddings", "/embed", "/", "/tokenize"):
        schema = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["properties"] and schema.get("required")
    embeddings = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(embeddings["required"]) == {"model", "input"} and embeddings["additionalProperties"] is False
    assert len(embeddings["properties"]["input"]["anyOf"]) == 4  # text, texts, ids, lists of ids


@settings(FUZZ, max_examples=OPENAI_CASES)
@given(data=st.data())
def test_generated_openai_requests(concurrent_http, operations, data):
    case = data.draw(operations["/v1/embeddings"])
    for response in send_all(concurrent_http, "/v1/embeddings", variants(data, case.body)):
        check_openai(response)


@settings(FUZZ, max_examples=TEI_CASES)
@given(data=st.data(), route=st.sampled_from(["/embed", "/", "/tokenize"]))
def test_generated_tei_requests(concurrent_http, operations, data, route):
    case = data.draw(operations[route])
    for response in send_all(concurrent_http, route, variants(data, case.body)):
        check_tei(response)


def test_still_correct_after_fuzzing(concurrent_http, base_reference):
    response = concurrent_http.post("/v1/embeddings", json={"model": "tiny-sfr", "input": ["after the storm"]})
    assert response.status_code == 200
    got = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(got, base_reference.embed(["after the storm"])[0], atol=1e-5)
    assert concurrent_http.get("/health").status_code == 200
