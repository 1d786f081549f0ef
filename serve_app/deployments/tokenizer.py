"""CPU deployment: text → token ids, with the model's instruction and EOS rules."""

from __future__ import annotations

from ray import serve

from serve_app.engine.errors import InputError
from serve_app.engine.spec import ModelSpec
from serve_app.engine.tokenization import load_input_tokenizer


@serve.deployment(name="Tokenizer", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Tokenizer:
    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        self.tokenizer = load_input_tokenizer(self.spec)

    # A client's bad input comes back as a value, not raised: Serve logs every exception raised
    # in a replica at ERROR with a traceback, which is noise for what is the client's 400.
    def tokenize(
        self, texts: list[str], task: str | None, truncate: bool, offset: int, direction: str = "right"
    ) -> list[list[int]] | InputError:
        try:
            return self.tokenizer.tokenize_texts(texts, task, truncate, offset, direction)
        except InputError as exc:
            return exc

    def check_token_ids(
        self, sequences: list[list[int]], truncate: bool, offset: int, direction: str = "right"
    ) -> list[list[int]] | InputError:
        try:
            return self.tokenizer.check_token_ids(sequences, truncate, offset, direction)
        except InputError as exc:
            return exc

    def ready(self) -> bool:
        return True
