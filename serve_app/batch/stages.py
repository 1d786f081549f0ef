"""The job's two compute stages, as Ray Data callable classes (one instance per actor).

Tokenize (CPU actors): the service's tokenization rules, row by row. Embed (engine actors,
one per GPU): the service's batching, the service's engine. Rows that already carry an error
pass through both untouched, so that the sink can write them to the errors file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serve_app.engine.errors import InputError
from serve_app.engine.long_inputs import combine_windows
from serve_app.engine.parts import cut_to_budget
from serve_app.engine.spec import ModelSpec
from serve_app.engine.tokenization import InputTokenizer, load_input_tokenizer

TOO_LONG = "context_length_exceeded"


def tokenize_rows(tokenizer: InputTokenizer, texts: list[str], task: str | None) -> list[list[int] | InputError]:
    """Token ids for each text, or the InputError that text gets: one bad text fails only itself.

    The one place that decides what a text becomes before the engine sees it (instruction, EOS,
    length policy). An over-long input is an error row here (the service's 400 without
    `truncate`), unless the model embeds long inputs in windows (`long_input: chunk`).
    """
    try:
        return tokenizer.tokenize_texts(texts, task, truncate=False)
    except InputError:  # at least one text failed: find out which, one at a time
        results: list[list[int] | InputError] = []
        for text in texts:
            try:
                results.append(tokenizer.tokenize_texts([text], task, truncate=False)[0])
            except InputError as exc:
                results.append(exc)
        return results


def _error_message(exc: InputError, max_tokens: int) -> str:
    if exc.code == TOO_LONG:  # the engine's message numbers inputs of a request and suggests `truncate`
        return f"the input is longer than the model's limit of {max_tokens} tokens"
    return exc.message


class Tokenize:
    def __init__(self, spec: dict, input_type: str):
        self.spec = ModelSpec.model_validate(spec)
        self.tokenizer = load_input_tokenizer(self.spec)
        self.task = self.spec.query_instruction if input_type == "query" else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch["error"].to_pylist()
        messages = batch["message"].to_pylist()
        valid = [i for i, error in enumerate(errors) if error is None]
        # Each row's windows: one, unless the model embeds an over-long input in several.
        windows: list[list[list[int]]] = [[] for _ in errors]
        texts = batch["text"].take(valid).to_pylist()
        for i, result in zip(valid, tokenize_rows(self.tokenizer, texts, self.task), strict=True):
            if isinstance(result, InputError):
                errors[i], messages[i] = result.code, _error_message(result, self.tokenizer.max_tokens)
            else:
                windows[i] = self.tokenizer.windows(result)
        return (
            batch.drop_columns(["text", "error", "message"])
            .append_column("error", pa.array(errors, pa.string()))
            .append_column("message", pa.array(messages, pa.string()))
            .append_column("token_ids", pa.array(windows, pa.list_(pa.list_(pa.int32()))))
        )


class Embed:
    """One engine per actor, threads sized as the service's Embedder replica sizes them."""

    def __init__(self, spec: dict):
        from serve_app.engine.embedder import EmbeddingEngine

        self.spec = ModelSpec.model_validate(spec)
        self.engine = EmbeddingEngine.load_in_worker([self.spec])
        self.engine.warm_up()

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        windows_per_row = batch["token_ids"].filter(pa.array(valid)).to_pylist()
        windows = [window for row in windows_per_row for window in row]
        vectors = np.zeros((batch.num_rows, self.engine.dimensions), dtype=np.float32)
        # As the service does: the windows are embedded as inputs, then combined per row.
        vectors[valid] = combine_windows(
            self._embed(windows), windows, [len(row) for row in windows_per_row], self.spec.normalize
        )
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.ravel()), self.engine.dimensions, mask=pa.array(~valid)
        )
        # Every token fed to the model, as the service's usage counts them.
        tokens = np.zeros(batch.num_rows, np.int32)
        tokens[valid] = [sum(map(len, row)) for row in windows_per_row]
        return batch.drop_columns(["token_ids"]).append_column("embedding", embedding).append_column("tokens", pa.array(tokens))

    def _embed(self, sequences: list[list[int]]) -> np.ndarray:
        """The service's batching: batches of at most max_batch_tokens, each run by the engine as
        length-sorted forward passes. Sorting the whole Ray Data batch first gives every budget
        inputs of similar length, so passes carry little padding."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = np.empty((len(sequences), self.engine.dimensions), dtype=np.float32)
        start = 0
        for part in cut_to_budget([sequences[i] for i in order], self.spec.max_batch_tokens):
            out[order[start : start + len(part)]] = self.engine.embed(part)  # raises on rows out of memory
            start += len(part)
        return out
