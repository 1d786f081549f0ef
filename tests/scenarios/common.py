"""What the scenarios share beyond testkit/harness.py: the samples of a timeline where something
changed, counting lines in Ray's Serve logs, striking a replica with a fault while it holds work
(fault_when_busy), and the SFR-like model on a 3-node cluster of fake GPUs that the autoscaling
and replica-kill scenarios serve."""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testkit import harness
from testkit.loadgen import vectors


def changes(samples: list[dict], keys: tuple[str, ...] | None = None) -> list[dict]:
    """The first sample and each one whose state (its `keys`, else all but the time) differs from
    the sample before it."""
    def state(s: dict) -> dict:
        return {k: v for k, v in s.items() if (k in keys if keys else k not in ("t", "t_s"))}

    return [s for i, s in enumerate(samples) if i == 0 or state(s) != state(samples[i - 1])]


def serve_log_lines(temp_dir: str, pattern: str, needle: str) -> int:
    """Lines containing `needle` in the Serve logs named `pattern` of the Ray instance in `temp_dir`."""
    # session_latest links to the session directory: read each file once.
    paths = {os.path.realpath(p) for p in glob.glob(os.path.join(temp_dir, "ray", "session_*", "logs", "serve",
                                                                  pattern))}
    count = 0
    for path in paths:
        with open(path, errors="replace") as f:
            count += sum(needle in line for line in f)
    return count


# --- faults at a moment that proves something -----------------------------------------------


def ongoing_requests(actor) -> int:
    """Requests a Serve replica holds now (running, or waiting in it, e.g. in its batcher), as the
    replica itself counts them."""
    import ray

    return int(ray.get(actor.get_num_ongoing_requests.remote(), timeout=10))


async def fault_when_busy(actor_name: str, fault, *, t0: float, not_before_s: float, give_up_s: float,
                          min_ongoing: int = 1, poll_s: float = 0.02) -> dict:
    """Apply `fault(actor)` to the Serve replica `actor_name` as soon as it holds at least
    `min_ongoing` requests, polling from `not_before_s` until `give_up_s` (seconds since `t0`,
    a `time.perf_counter()` origin). A fault at a fixed time may land while the replica is idle
    and prove nothing; this one lands while it holds work. `fault` is any callable of the actor
    handle (`ray.kill`, a hook that breaks its device, ...). Returns when it struck (None if the
    replica never held that much work) and how many requests the replica held just before."""
    import asyncio
    import time

    import ray

    actor = ray.get_actor(actor_name, namespace="serve")
    await asyncio.sleep(max(0.0, not_before_s - (time.perf_counter() - t0)))
    held, most = 0, 0
    while time.perf_counter() - t0 < give_up_s:
        held = await asyncio.to_thread(ongoing_requests, actor)
        most = max(most, held)
        if held >= min_ongoing:
            await asyncio.to_thread(fault, actor)
            return {"t_fault_s": round(time.perf_counter() - t0, 3), "ongoing_at_fault": held}
        await asyncio.sleep(poll_s)
    return {"t_fault_s": None, "ongoing_at_fault": None, "most_ongoing_seen": most}


# --- an SFR-like model on a cluster of fake GPUs (autoscaling, replica kill) ------------------

MODEL = "tiny-sfr-wide"
FAKE_GPU_WORKERS = [{"fake_gpu": 2}, {"fake_gpu": 1}]


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 384
    intermediate: int = 1024
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2


def build_model(root: Path, shape: ModelShape = ModelShape()) -> Path:
    """An SFR-like model dir: testkit/tiny_models.py's tokenizer and ST files, a wider Mistral."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    from testkit.tiny_models import build_tokenizer, write_sentence_transformers_files

    build_tokenizer(root)
    config = MistralConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(root)), hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, sliding_window=4096, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    MistralModel(config).eval().save_pretrained(root)
    write_sentence_transformers_files(root)
    return root


@contextlib.contextmanager
def model_and_cluster(shape: ModelShape):
    """A temporary SFR-like model, and our cluster of a head and two fake-GPU workers; yields
    (model dir, the cluster's temp dir, {node id: name}) and tears both down."""
    tmp, cluster, temp_dir = Path(tempfile.mkdtemp(prefix="sfr-like-")), None, None
    try:
        model_dir = build_model(tmp / "model", shape)
        cluster, temp_dir, names = harness.start_cluster(FAKE_GPU_WORKERS)
        yield model_dir, temp_dir, names
    finally:
        if cluster is not None:
            harness.stop_ray(temp_dir, cluster)
        shutil.rmtree(tmp, ignore_errors=True)


def text_pool(n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    """Distinct texts from the tiny tokenizer's corpus words (about one token per word)."""
    from testkit.tiny_models import CORPUS

    words, rng, texts = " ".join(CORPUS).split(), random.Random(seed), {}
    while len(texts) < n:
        texts.setdefault(" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))))
    return list(texts)


def serve_config(port: int, model_dir: Path, embedder: dict, max_batch_tokens: int = 2048) -> dict:
    """A `serve run` config: `build_app` with one model, Ingress and Tokenizer on the head."""
    on_head = {"num_cpus": 0.25, "resources": {"head_node": 0.01}}
    model = {"name": MODEL, "source": str(model_dir), "max_input_tokens": 256, "max_batch_tokens": max_batch_tokens,
             "tuning": {"cpu_threads": 1}}  # one core per "GPU"
    return {
        "proxy_location": "HeadOnly",  # every node has IP 127.0.0.1 here: one proxy, one port
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": harness.APP, "route_prefix": "/", "import_path": "serve_app.deployments.app:build_app",
            "runtime_env": {"env_vars": harness.OFFLINE_ENV},
            # Auth off: loopback only. Cache off: the load repeats texts from a small pool, and
            # cached rows never reach the Embedder whose behaviour the scenarios watch.
            "args": {"models": [model], "auth": {"enabled": False}, "cache": {"max_bytes": 0}},
            "deployments": [{"name": "Ingress", "num_replicas": 1, "ray_actor_options": on_head},
                            {"name": "Tokenizer", "num_replicas": 1, "ray_actor_options": on_head},
                            {"name": "Embedder", **embedder}],
        }],
    }


def checked(dims: int, tokens: list[int], refs: list[np.ndarray] | None = None, atol: float = 1e-4,
            worst: dict | None = None):
    """A `validate` for loadgen: every vector `dims` wide and unit length (or within `atol` of
    its reference; the largest difference seen goes to `worst["max_abs_diff"]`), and usage equal
    to the request's token count."""

    def validate(index: int, payload: dict) -> str | None:
        got = vectors(payload)
        if got.shape[1] != dims:
            return "wrong_shape"
        if refs is not None:
            diff = float(np.max(np.abs(got - refs[index])))
            if worst is not None:
                worst["max_abs_diff"] = max(diff, worst.get("max_abs_diff", 0.0))
            if diff > atol:
                return "wrong_vector"
        if not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4):
            return "not_normalized"
        return None if payload["usage"]["prompt_tokens"] == tokens[index] else "wrong_usage"

    return validate
