"""The settings of the app the tests serve (and bench/tests with them): tiny SFR-like models
beside deploy/local.yaml's model, with small bounds so that the suite reaches them."""

from pathlib import Path

import yaml

TINY_MAX_TOKENS = 64
ROOT = Path(__file__).resolve().parent.parent
MAX_REQUEST_BYTES = 1 << 20
MAX_REQUEST_TOKENS = 2048 * TINY_MAX_TOKENS  # exactly the worst case of tiny-sfr
# tests/e2e/test_bounds.py: a cancelled request of most of this must be refunded for the next to pass.
METERED_TOKENS_PER_MINUTE = 40_000
SFR_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_config_model() -> dict:
    """The model entry of deploy/local.yaml, so the test serves exactly what users start."""
    config = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())
    return config["applications"][0]["args"]["models"][0]


def tiny_sfr_model(tiny_family) -> dict:
    """The served `tiny-sfr` entry (batch jobs embed with exactly these settings too)."""
    return {
        "name": "tiny-sfr",
        "source": str(tiny_family["base"]),
        "query_instruction": SFR_TASK,
        "max_input_tokens": TINY_MAX_TOKENS,
        "max_batch_tokens": 512,  # small, so large requests fan out over many parts
        # Two CPU lanes, so two batches in flight that share them, as deploy/local.yaml runs.
        "tuning": {"cpu_threads": 2},
    }


def tiny_sfr_vocab_model(directory) -> dict:
    """The served `tiny-sfr-vocab` entry: a tiny Mistral over SFR's real vocabulary and tokenizer files
    (tiny_models.build_sfr_vocab_model), so that the EOS rules meet Mistral's real BPE."""
    return {
        "name": "tiny-sfr-vocab",
        "source": str(directory),
        "query_instruction": SFR_TASK,
        "max_input_tokens": TINY_MAX_TOKENS,
        "max_batch_tokens": 512,
        "tuning": {"cpu_threads": 1},
    }
