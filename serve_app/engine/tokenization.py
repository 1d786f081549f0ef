"""Text and token-id inputs → the exact token ids the model sees.

The rules that are easy to get wrong live here: the query instruction format, appending the
EOS token that SFR/e5-mistral pool on (transformers 5 ignores `add_eos_token`, so the
tokenizer alone yields none), truncating *between* the special tokens so that EOS is never cut
off, and, for models that chunk long inputs, the windows an over-long input is embedded in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from .errors import InputError
from .loading import ResolvedSpec, load_tokenizer, resolve_spec
from .spec import ModelSpec, format_query

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


Direction = Literal["right", "left"]


class InputTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, resolved: ResolvedSpec):
        self.tokenizer = tokenizer
        self.max_tokens = resolved.max_input_tokens
        self.eos_id = tokenizer.eos_token_id if resolved.append_eos else None
        self.vocab_size = len(tokenizer)
        self.long_input = resolved.spec.long_input
        # What a lone input gets around its text (SFR: <s> ... </s>; BERT: [CLS] ... [SEP]):
        # truncation keeps them, and every window of a chunked input gets them again.
        self.prefix, self.suffix = _special_tokens_around_text(tokenizer, self.eos_id)
        if self.max_tokens <= len(self.prefix) + len(self.suffix):
            raise ValueError(
                f"model {resolved.spec.name!r}: max_input_tokens ({self.max_tokens}) leaves no room "
                f"for text beside the special tokens {self.prefix + self.suffix}"
            )
        # Lengths are enforced here; keep transformers from warning about long inputs.
        tokenizer.model_max_length = 1 << 30
        self.encode = batch_encoder(tokenizer)

    def tokenize_texts(
        self, texts: list[str], task: str | None = None, truncate: bool = False, offset: int = 0,
        direction: Direction = "right",
    ) -> list[list[int]]:
        """Token ids for each text; `task` applies the query instruction; `offset` numbers errors.

        Over the length limit: cut (`truncate`, from the `direction` side), else kept whole for
        `windows` if the model chunks long inputs (not instructed queries), else an error.
        """
        if task is not None:
            texts = [format_query(task, text) for text in texts]
        encoded = self.encode(texts)
        return [
            self._fit(with_eos(ids, self.eos_id), truncate, direction, offset + i, instructed=task is not None)
            for i, ids in enumerate(encoded)
        ]

    def check_token_ids(
        self, sequences: list[list[int]], truncate: bool = False, offset: int = 0, direction: Direction = "right"
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
            result.append(self._fit(with_eos(list(ids), self.eos_id), truncate, direction, offset + i, instructed=False))
        return result

    def truncated(self, ids: list[int], direction: Direction = "right") -> list[int]:
        """`ids` cut to the limit on one side of the text; the special tokens around it stay
        (the EOS the model pools on above all). What the tokenizer's own truncation gives."""
        prefix, body, suffix = self._split(ids)
        room = self.max_tokens - len(prefix) - len(suffix)
        return prefix + (body[:room] if direction == "right" else body[len(body) - room :]) + suffix

    def windows(self, ids: list[int]) -> list[list[int]]:
        """The consecutive windows an over-long input is embedded in (`long_input: chunk`), each
        within the limit and with the special tokens the input has around its text, as a lone
        input would; `[ids]` for an input that fits."""
        if len(ids) <= self.max_tokens:
            return [ids]
        prefix, body, suffix = self._split(ids)
        room = self.max_tokens - len(prefix) - len(suffix)
        return [prefix + body[start : start + room] + suffix for start in range(0, len(body), room)]

    def describe_tokens(
        self, texts: list[str], task: str | None = None, add_special_tokens: bool = True
    ) -> list[list[dict[str, Any]]]:
        """Each text's tokens as the model sees them (the EOS appended where it pools on one, no
        length rule applied): id, text, whether special, and the UTF-8 byte span in the text
        (with `task`, in the instruction-formatted text); special tokens have no span."""
        if task is not None:
            texts = [format_query(task, text) for text in texts]
        encoded = self.tokenizer(
            texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_special_tokens_mask=True
        )
        described = []
        for text, ids, spans, special in zip(
            texts, encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"], strict=True
        ):
            data = text.encode("utf-8")
            byte_at = [0]
            for char in text:
                byte_at.append(byte_at[-1] + len(char.encode("utf-8")))
            tokens = []
            for token_id, (start, stop), is_special in zip(ids, spans, special, strict=True):
                if is_special:
                    tokens.append(self._special_token(token_id))
                else:
                    begin, end = byte_at[start], byte_at[stop]
                    tokens.append({"id": token_id, "text": data[begin:end].decode("utf-8", "replace"),
                                   "special": False, "start": begin, "stop": end})
            if add_special_tokens and self.eos_id is not None and len(with_eos(ids, self.eos_id)) > len(ids):
                tokens.append(self._special_token(self.eos_id))
            described.append(tokens)
        return described

    def _special_token(self, token_id: int) -> dict[str, Any]:
        text = self.tokenizer.convert_ids_to_tokens(token_id)
        return {"id": token_id, "text": text, "special": True, "start": None, "stop": None}

    def _fit(self, ids: list[int], truncate: bool, direction: Direction, index: int, instructed: bool) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        if truncate:
            return self.truncated(ids, direction)
        if self.long_input == "chunk" and not instructed:
            return ids  # embedded in windows (see windows)
        raise self._too_long(index, len(ids), instructed)

    def _split(self, ids: list[int]) -> tuple[list[int], list[int], list[int]]:
        """The input's leading special tokens, its text, its trailing special tokens (each only
        where the input has them: client-supplied ids may lack a BOS)."""
        head = len(self.prefix) if ids[: len(self.prefix)] == self.prefix else 0
        ends_with_suffix = len(ids) - head >= len(self.suffix) and ids[len(ids) - len(self.suffix) :] == self.suffix
        tail = len(self.suffix) if ends_with_suffix else 0
        return ids[:head], ids[head : len(ids) - tail], ids[len(ids) - tail :]

    def _too_long(self, index: int, length: int, instructed: bool) -> InputError:
        advice = (
            "This model embeds longer documents in windows (long_input: chunk), but not inputs with "
            "an instruction: shorten it, or send \"truncate\": true to cut it to the limit."
            if self.long_input == "chunk" and instructed
            else "Shorten the input, or send \"truncate\": true to cut it to the limit."
        )
        return InputError(
            f"Input {index} is {length} tokens long, but this model's maximum input length is "
            f"{self.max_tokens} tokens. {advice}",
            code="context_length_exceeded",
        )


