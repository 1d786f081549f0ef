"""The clients people use, unchanged, against the served test app: the official `openai` client
(sync and async), LangChain's `OpenAIEmbeddings` and LlamaIndex's `OpenAILikeEmbedding`.

Every vector is checked against the independent references in testkit/reference.py. Neither
LangChain nor LlamaIndex sends `input_type`, so their queries are embedded as documents unless
the request is told otherwise; the tests pin that down, since docs/clients.md tells users so.
Nothing here may reach past loopback: tiktoken would download its BPE file, LlamaIndex its NLTK
data; the `loopback_only` guard makes any such attempt fail the test.
"""

import asyncio
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from testkit.app import SFR_TASK, TINY_MAX_TOKENS
from testkit.reference import minilm_reference
from tests.common import DOCS, QUERY

pytestmark = pytest.mark.usefixtures("loopback_only")  # tests stay offline

STRICT_PREFIX = "/strict"  # a second app whose model refuses token-id inputs
STRICT_MODEL = "tiny-sfr-strict"


@pytest.fixture(scope="module")
def v1(base_url):
    return f"{base_url}/v1"


@pytest.fixture(scope="module")
def reference(base_reference):
    """model name → f(texts, task=None) → reference vectors."""

    def minilm(texts, task=None):
        assert task is None  # all-MiniLM-L6-v2 has no query instruction
        return minilm_reference(texts)

    return {"tiny-sfr": base_reference.embed, "all-MiniLM-L6-v2": minilm}


def as_array(vectors) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float32)


# --- the official openai client ----------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-sfr", "all-MiniLM-L6-v2"])
def test_openai_sync(v1, api_keys, reference, model):
    client = openai.OpenAI(base_url=v1, api_key=api_keys.tester, max_retries=0)
    response = client.embeddings.create(model=model, input=DOCS)
    np.testing.assert_allclose(as_array([d.embedding for d in response.data]), reference[model](DOCS), atol=1e-5)


def test_openai_sync_query_instruction(v1, api_keys, base_reference):
    client = openai.OpenAI(base_url=v1, api_key=api_keys.tester, max_retries=0)
    response = client.embeddings.create(model="tiny-sfr", input=QUERY, extra_body={"input_type": "query"})
    np.testing.assert_allclose(as_array(response.data[0].embedding), base_reference.embed([QUERY], SFR_TASK)[0], atol=1e-5)


def test_openai_async(v1, api_keys, reference):
    async def run():
        async with openai.AsyncOpenAI(base_url=v1, api_key=api_keys.tester, max_retries=0) as client:
            return await asyncio.gather(
                client.embeddings.create(model="all-MiniLM-L6-v2", input=DOCS),
                client.embeddings.create(model="tiny-sfr", input=DOCS, encoding_format="float"),
                client.embeddings.create(model="tiny-sfr", input=[QUERY], extra_body={"input_type": "query"}),
            )

    minilm, tiny, query = asyncio.run(run())
    np.testing.assert_allclose(as_array([d.embedding for d in minilm.data]), reference["all-MiniLM-L6-v2"](DOCS), atol=1e-5)
    np.testing.assert_allclose(as_array([d.embedding for d in tiny.data]), reference["tiny-sfr"](DOCS), atol=1e-5)
    np.testing.assert_allclose(as_array(query.data[0].embedding), reference["tiny-sfr"]([QUERY], SFR_TASK)[0], atol=1e-5)


# --- LangChain ----------------------------------------------------------------------------


def langchain_embeddings(v1, api_keys, model, **settings):
    from langchain_openai import OpenAIEmbeddings

    return OpenAIEmbeddings(model=model, base_url=v1, api_key=api_keys.tester, max_retries=0, **settings)


@pytest.mark.parametrize("model", ["tiny-sfr", "all-MiniLM-L6-v2"])
def test_langchain_documents_and_query(v1, api_keys, reference, model):
    embeddings = langchain_embeddings(v1, api_keys, model, check_embedding_ctx_length=False)
    np.testing.assert_allclose(as_array(embeddings.embed_documents(DOCS)), reference[model](DOCS), atol=1e-5)
    # embed_query sends the query like a document: no input_type, so no instruction.
    np.testing.assert_allclose(as_array(embeddings.embed_query(QUERY)), reference[model]([QUERY])[0], atol=1e-5)


