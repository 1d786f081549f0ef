"""CPU deployment: text → token ids, with the model's instruction and EOS rules."""

from __future__ import annotations

from ray import serve

from serve_app.engine.embedder import load_input_tokenizer
from serve_app.engine.spec import ModelSpec


@serve.deployment(name="Tokenizer", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Tokenizer:
    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        self.tokenizer = load_input_tokenizer(self.spec)

    def tokenize(self, texts: list[str], task: str | None, truncate: bool, offset: int) -> list[list[int]]:
        return self.tokenizer.tokenize_texts(texts, task, truncate, offset)

    def check_token_ids(self, sequences: list[list[int]], truncate: bool, offset: int) -> list[list[int]]:
        return self.tokenizer.check_token_ids(sequences, truncate, offset)

    def ready(self) -> bool:
        return True
