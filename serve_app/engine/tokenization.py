"""Text and token-id inputs → the exact token ids the model sees.

The rules that are easy to get wrong live here: the query instruction format, appending the
EOS token that SFR/e5-mistral pool on (transformers 5 ignores `add_eos_token`, so the
tokenizer alone yields none), and truncating *before* that EOS so it is never cut off.
"""

from __future__ import annotations

from .errors import InputError
from .loading import ResolvedSpec, load_tokenizer, resolve_spec
from .spec import ModelSpec, format_query


# Token ids are read in the served model's own vocabulary. The usual way to get that wrong is
# a client that tokenized with another one: LangChain's OpenAIEmbeddings does by default.
OTHER_VOCABULARY_HINT = (
    "Token ids are read in this model's own vocabulary; ids from another tokenizer name other "
    "tokens. LangChain's OpenAIEmbeddings sends tiktoken cl100k_base ids by default: create it "
    "with check_embedding_ctx_length=False so that it sends the text."
)


def token_ids_rejected(model: str) -> InputError:
    """The 400 for a model configured with `token_id_inputs: reject`."""
    return InputError(
        f"The model '{model}' does not accept token-id inputs (token_id_inputs: reject); send "
        f"text instead. {OTHER_VOCABULARY_HINT}",
        code="token_ids_not_accepted",
    )


class InputTokenizer:
    def __init__(self, tokenizer, resolved: ResolvedSpec):
        self.tokenizer = tokenizer
        self.max_tokens = resolved.max_input_tokens
        self.eos_id = tokenizer.eos_token_id if resolved.append_eos else None
        self.vocab_size = len(tokenizer)
        # Lengths are enforced here; keep transformers from warning about long inputs.
        tokenizer.model_max_length = 1 << 30

    def tokenize_texts(
        self, texts: list[str], task: str | None = None, truncate: bool = False, offset: int = 0
    ) -> list[list[int]]:
        """Token ids for each text; `task` applies the query instruction; `offset` numbers errors."""
        if task is not None:
            texts = [format_query(task, text) for text in texts]
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        result = []
        for i, (text, ids) in enumerate(zip(texts, encoded)):
            ids = self._with_eos(ids)
            if len(ids) > self.max_tokens:
                if not truncate:
                    raise self._too_long(offset + i, len(ids))
                ids = self._truncated_text(text)
            result.append(ids)
        return result

    def check_token_ids(
        self, sequences: list[list[int]], truncate: bool = False, offset: int = 0
    ) -> list[list[int]]:
        """Validate client-supplied ids and apply the same EOS/length rules as for text."""
        result = []
        for i, ids in enumerate(sequences):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InputError(
                    f"Invalid token id {bad} in input {offset + i}: ids must be in "
                    f"[0, {self.vocab_size}) for this model. {OTHER_VOCABULARY_HINT}",
                    code="invalid_token_id",
                )
            ids = self._with_eos(list(ids))
            if len(ids) > self.max_tokens:
                if not truncate:
                    raise self._too_long(offset + i, len(ids))
                ids = ids[: self.max_tokens - 1] + [ids[-1]] if self.eos_id is not None else ids[: self.max_tokens]
            result.append(ids)
        return result

    def _with_eos(self, ids: list[int]) -> list[int]:
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        return ids

    def _truncated_text(self, text: str) -> list[int]:
        # Leave room for the EOS so truncation never removes the token we pool on.
        room = self.max_tokens - (1 if self.eos_id is not None else 0)
        ids = self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=room)["input_ids"]
        return self._with_eos(ids)

    def _too_long(self, index: int, length: int) -> InputError:
        return InputError(
            f"Input {index} is {length} tokens long, but this model's maximum input length is "
            f"{self.max_tokens} tokens. Shorten the input, or send \"truncate\": true to cut it "
            "to the limit.",
            code="context_length_exceeded",
        )


def load_input_tokenizer(spec: ModelSpec) -> InputTokenizer:
    """The tokenizer files only, no weights: what the Ingress and Tokenizer need."""
    tokenizer = load_tokenizer(spec)
    return InputTokenizer(tokenizer, resolve_spec(spec, tokenizer))