def test_langchain_query_instruction_and_async(v1, api_keys, base_reference):
    from langchain_openai import OpenAIEmbeddings

    # docs/clients.md's subclass: queries get the model's instruction wherever LangChain embeds them.
    class QueryInstructionEmbeddings(OpenAIEmbeddings):
        def embed_query(self, text, **kwargs):
            return super().embed_query(text, extra_body={"input_type": "query"}, **kwargs)

        async def aembed_query(self, text, **kwargs):
            return await super().aembed_query(text, extra_body={"input_type": "query"}, **kwargs)

    embeddings = QueryInstructionEmbeddings(model="tiny-sfr", base_url=v1, api_key=api_keys.tester,
                                            max_retries=0, check_embedding_ctx_length=False)
    expected_query = base_reference.embed([QUERY], SFR_TASK)[0]
    np.testing.assert_allclose(as_array(embeddings.embed_query(QUERY)), expected_query, atol=1e-5)

    async def run():  # one event loop: the async client stays bound to the loop it first ran on
        return await asyncio.gather(embeddings.aembed_query(QUERY), embeddings.aembed_documents(DOCS))

    query, docs = asyncio.run(run())
    np.testing.assert_allclose(as_array(query), expected_query, atol=1e-5)
    np.testing.assert_allclose(as_array(docs), base_reference.embed(DOCS), atol=1e-5)  # no instruction


# --- LlamaIndex ---------------------------------------------------------------------------


def llamaindex_embedding(v1, api_keys, model):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    return OpenAILikeEmbedding(model_name=model, api_base=v1, api_key=api_keys.tester, max_retries=0)


@pytest.mark.parametrize("model", ["tiny-sfr", "all-MiniLM-L6-v2"])
def test_llamaindex_text_and_query(v1, api_keys, reference, model):
    embedding = llamaindex_embedding(v1, api_keys, model)
    np.testing.assert_allclose(as_array(embedding.get_text_embedding_batch(DOCS)), reference[model](DOCS), atol=1e-5)
    np.testing.assert_allclose(as_array(embedding.get_text_embedding(DOCS[0])), reference[model](DOCS[:1])[0], atol=1e-5)
    # get_query_embedding sends no input_type either: the query is embedded as a document.
    np.testing.assert_allclose(as_array(embedding.get_query_embedding(QUERY)), reference[model]([QUERY])[0], atol=1e-5)
    # LlamaIndex replaces newlines with spaces before sending.
    two_lines = "first line\nsecond line"
    expected = reference[model]([two_lines.replace("\n", " ")])[0]
    np.testing.assert_allclose(as_array(embedding.get_text_embedding(two_lines)), expected, atol=1e-5)


def test_llamaindex_async_and_query_instruction(v1, api_keys, base_reference):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    embedding = llamaindex_embedding(v1, api_keys, "tiny-sfr")
    query = asyncio.run(embedding.aget_query_embedding(QUERY))
    np.testing.assert_allclose(as_array(query), base_reference.embed([QUERY])[0], atol=1e-5)
    # additional_kwargs go with every request: an instance for queries only.
    for_queries = OpenAILikeEmbedding(model_name="tiny-sfr", api_base=v1, api_key=api_keys.tester, max_retries=0,
                                      additional_kwargs={"extra_body": {"input_type": "query"}})
    expected = base_reference.embed([QUERY], SFR_TASK)[0]
    np.testing.assert_allclose(as_array(for_queries.get_query_embedding(QUERY)), expected, atol=1e-5)
    np.testing.assert_allclose(as_array(asyncio.run(for_queries.aget_query_embedding(QUERY))), expected, atol=1e-5)


def test_llamaindex_openai_embedding_refuses_our_model_names(v1):
    """Why docs/clients.md points LlamaIndex users at OpenAILikeEmbedding."""
    from llama_index.embeddings.openai import OpenAIEmbedding

    with pytest.raises(ValueError):
        OpenAIEmbedding(model="tiny-sfr", api_base=v1, api_key="unused")


# --- the LangChain trap: token ids of another vocabulary ----------------------------------


