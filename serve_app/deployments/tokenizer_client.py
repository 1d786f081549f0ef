"""The Ingress's side of tokenizing, with the model's own tokenizer files: small requests on the
Ingress's event loop, bulk ones on a thread of the Ingress, the largest in slices at the
Tokenizer deployment."""

from __future__ import annotations

import asyncio
import enum
import os
from concurrent.futures import ThreadPoolExecutor

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.api.errors import invalid, overloaded
from serve_app.api.limits import RequestLimits, check_tokens
from serve_app.api.schemas import Inputs
from serve_app.engine.errors import InputError
from serve_app.engine.spec import ModelSpec
from serve_app.engine.tokenization import InputTokenizer, load_input_tokenizer

TOKENIZE_SLICE = 256  # inputs per Tokenizer call (a slice): large requests spread over replicas
# Tokenizer calls one request has at a time: they still spread over replicas, and a request
# over the token limit is refused before most of its slices are tokenized.
TOKENIZE_SLICES_IN_FLIGHT = 4
# Requests up to this size are tokenized in the ingress itself: for short queries the
# round trip to the Tokenizer deployment costs far more CPU than the tokenization.
LOCAL_TOKENIZE_MAX_CHARS = 8192
LOCAL_CHECK_MAX_IDS = 16384
# Interactive requests (a few inputs, e.g. one 4096-token document) are tokenized here up to
# this many times those sizes: a few milliseconds, against a queue behind batch requests.
INTERACTIVE_TOKENIZE_FACTOR = 8
# Text requests up to this size (a 64-document bulk request of 512-token documents is ~150k)
# are tokenized on a thread of the Ingress, which the Rust tokenizer runs without the GIL, so the
# event loop goes on: a call to the Tokenizer deployment costs about half as much CPU again as
# the tokenizing itself (docs/decisions.md#bulk-tokenizing). Larger ones spread over the
# Tokenizer replicas in slices, and are refused as soon as their count passes the limit.
# EMBEDDINGS_THREAD_TOKENIZE_MAX_CHARS=0 in the application's env_vars sends every text request
# over LOCAL_TOKENIZE_MAX_CHARS to the Tokenizer deployment, as before (bench.capacity compares).
THREAD_TOKENIZE_MAX_CHARS = int(os.environ.get("EMBEDDINGS_THREAD_TOKENIZE_MAX_CHARS", "262144"))
# Per Ingress replica, as its one CPU: more bulk traffic than it keeps up with waits here, which
# counts as the Ingress's ongoing requests and scales it out.
TOKENIZE_THREADS = 1


class TokenizeAt(enum.Enum):
    EVENT_LOOP = "event loop"
    INGRESS_THREAD = "Ingress thread"
    TOKENIZER = "Tokenizer deployment"


def where_to_tokenize(inputs: Inputs, asks_interactive: bool) -> TokenizeAt:
    """Small requests, and interactive ones of a few long inputs, on the Ingress's event loop
    (rather than queue behind large batch requests); bulk text requests on its threads; the
    largest at the Tokenizer deployment."""
    factor = INTERACTIVE_TOKENIZE_FACTOR if asks_interactive else 1
    if inputs.texts is not None:
        chars = sum(len(text) for text in inputs.texts)
        if chars <= LOCAL_TOKENIZE_MAX_CHARS * factor:
            return TokenizeAt.EVENT_LOOP
        return TokenizeAt.INGRESS_THREAD if chars <= THREAD_TOKENIZE_MAX_CHARS else TokenizeAt.TOKENIZER
    ids = sum(len(ids) for ids in inputs.token_ids)
    return TokenizeAt.EVENT_LOOP if ids <= LOCAL_CHECK_MAX_IDS * factor else TokenizeAt.TOKENIZER


async def _numbered(k: int, response: DeploymentResponse) -> tuple[int, object]:
    return k, await response


class TokenizerClient:
    def __init__(self, specs: dict[str, ModelSpec], tokenizers: dict[str, DeploymentHandle], limits: RequestLimits):
        self.remote = {name: h.options(_by_reference=True) for name, h in tokenizers.items()}
        # Tokenizer files only (no weights).
        self.local: dict[str, InputTokenizer] = {name: load_input_tokenizer(spec) for name, spec in specs.items()}
        self.limits = limits
        self.threads = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")

    async def tokenize(self, name: str, inputs: Inputs, task: str | None, truncate: bool, direction: str,
                       where: TokenizeAt) -> list[list[int]]:
        """Token ids of texts (instruction, special tokens, truncation) or checked token-id
        inputs, in input order; a client's bad input is a 400."""
        handle = self.remote[name]
        if inputs.texts is not None:
            items, call, extra = inputs.texts, handle.tokenize, (task, truncate)
        else:
            items, call, extra = inputs.token_ids, handle.check_token_ids, (truncate,)
        if where is not TokenizeAt.TOKENIZER:
            local = self.local[name]
            run = local.tokenize_texts if inputs.texts is not None else local.check_token_ids
            try:
                if where is TokenizeAt.EVENT_LOOP:
                    return run(items, *extra, 0, direction)
                return await asyncio.get_running_loop().run_in_executor(self.threads, run, items, *extra, 0, direction)
            except InputError as exc:
                raise invalid(exc.message, exc.param, exc.code) from None
        # A few slices at a time, counting as they come back: a request over the token limit is
        # refused as soon as its count passes it, and its slices not yet tokenized are dropped.
        slices = [items[i : i + TOKENIZE_SLICE] for i in range(0, len(items), TOKENIZE_SLICE)]
        results: list[list[list[int]] | None] = [None] * len(slices)
        pending: dict[asyncio.Future, DeploymentResponse] = {}
        counted, sent = 0, 0
        try:
            while sent < len(slices) or pending:
                while sent < len(slices) and len(pending) < TOKENIZE_SLICES_IN_FLIGHT:
                    response = call.remote(slices[sent], *extra, sent * TOKENIZE_SLICE, direction)
                    pending[asyncio.ensure_future(_numbered(sent, response))] = response
                    sent += 1
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    del pending[future]
                    k, tokenized = _result_or_503(future)
                    if isinstance(tokenized, InputError):
                        raise invalid(tokenized.message, tokenized.param, tokenized.code)
                    results[k] = tokenized
                    counted += sum(map(len, tokenized))
                    check_tokens(counted, self.limits, counted_all=False)
        finally:  # refused, or the client went away: the Tokenizers drop what is still queued
            for future, response in pending.items():
                response.cancel()
                future.cancel()
        return [ids for tokenized in results for ids in tokenized]


def _result_or_503(future: asyncio.Future):
    try:
        return future.result()
    except BackPressureError:
        raise overloaded() from None
