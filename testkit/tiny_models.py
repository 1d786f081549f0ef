"""Builds tiny SFR-like models on disk: a family over a toy vocabulary (tokenizer, base model, two
LoRA adapters, merged models), and one model over SFR's real vocabulary (sfr_tokenizer.py).

Both tokenizers mimic SFR-Embedding-Mistral's files: `tokenizer_config.json` claims
`add_eos_token: true`, but the `tokenizer.json` post-processor adds only `<s>`, so with
transformers 5 `tokenizer(text)` yields no EOS — the trap the service must not fall into.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .sfr_tokenizer import bos_only_post_processor, build_sfr_tokenizer, write_sfr_tokenizer_config

CORPUS = [
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: ",
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun",
    "embeddings turn text into vectors so that search and retrieval can compare meaning",
    "how many hours a day do cats sleep, and why do dogs dream about chasing rabbits",
    "Ray Serve batches requests on the GPU and autoscales replicas across a cluster",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ; : ? ! ' \" - ( ) [ ] / are common",
]
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:?!'\"-()[]/\n") + ["▁"]


def build_tokenizer(directory: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=ALPHABET
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    # Like SFR's tokenizer.json: only <s> is added, whatever tokenizer_config.json says.
    tok.post_processor = bos_only_post_processor()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    write_sfr_tokenizer_config(directory)


def write_sentence_transformers_files(directory: Path) -> None:
    """SFR ships Transformer + last-token Pooling modules and no Normalize module."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False})
    )


def build_family(root: Path) -> dict[str, Path]:
    """root/base (model + tokenizer); two LoRA adapters of that base, root/adapter (r=8 on every
    linear layer, like SFR's) and root/adapter2 (r=4 on some, as another tenant might train),
    and each one merged into the base: root/merged and root/merged2."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    base = root / "base"
    build_tokenizer(base)
    save_tiny_mistral(base, vocab_size=len(AutoTokenizer.from_pretrained(base)))
    family = {"base": base}
    adapters = {
        "": LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,  # random A and B: vectors change
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "2": LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "up_proj"]),
    }
    for seed, (suffix, lora) in enumerate(adapters.items(), start=1):
        family[f"adapter{suffix}"], family[f"merged{suffix}"] = build_adapter(root, base, lora, suffix, seed)
    return family


def build_sfr_vocab_model(directory: Path) -> Path:
    """A tiny Mistral over SFR's real 32,000-token vocabulary and SFR-shaped tokenizer files."""
    build_sfr_tokenizer(directory)
    save_tiny_mistral(directory, vocab_size=32000)
    return directory


def save_tiny_mistral(directory: Path, vocab_size: int) -> None:
    """A randomly initialised (seeded) Mistral of SFR's shape but tiny, with SFR's
    sentence-transformers files, saved into `directory` beside its tokenizer."""
    from transformers import MistralConfig, MistralModel

    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    MistralModel(config).eval().save_pretrained(directory)
    write_sentence_transformers_files(directory)


def build_adapter(root: Path, base: Path, lora, suffix: str, seed: int) -> tuple[Path, Path]:
    """root/adapter{suffix} (a LoRA adapter of `base`) and root/merged{suffix} (the two merged)."""
    from peft import get_peft_model
    from transformers import MistralModel

    adapter, merged = root / f"adapter{suffix}", root / f"merged{suffix}"
    torch.manual_seed(seed)
    peft_model = get_peft_model(MistralModel.from_pretrained(base), lora)
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload().save_pretrained(merged)
    build_tokenizer(merged)
    write_sentence_transformers_files(merged)
    return adapter, merged
