"""SFR-Embedding-Mistral's tokenizer files, built offline from Mistral-7B-v0.1's vocabulary.

The PyPI package `mistral-common` ships Mistral-7B-v0.1's sentencepiece model (the 32,000-token
vocabulary SFR uses); transformers converts it to a fast tokenizer (with `sentencepiece`
installed). The directory written here is shaped as SFR's files are: `tokenizer.json`'s
post-processor adds `<s>` only, while `tokenizer_config.json` claims `add_eos_token: true`, so
with transformers 5 `tokenizer(text)` ends without `</s>`: the trap the service must not fall into.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

from tokenizers import processors

BOS_ID, EOS_ID = 1, 2  # Mistral's <s> and </s>
VOCAB_SIZE = 32000

# SFR's tokenizer_config.json, in the parts that matter for tokenizing.
SFR_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "</s>",
    "padding_side": "right",
    "model_max_length": 1000000000000000019884624838656,
    "tokenizer_class": "LlamaTokenizer",
}


def bos_only_post_processor() -> processors.TemplateProcessing:
    """SFR's tokenizer.json post-processor: `<s>` before each sequence, never `</s>` after."""
    return processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )


def write_sfr_tokenizer_config(directory: Path) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(SFR_TOKENIZER_CONFIG))


def sentencepiece_model() -> Path:
    """Mistral-7B-v0.1's sentencepiece model, as mistral-common ships it."""
    return Path(str(files("mistral_common") / "data" / "tokenizer.model.v1"))


def build_sfr_tokenizer(directory: Path) -> Path:
    """Write SFR-shaped tokenizer files (tokenizer.json, tokenizer_config.json) into `directory`."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as spm:
        # transformers converts a directory's `tokenizer.model`, not a file under another name.
        shutil.copy(sentencepiece_model(), Path(spm) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(spm)
    assert len(tokenizer) == VOCAB_SIZE, f"expected Mistral's {VOCAB_SIZE} tokens, converted {len(tokenizer)}"
    tokenizer.backend_tokenizer.post_processor = bos_only_post_processor()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    write_sfr_tokenizer_config(directory)
    return directory
