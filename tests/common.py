"""Helpers that several test modules share (test modules never import one another)."""

import json

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from serve_app.engine.spec import ModelSpec
from testkit.app import TINY_MAX_TOKENS

TEXTS = [
    "how do cats sleep",
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun",
    "x",
    "embeddings turn text into vectors",
    "Ray Serve batches requests on the GPU and autoscales replicas across a cluster; " * 2,
    "ünïcödé and emoji 🙂 fall back to <unk>",
]


def spec_for(path, **overrides) -> ModelSpec:
    fields = {"name": "tiny", "source": str(path), "max_input_tokens": TINY_MAX_TOKENS, "max_batch_tokens": 256}
    return ModelSpec(**(fields | overrides))


DOCS = [
    "Volcanoes erupt when magma rises through cracks in the crust.",
    "Bread rises because yeast releases carbon dioxide.",
    "The Moon's gravity drives the ocean tides.",
]
QUERY = "why do volcanoes erupt"
LONG = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 12


def left_truncated_reference(reference, text: str, max_tokens: int) -> list[int]:
    """The model card's rule with the tokenizer's own truncation from the left: the text's end."""
    hf = reference.tokenizer
    hf.truncation_side = "left"
    try:
        return hf(text, truncation=True, max_length=max_tokens - 1)["input_ids"] + [hf.eos_token_id]
    finally:
        hf.truncation_side = "right"


def post_body(http, route: str, body) -> httpx.Response:
    """POST `body` to `route`: bytes as they are, anything else as JSON."""
    content = body if isinstance(body, bytes) else None
    return http.post(route, content=content, json=None if content else body, headers={"content-type": "application/json"})


# Generated JSON for the fuzz tests (tests/e2e/test_fuzz.py, tests/e2e/test_tei.py).
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
token_ids = st.lists(st.integers(min_value=-5, max_value=40_000), min_size=0, max_size=80)
inputs = st.one_of(
    st.text(max_size=300),
    st.lists(st.text(max_size=120), max_size=12),
    token_ids,
    st.lists(token_ids, max_size=6),
    json_value,
)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_value.map(lambda value: json.dumps(value).encode()),
)

FUZZ = settings(
    max_examples=800,  # each test sets its own
    deadline=None,
    derandomize=True,  # the same cases on every run, so CI is reproducible
    suppress_health_check=list(HealthCheck),
    database=None,
)