@pytest.fixture(scope="module")
def strict_url(ray_session, tiny_family, api_keys):
    """A second app whose only model has `token_id_inputs: reject`."""
    from ray import serve

    from serve_app.deployments.app import build_app

    args = {
        "models": [{
            "name": STRICT_MODEL, "source": str(tiny_family["base"]),
            "max_input_tokens": TINY_MAX_TOKENS, "token_id_inputs": "reject",
        }],
        "auth": {"keys_file": str(api_keys.file)},
    }
    serve.run(build_app(args), name="strict-token-ids", route_prefix=STRICT_PREFIX)
    yield ray_session.url + STRICT_PREFIX
    serve.delete("strict-token-ids")


@pytest.fixture
def tiktoken_offline(monkeypatch):
    """LangChain's default tokenizes with tiktoken's cl100k_base, whose BPE file tiktoken
    downloads; llama-index-core (a test dependency) ships that file in tiktoken's cache layout."""
    import llama_index.core

    cache = Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache"
    if not (cache / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4").exists():  # sha1 of cl100k_base's URL
        pytest.skip("no offline copy of tiktoken's cl100k_base; the direct token-id tests cover the server")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))


def test_langchain_default_settings_get_a_clear_error_on_out_of_vocabulary_ids(v1, api_keys, tiktoken_offline):
    embeddings = langchain_embeddings(v1, api_keys, "tiny-sfr")  # check_embedding_ctx_length=True
    with pytest.raises(openai.BadRequestError) as err:
        embeddings.embed_documents(DOCS)
    assert err.value.code == "invalid_token_id"
    assert "check_embedding_ctx_length=False" in err.value.message and "LangChain" in err.value.message


def test_langchain_default_settings_against_a_model_that_rejects_token_ids(strict_url, api_keys, tiktoken_offline):
    embeddings = langchain_embeddings(f"{strict_url}/v1", api_keys, STRICT_MODEL)
    with pytest.raises(openai.BadRequestError) as err:
        embeddings.embed_query(QUERY)
    assert err.value.code == "token_ids_not_accepted"
    assert "token_id_inputs: reject" in err.value.message
    assert "check_embedding_ctx_length=False" in err.value.message


def test_rejecting_model_refuses_token_ids_and_serves_text(strict_url, api_keys, base_reference):
    headers = {"Authorization": f"Bearer {api_keys.tester}"}
    with httpx.Client(base_url=strict_url, headers=headers, timeout=60) as http:
        # What LangChain's default sends: lists of token ids (here, in-vocabulary ones).
        for ids in ([[5, 6, 7]], [5, 6, 7], base_reference.token_ids(QUERY)):
            response = http.post("/v1/embeddings", json={"model": STRICT_MODEL, "input": ids})
            assert response.status_code == 400
            error = response.json()["error"]
            assert (error["code"], error["param"], error["type"]) == ("token_ids_not_accepted", "input", "invalid_request_error")
            assert STRICT_MODEL in error["message"] and "send text" in error["message"]
        # Text is served as usual.
        response = http.post("/v1/embeddings", json={"model": STRICT_MODEL, "input": DOCS, "encoding_format": "float"})
        assert response.status_code == 200
        vectors = as_array([d["embedding"] for d in response.json()["data"]])
    np.testing.assert_allclose(vectors, base_reference.embed(DOCS), atol=1e-5)
    # With check_embedding_ctx_length=False, LangChain works against it.
    embeddings = langchain_embeddings(f"{strict_url}/v1", api_keys, STRICT_MODEL, check_embedding_ctx_length=False)
    np.testing.assert_allclose(as_array(embeddings.embed_documents(DOCS)), base_reference.embed(DOCS), atol=1e-5)


def test_out_of_vocabulary_error_names_the_likely_cause(base_url, api_keys):
    headers = {"Authorization": f"Bearer {api_keys.tester}"}
    response = httpx.post(f"{base_url}/v1/embeddings", headers=headers, timeout=60,
                          json={"model": "tiny-sfr", "input": [[1, 2], [3, 100256]]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_token_id"
    assert "100256 in input 1" in error["message"]
    assert "another tokenizer" in error["message"] and "check_embedding_ctx_length=False" in error["message"]
