"""End to end: the EOS rules over SFR's real vocabulary (Mistral-7B-v0.1's BPE, SFR-shaped tokenizer
files: testkit/sfr_tokenizer.py), served as `tiny-sfr-vocab`, against the independent reference."""

import numpy as np

from testkit.app import SFR_TASK, TINY_MAX_TOKENS
from testkit.sfr_tokenizer import EOS_ID

MODEL = "tiny-sfr-vocab"
TEXTS = [
    "how do cats sleep?",
    "Ünïcödé, emoji 🙂 and CJK 漢字 go through byte fallback",
    "x",
    "  leading spaces, tabs\tand\nline breaks",
]


def embed(http, **body) -> dict:
    response = http.post("/v1/embeddings", json={"model": MODEL, "encoding_format": "float"} | body)
    assert response.status_code == 200, response.text
    return response.json()


def rows(response: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in response["data"]], dtype=np.float32)


def test_documents_and_queries_pool_on_the_appended_eos(http, sfr_vocab_reference):
    assert sfr_vocab_reference.tokenizer("how do cats sleep?")["input_ids"][-1] != EOS_ID  # SFR's trap
    documents = embed(http, input=TEXTS, input_type="document")
    np.testing.assert_allclose(rows(documents), sfr_vocab_reference.embed(TEXTS), atol=1e-5)
    assert documents["usage"]["prompt_tokens"] == sum(len(sfr_vocab_reference.token_ids(t)) for t in TEXTS)
    queries = embed(http, input=TEXTS, input_type="query")
    np.testing.assert_allclose(rows(queries), sfr_vocab_reference.embed(TEXTS, SFR_TASK), atol=1e-5)


def test_token_ids_without_eos_get_one_and_with_eos_keep_one(http, sfr_vocab_reference):
    ids = sfr_vocab_reference.tokenizer(TEXTS[0])["input_ids"]  # what a user's tokenizer gives: no EOS
    got = rows(embed(http, input=[ids, ids + [EOS_ID]]))
    want = sfr_vocab_reference.embed_ids(ids + [EOS_ID])
    np.testing.assert_allclose(got, np.stack([want, want]), atol=1e-5)


def test_truncation_keeps_the_eos(http, sfr_vocab_reference):
    long_text = "the quick brown fox jumps over the lazy dog " * 20
    cut = embed(http, input=long_text, truncate=True)
    assert cut["usage"]["prompt_tokens"] == TINY_MAX_TOKENS
    np.testing.assert_allclose(rows(cut)[0], sfr_vocab_reference.embed([long_text])[0], atol=1e-5)