def _special_tokens_around_text(tokenizer: PreTrainedTokenizerBase, eos_id: int | None) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text, plus the EOS we append (if any)."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    text = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(text) + 1):
        if with_special[start : start + len(text)] == text:
            prefix, suffix = with_special[:start], with_special[start + len(text) :]
            break
    else:
        raise ValueError(f"cannot find the text's tokens {text} within {with_special}: unusual special tokens")
    return prefix, with_eos(suffix, eos_id)


def batch_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """Texts → their token ids with the tokenizer's special tokens, as `tokenizer(texts)` gives.

    For a fast tokenizer, straight from the Rust backend's `encode_batch_fast`, which computes no
    character offsets and builds no attention masks or Python dicts: tokenizing is most of the
    front's CPU per bulk document (bench/results/capacity.md, "Tokenizing alone"). The backend is
    a private copy, so that settings transformers leaves on the shared one between calls
    (truncation and padding from tokenizer.json, split_special_tokens) cannot change what it
    returns; and it is used only where it agrees with the tokenizer on a few probes.
    """
    def wrapper(texts: list[str]) -> list[list[int]]:
        return list(tokenizer(texts, add_special_tokens=True)["input_ids"])

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return wrapper
    own: Any = copy.deepcopy(backend)
    own.no_truncation()
    own.no_padding()
    own.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def fast(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in own.encode_batch_fast(texts, add_special_tokens=True)]

    probes = ["a", "Hello, World! 123", "</s> <s> [SEP] ümlaut 東京"]
    return fast if fast(probes) == wrapper(probes) else wrapper


def with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """`ids` ending in the EOS the model pools on (a copy when one is appended)."""
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids = ids + [eos_id]
    return ids


def load_input_tokenizer(spec: ModelSpec) -> InputTokenizer:
    """The tokenizer files only, no weights: what the Ingress and Tokenizer need."""
    tokenizer = load_tokenizer(spec)
    return InputTokenizer(tokenizer, resolve_spec(spec, tokenizer))
