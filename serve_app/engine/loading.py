"""Finding a model's files and loading its tokenizer and weights (no Ray, no HTTP)."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


def resolve_source(source: str) -> str:
    """Turn `package:<pkg>/<subdir>` into a directory; hub ids and paths pass through."""
    if not source.startswith(PACKAGE_PREFIX):
        return source
    package, _, subdir = source[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model source {source!r}: Python package {package!r} is not installed")
    directory = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not directory.is_dir():
        raise ValueError(f"model source {source!r}: {directory} is not a directory")
    return str(directory)


def _read_json(source: str, filename: str, revision: str | None) -> Any:
    """A JSON file of the model (parsed), from its directory or the local hub cache; None if absent."""
    path = Path(source) / filename
    if not Path(source).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, filename, revision=revision))
        except Exception:  # absent file, or offline without it in the cache
            return None
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@dataclass(frozen=True)
class SentenceTransformersInfo:
    """What a model's sentence-transformers files say about pooling, normalization and length."""

    pooling: str | None
    normalize: bool
    max_seq_length: int | None


def read_sentence_transformers_info(source: str, revision: str | None) -> SentenceTransformersInfo:
    modules = _read_json(source, "modules.json", revision) or []
    pooling, normalize = None, False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("models.Normalize"):
            normalize = True
        elif kind.endswith("models.Pooling"):
            config = _read_json(source, f"{module.get('path', '1_Pooling')}/config.json", revision)
            pooling = _pooling_from_config(config or {})
    bert_config = _read_json(source, "sentence_bert_config.json", revision) or {}
    return SentenceTransformersInfo(pooling, normalize, bert_config.get("max_seq_length"))


def _pooling_from_config(config: dict[str, Any]) -> str | None:
    for key, mode in (
        ("pooling_mode_lasttoken", "last_token"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
    ):
        if config.get(key):
            return mode
    return None


@dataclass(frozen=True)
class ResolvedSpec:
    """A ModelSpec with every default decided from the model's own files."""

    spec: ModelSpec
    path: str  # what from_pretrained gets
    pooling: str
    append_eos: bool
    max_input_tokens: int


def resolve_spec(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> ResolvedSpec:
    path = resolve_source(spec.source)
    info = read_sentence_transformers_info(path, spec.revision)
    pooling = spec.pooling or info.pooling or "last_token"
    append_eos = spec.append_eos if spec.append_eos is not None else pooling == "last_token"
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError(f"model {spec.name!r}: append_eos is set but the tokenizer has no EOS token")
    max_input_tokens = spec.max_input_tokens or info.max_seq_length
    if max_input_tokens is None:
        limit = getattr(tokenizer, "model_max_length", None)
        max_input_tokens = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 512
    if max_input_tokens > spec.max_batch_tokens:
        raise ValueError(
            f"model {spec.name!r}: max_batch_tokens ({spec.max_batch_tokens}) is below "
            f"max_input_tokens ({max_input_tokens})"
        )
    return ResolvedSpec(spec, path, pooling, append_eos, max_input_tokens)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_source(spec.source), revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    return tokenizer


def load_model(resolved: ResolvedSpec, device: str, dtype: torch.dtype, merge_adapter: bool = True) -> PreTrainedModel:
    """The encoder (no LM head); with `merge_adapter`, its spec's LoRA adapter (if any) merged
    into the weights (for adapters kept apart, see adapters.py)."""
    from transformers import AutoModel

    spec = resolved.spec
    # device_map: each weight goes from the checkpoint straight to the device, never through a
    # full copy of the model in host RAM, so a 7B replica does not need a model's worth of it to
    # start (docs/decisions.md#load-device-map).
    model = AutoModel.from_pretrained(
        resolved.path, revision=spec.revision, dtype=dtype, trust_remote_code=spec.trust_remote_code,
        device_map=device,
    )
    if merge_adapter and spec.adapter:
        from peft import PeftModel

        adapter = resolve_source(spec.adapter)
        logger.info("merging LoRA adapter %s into %s", adapter, resolved.path)
        model = PeftModel.from_pretrained(model, adapter, revision=spec.adapter_revision)
        model = model.merge_and_unload()
    loaded: PreTrainedModel = model.to(device).eval()  # the adapter's weights too
    return loaded
