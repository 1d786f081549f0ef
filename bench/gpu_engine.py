"""GPU benchmark of the engine layer (`serve_app.engine.embedder.EmbeddingEngine`) on the
SFR-Embedding-Mistral architecture, with random weights and random token ids, in one run.

No Ray, no tokenizer, no downloads (the device machine has none of them; torchao and pydantic come
as wheels: bench/run_gpu_device.sh). Speed does not depend on the weight values, so the 7 B model
is built on `meta`, materialised on the GPU and filled with small random normals. Rows, on
docs (512 tokens), mixed (log-uniform 16–2048) and queries (32): ours in bf16 with sorted padded
and with packed passes, FP8 (torchao; per-row padded and packed, per-tensor padded), two random
rank-8 LoRA adapters + the bare base unmerged in one engine (mixed passes, a pass per adapter,
one adapter alone, FP8), sentence-transformers `encode`; then single forward passes of 512 …
16384 padded tokens, the targets with verdicts, and a correctness check against an fp32
per-text reference. What each figure decides: bench/results/GPU_PENDING.md.

  python bench/gpu_engine.py --out bench/results/gpu          # H100/H200, ~4 min
  python bench/gpu_engine.py --small --device cpu --out /tmp/x  # CPU smoke run of the script
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
import timeit
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# The script runs as `python bench/gpu_engine.py` from the repo root, with or without PYTHONPATH.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

try:
    from serve_app.engine.adapters import BASE
    from serve_app.engine.embedder import Embedded, EmbeddingEngine, pick_dtype
    from serve_app.engine.quantization import FP8Unsupported, check_fp8_supported, quantize_fp8
except ImportError as exc:  # e.g. pydantic missing on a bare GPU image: say so plainly
    sys.exit(f"cannot import serve_app.engine ({exc}); run from the repo root with its dependencies")

# Dense (no sparsity) tensor-core TFLOP/s from NVIDIA's datasheets, (bf16, fp8); most specific
# name first, matched against torch.cuda.get_device_name. The H200's compute is the H100 SXM's.
DATASHEETS = [
    ("H200 NVL", 835.0, 1671.0), ("H200", 989.0, 1979.0), ("H100 NVL", 835.0, 1671.0),
    ("H100 PCIe", 756.0, 1513.0), ("H100", 989.0, 1979.0), ("B200", 2250.0, 4500.0),
    ("L40S", 362.0, 733.0), ("L4", 121.0, 242.0), ("A100", 312.0, None),
]
SEED_USD_PER_M_TOKENS = 0.008  # the price the seed quotes for SFR
BOS_ID, EOS_ID = 1, 2  # Mistral's <s> and </s>
BASELINE_BATCH = 32  # sentence-transformers' default batch_size
OURS = "ours (EmbeddingEngine)"  # in the run's dtype: bf16 on a GPU
LORA_MODELS = {"base": BASE, "a": "adapter_0", "b": "adapter_1"}  # a shared base's models in the LoRA rows
FLOP_FORMULA = (
    "model FLOPs of a text of L real tokens = 2·N·L + 2·n_layers·d·L², "
    "N = non-embedding parameters, d = hidden size; the attention term is "
    "4·n_layers·L·d per token (QKᵀ and AV), halved because the kernel is causal. "
    "Padding is not counted: MFU is useful work / time / peak."
)
# (hidden, intermediate, layers, heads, KV heads): SFR-Embedding-Mistral's config.json; --small, to check the
# script on a CPU; the correctness check's: small enough for an fp32 per-text reference, same 4:1 GQA ratio.
SIZES = {"sfr": (4096, 14336, 32, 32, 8), "small": (256, 512, 2, 4, 2), "check": (512, 1792, 4, 8, 2)}


def mistral_config(kind: str):
    from transformers import MistralConfig

    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return MistralConfig(vocab_size=32000, max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
                         rope_theta=10000.0, **dict(zip(names, SIZES[kind])))


@torch.no_grad()
def build_random_model(config, device: str, dtype: torch.dtype, seed: int):
    """MistralModel with random N(0, 0.02) weights, without slow CPU initialisation.

    Constructing on `meta` allocates nothing; `to_empty` allocates uninitialised storage on
    the target device, where filling 7 B values takes well under a second.
    """
    from transformers import AutoModel

    # Parameters take the default dtype at construction; setting it (rather than passing
    # `dtype=`, called `torch_dtype=` before transformers 4.56) works with any version.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    assert next(model.parameters()).dtype == dtype, "model was not built in the requested dtype"
    model = model.to_empty(device=device)
    torch.manual_seed(seed)
    for param in model.parameters():
        if param.dim() == 1:  # RMSNorm gains: 1 as in a trained model, so activations stay sane
            param.fill_(1.0)
        else:
            param.normal_(mean=0.0, std=0.02)
    # RoPE's inverse frequencies are non-persistent buffers computed in __init__: to_empty left
    # them as garbage, so build the rotary module again (float32, as from_pretrained keeps it).
    model.rotary_emb = type(model.rotary_emb)(config=model.config).to(device)
    return model.eval()


@torch.no_grad()
def add_random_adapters(model, n: int, rank: int, seed: int, std: float = 0.02):
    """`model` as a PeftModel with `n` LoRA adapters (`adapter_0`, ...) of rank `rank` on every
    linear layer, unmerged, in the model's dtype, with N(0, std) weights: large enough to move
    the vectors (PEFT's default init leaves them unchanged)."""
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config(), adapter_name="adapter_0", autocast_adapter_dtype=False)
    for k in range(1, n):
        peft_model.add_adapter(f"adapter_{k}", config())
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            param.normal_(mean=0.0, std=std)
    return peft_model.eval()


def make_engine(model, device: str, max_batch_tokens: int, packed: bool = False, lora: bool = False,
                cpu_threads: int | None = None) -> EmbeddingEngine:
    """Our engine around an in-memory model (SFR's pooling: last token, L2-normalized), with sorted
    padded passes or, `packed`, padding-free ones (pack_above_padding 0); `lora`: a PeftModel of
    LORA_MODELS' adapters."""
    return EmbeddingEngine(model, device, "last_token", True, max_batch_tokens, cpu_threads,
                           pack_above_padding=0.0 if packed else 1.0, adapters=LORA_MODELS if lora else None)


def run_lora(engine: EmbeddingEngine, seqs: list[list[int]], mix: bool, models: list[str] | None = None) -> Embedded:
    """The texts through a LoRA engine, each its row_models() model unless `models` says;
    `mix`: passes mix adapters (else one pass per adapter)."""
    engine.mix_adapters = mix
    return engine.embed_counted(seqs, models=models or row_models(len(seqs)))


def row_models(n: int) -> list[str]:
    """Each text's model in the LoRA rows: the three in turn (the workloads' order is random)."""
    names = list(LORA_MODELS)
    return [names[i % len(names)] for i in range(n)]


def random_text(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    """What the tokenizer stage hands the engine: <s>, body ids, and the appended </s>."""
    return [BOS_ID, *rng.integers(3, vocab, size=length - 2).tolist(), EOS_ID]


def log_uniform_lengths(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    # Log-uniform: as many 16–128 token texts as 256–2048 ones, like a real mixed corpus.
    return np.exp(rng.uniform(math.log(low), math.log(high), size=n)).astype(int).tolist()


def make_workloads(rng: np.random.Generator, vocab: int, counts: tuple[int, int, int], longest: int) -> dict:
    """docs (512 tokens), mixed (log-uniform 16–`longest`) and queries (32) of these counts."""
    docs, mixed, queries = counts
    return {"docs": [random_text(rng, 512, vocab) for _ in range(docs)],
            "mixed": [random_text(rng, n, vocab) for n in log_uniform_lengths(rng, mixed, 16, longest)],
            "queries": [random_text(rng, 32, vocab) for _ in range(queries)]}


@dataclass
class Method:
    """A way to embed a workload. `prepare` shapes the inputs and is not timed."""

    name: str
    run: Callable[[list], Embedded]
    precision: str = "bf16"  # whose matmul peak its MFU is measured against
    same_model_as_ours: bool = True  # False (LoRA rows): its vectors are another model's
    prepare: Callable[[list[list[int]]], list] = lambda seqs: seqs


def make_st_method(model, device: str) -> Method | None:
    """The real sentence-transformers `encode`: an id-parsing input module wrapping our model, then
    the library's own last-token Pooling (what SFR's modules.json configures). None (no baseline
    row) if this version cannot be built.

    `models.Transformer` cannot be used: it loads config and tokenizer from a path, and saving
    14 GB of random weights to build one is not worth it. Everything else — sorting by length,
    batching, padding, pooling, normalising, moving to CPU — is the library's `encode`. Ids are
    written in decimal (mostly 5 characters each), so character length tracks token length about
    as closely as real text does; parsing them back stands in for tokenizing.
    """
    counts = [0, 0]  # real, padded tokens of the current call
    try:
        import sentence_transformers
        from sentence_transformers import SentenceTransformer

        try:  # v6 layout
            from sentence_transformers.sentence_transformer.modules import InputModule, Pooling
        except ImportError:
            from sentence_transformers.models import Pooling

            InputModule = getattr(sentence_transformers.models, "InputModule", torch.nn.Module)

        class TokenIdInput(InputModule):
            """Parses 'id id id' strings, right-pads to the batch's longest, runs the model."""

            save_in_root = True
            modalities = ["text"]

            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def preprocess(self, inputs, prompt=None, **kwargs):
                rows = [[int(t) for t in text.split()] for text in inputs]
                ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, row in enumerate(rows):
                    ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
                counts[0] += int(mask.sum())
                counts[1] += ids.numel()
                return {"input_ids": ids, "attention_mask": mask}

            tokenize = preprocess  # the name sentence-transformers < 5 calls

            def forward(self, features, **kwargs):
                features["token_embeddings"] = self.inner(input_ids=features["input_ids"],
                                                          attention_mask=features["attention_mask"]).last_hidden_state
                return features

            def save(self, *args, **kwargs):
                raise NotImplementedError("benchmark-only module")

        pooling = Pooling(int(model.config.hidden_size), pooling_mode="lasttoken")
        st_model = SentenceTransformer(modules=[TokenIdInput(model), pooling], device=device)
    except Exception as exc:  # an incompatible library version: say so, keep the rest
        print(f"[st] could not build a SentenceTransformer ({exc!r}); no baseline row")
        return None

    def run(texts: list[str]) -> Embedded:
        counts[:] = [0, 0]
        vectors = st_model.encode(texts, batch_size=BASELINE_BATCH, normalize_embeddings=True, convert_to_numpy=True)
        return Embedded(np.asarray(vectors, dtype=np.float32), *counts)

    return Method(f"sentence-transformers {sentence_transformers.__version__} encode (real)", run,
                  prepare=lambda seqs: [" ".join(map(str, s)) for s in seqs])


def build_methods(models: dict, device: str, budget: int, baselines: bool) -> tuple[list[Method], dict]:
    """Ours first (the others are compared to it): padded and packed per precision (FP8 per-tensor
    padded only), the LoRA rows, the baseline; also the engines whose single passes are timed."""
    methods, timed_engines = [], {}
    for name, model in models.items():
        if name.startswith("lora"):
            continue
        precision, label = name.split()[0], "ours" if name == "bf16" else f"ours {name}"
        padded = make_engine(model, device, budget)
        timed_engines.setdefault(precision, padded)  # FP8: per-row, the served setting
        methods.append(Method(OURS if name == "bf16" else label, padded.embed_counted, precision))
        if name != "fp8 per-tensor":
            methods.append(Method(f"{label}, packed passes", make_engine(model, device, budget, True).embed_counted,
                                  precision))
    both = "2 adapters + base unmerged"
    if "lora bf16" in models:
        lora = make_engine(models["lora bf16"], device, budget, lora=True)
        methods += [Method(f"LoRA: {both}, mixed passes", partial(run_lora, lora, mix=True), same_model_as_ours=False),
                    Method(f"LoRA: {both}, a pass per adapter", partial(run_lora, lora, mix=False),
                           same_model_as_ours=False),
                    Method("LoRA: 1 adapter unmerged", lambda seqs: run_lora(lora, seqs, True, ["a"] * len(seqs)),
                           same_model_as_ours=False)]
    if "lora fp8 per-row" in models:
        lora_fp8 = make_engine(models["lora fp8 per-row"], device, budget, lora=True)
        methods.append(Method(f"LoRA fp8 per-row: {both}, mixed passes", partial(run_lora, lora_fp8, mix=True),
                              "fp8", same_model_as_ours=False))
    st = make_st_method(models["bf16"], device) if baselines else None
    return methods + ([st] if st else []), timed_engines


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(method: Method, seqs, device: str) -> tuple[Embedded, float, float | None]:
    """One call, its wall time (GPU work included: synchronised before and after), peak GiB."""
    inputs = method.prepare(seqs)
    reset_memory(device)
    synchronize(device)
    start = time.perf_counter()
    done = method.run(inputs)
    synchronize(device)
    seconds = time.perf_counter() - start
    return done, seconds, torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


@torch.inference_mode()
def measure_matmul_peak(device: str, dtype: torch.dtype, n: int, iters: int, fp8: bool = False) -> float:
    """TFLOP/s of an n×n×n matmul, the practical ceiling MFU is measured against; `fp8`: the
    e4m3 `torch._scaled_mm` that torchao's float8 layers call."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if fp8:
        one = torch.tensor(1.0, device=device)
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # 2nd operand column-major
        product = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        product = lambda: torch.matmul(a, b)  # noqa: E731
    for _ in range(3):
        product()
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            product()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:  # a shared CPU is noisy: the fastest single product is the best estimate of its peak
        seconds = min(timeit.timeit(product, number=1) for _ in range(iters)) * iters
    return 2 * n**3 * iters / seconds / 1e12


def fp8_skip_reason(device: str) -> str | None:
    """Why FP8 rows cannot run here (the engine's own refusal, or torchao failing on one small
    layer: a torchao built for another torch), or None. Either way the bf16 rows still run."""
    try:
        check_fp8_supported("random SFR", device)
        layer = quantize_fp8(torch.nn.Sequential(torch.nn.Linear(256, 256)).to(device, torch.bfloat16))
        layer(torch.randn(32, 256, device=device, dtype=torch.bfloat16))
    except FP8Unsupported as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001
        return f"torchao's float8 layer failed here: {exc!r}"
    return None


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def reference_vectors(models: list, seqs: list[list[int]], device: str) -> np.ndarray:
    """Each text alone through its model (`models[i]` for text i), pooled at its last token."""
    rows = []
    for model, seq in zip(models, seqs):
        hidden = model(input_ids=torch.tensor([seq], device=device)).last_hidden_state[0, -1]
        rows.append(torch.nn.functional.normalize(hidden.float(), dim=-1).cpu().numpy())
    return np.stack(rows)


@torch.inference_mode()
def correctness_check(device: str, seed: int, fp8: bool, lora: bool, n_texts: int = 64) -> dict:
    """The engine's vectors — bf16 padded and packed, FP8 per-row and per-tensor, bf16 with LoRA
    adapters unmerged — vs fp32 one text at a time, mixed lengths sharing 4096-token passes.

    The reference takes the hidden state at each text's last position (the EOS) of an
    unpadded forward pass, so any padding or packing leak, wrong pooled position or batch
    dependence shows up as a low cosine. The control (cosine between different texts) shows
    the threshold is not met trivially. For LoRA: the bare base and two adapters unmerged in one
    engine (each text one of the three, passes mixing them) vs the fp32 reference with each
    text's adapter merged into the same weights.
    """
    config = mistral_config("check")
    reference = build_random_model(config, device, torch.float32, seed)

    def same_weights(quantize: str | None = None):
        model = build_random_model(config, device, torch.bfloat16, seed)
        model.load_state_dict(reference.state_dict())  # the reference's weights, rounded to bf16
        return quantize_fp8(model, quantize) if quantize else model

    rng = np.random.default_rng(seed + 1)
    seqs = [random_text(rng, n, config.vocab_size) for n in log_uniform_lengths(rng, n_texts, 4, 1024)]
    ref = reference_vectors([reference] * len(seqs), seqs, device)
    bf16 = same_weights()
    engines = {"bf16 padded": make_engine(bf16, device, 4096), "bf16 packed": make_engine(bf16, device, 4096, True)}
    for granularity in ("row", "tensor") if fp8 else ():
        engines[f"fp8 per-{granularity}"] = make_engine(same_weights(granularity), device, 4096)
    results = {name: (engine.embed_counted(seqs), ref) for name, engine in engines.items()}
    if lora:
        fp32 = add_random_adapters(build_random_model(config, device, torch.float32, seed), 2, 8, seed + 1)
        models = row_models(len(seqs))
        engine = make_engine(copy.deepcopy(fp32).to(torch.bfloat16), device, 4096, lora=True)
        ours = engine.embed_counted(seqs, models=models)
        merged = {name: copy.deepcopy(fp32).unload() if adapter == BASE
                  else copy.deepcopy(fp32).merge_and_unload(adapter_names=[adapter])
                  for name, adapter in LORA_MODELS.items()}
        expected = reference_vectors([merged[m] for m in models], seqs, device)
        results["bf16 LoRA: 2 adapters + base, unmerged"] = (ours, expected)
    variants = {}
    for name, (done, expected) in results.items():
        cos = cosine_rows(done.vectors, expected)
        variants[name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                          "padding_ratio": 1 - done.real_tokens / done.padded_tokens, "passed": bool(cos.min() >= 0.999)}
    control = cosine_rows(ref, np.roll(ref, 1, axis=0))
    return {"texts": n_texts, "lengths": [min(map(len, seqs)), max(map(len, seqs))], "threshold": 0.999,
            "control_mean_cosine_between_texts": float(np.abs(control).mean()), "variants": variants,
            "passed": all(v["passed"] for v in variants.values())}


def datasheet_for(name: str) -> tuple[str, dict]:
    for card, bf16, fp8 in DATASHEETS:
        if card.lower() in name.lower():
            return card, {"bf16": bf16, **({"fp8": fp8} if fp8 else {})}
    return "not in the table", {}


def make_row(res: dict, workload: str, method: Method, seqs, done: Embedded, seconds: float, peak) -> dict:
    lengths = np.array([len(s) for s in seqs], dtype=np.float64)
    attention = 2.0 * res["n_layers"] * res["hidden"] * (lengths**2).sum()  # causal half of 4·l·L·d
    flops = 2.0 * res["non_embedding_params"] * lengths.sum() + attention
    achieved, tokens_per_s = flops / seconds / 1e12, done.real_tokens / seconds
    measured, sheet = res["peaks"].get(method.precision), res["datasheet"].get(method.precision)
    return {"workload": workload, "method": method.name, "texts": len(seqs), "real_tokens": done.real_tokens,
            "padded_tokens": done.padded_tokens, "seconds": seconds, "tokens_per_s": tokens_per_s,
            "texts_per_s": len(seqs) / seconds, "model_tflops": achieved,
            "mfu_measured_peak": achieved / measured if measured else None,
            "mfu_datasheet": achieved / sheet if sheet else None,
            "padding_ratio": 1 - done.real_tokens / done.padded_tokens, "peak_mem_gib": peak,
            "usd_per_m_tokens": res["usd_per_gpu_hour"] / 3600 / tokens_per_s * 1e6,
            "ours_over_this": None, "min_cosine_vs_ours": None}


def benchmark(res: dict, methods: list[Method], workloads: dict, out_dir: Path) -> None:
    """Every method on every workload; the first method is ours, the others are compared to it."""
    device = res["device"]
    sample = workloads["mixed"][:32] + workloads["queries"][:64] + workloads["docs"][:8]
    for method in methods:  # warm-up: CUDA context, cuBLAS handles, SDPA kernels, allocator pools
        method.run(method.prepare(sample))
    synchronize(device)
    for workload, seqs in workloads.items():
        results = []
        for method in methods:
            try:
                done, seconds, peak = timed(method, seqs, device)
            except Exception as exc:  # e.g. a baseline running out of memory: keep the rest
                print(f"  {workload:8s} {method.name}: FAILED {exc!r}", flush=True)
                res["errors"].append(f"{workload} / {method.name}: {exc!r}")
                reset_memory(device)
                continue
            row = make_row(res, workload, method, seqs, done, seconds, peak)
            results.append((row, done.vectors, method))
            res["rows"].append(row)
            print(f"  {workload:8s} {method.name[:44]:44s} {seconds:7.2f} s  {row['tokens_per_s']:10.0f} tok/s"
                  f"  pad {row['padding_ratio']:6.1%}", flush=True)
        if results and results[0][2] is methods[0]:  # else ours failed: nothing to compare against
            ours, ours_vectors, _ = results[0]
            for row, vectors, method in results:
                row["ours_over_this"] = ours["tokens_per_s"] / row["tokens_per_s"]
                if method.same_model_as_ours:  # other batching or FP8: the vectors must agree with bf16's
                    row["min_cosine_vs_ours"] = float(cosine_rows(vectors, ours_vectors).min())
        write_results(res, out_dir)  # after every workload: a timeout still leaves data


@torch.inference_mode()
def pass_timings(engines: dict, sizes: list[int], vocab: int, device: str, reps: int) -> list[dict]:
    """Median wall time of one forward pass of `size` padded tokens (rows of 512-token docs),
    host work and the copy back included: what a query waits behind one running pass."""
    rng, rows = np.random.default_rng(7), []
    for size in sizes:
        width = min(512, size)
        seqs = [random_text(rng, width, vocab) for _ in range(size // width)]
        row = {"padded_tokens": size, "rows": len(seqs), "width": width}
        for name, engine in engines.items():
            budget = engine.pass_tokens
            engine.pass_tokens = dict.fromkeys(budget, size)  # the call is one pass, whatever its class
            times = []
            for _ in range(reps + 1):  # the first: this shape's warm-up
                synchronize(device)
                start = time.perf_counter()
                engine.embed(seqs)
                synchronize(device)
                times.append(time.perf_counter() - start)
            engine.pass_tokens = budget
            row[f"{name} ms"] = float(np.median(times[1:]) * 1000)
        rows.append(row)
        print("  pass " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets on the SFR architecture, each with its verdict."""
    def best(workload: str, prefix: str) -> dict | None:
        found = [r for r in rows if r["workload"] == workload and r["method"].startswith(prefix)]
        return max(found, key=lambda r: r["tokens_per_s"], default=None)

    def ratio(a, b):
        return a and b and a["tokens_per_s"] / b["tokens_per_s"]

    docs, mixed = best("docs", OURS), best("mixed", OURS)
    found = [
        ("bf16 MFU on docs, vs the bf16 matmul peak measured here", 0.70, docs and docs["mfu_measured_peak"], "{:.1%}"),
        ("FP8 ÷ bf16 tokens/s on docs (best FP8 row)", 1.6, ratio(best("docs", "ours fp8"), docs), "{:.2f}×"),
        ("ours ÷ sentence-transformers tokens/s on mixed", 2.0, ratio(mixed, best("mixed", "sentence-transformers")),
         "{:.2f}×"),
    ]
    return [{"target": name, "need": style.format(need), "value": value,
             "shown": "n/a" if value is None else style.format(value),
             "verdict": "n/a" if value is None else "PASS" if value >= need else "FAIL"}
            for name, need, value, style in found]


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(res: dict) -> str:
    sheet = ", ".join(f"{k} {v:.0f}" for k, v in res["datasheet"].items()) or "none"
    price = res["usd_per_gpu_hour"]
    lines = [
        f"# Engine benchmark on {res['device_name']}", "",
        f"- Device: **{res['device_name']}** (`{res['device']}`), dtype {res['dtype']}, attention sdpa; datasheet "
        f"({res['datasheet_card']}) dense TFLOP/s: {sheet}",
        f"- Model: random-weight {res['model']} — {res['n_layers']} layers, hidden {res['hidden']}, "
        f"{res['non_embedding_params'] / 1e9:.3f} B non-embedding parameters",
        f"- Engine: `EmbeddingEngine`, max_batch_tokens {res['max_batch_tokens']}, one call per workload; packed: "
        f"pack_above_padding 0; FP8: torchao {res['versions']['torchao']} Float8DynamicActivationFloat8WeightConfig "
        f"({res['fp8_skipped'] or 'per-row and per-tensor scales'}); baselines: {res['st_label']}, "
        f"batch_size {BASELINE_BATCH}",
        "- LoRA rows: the bare base and two random adapters (rank 8 on every linear layer, as SFR's) unmerged "
        "in one engine, texts taking the three in turn; a merged model costs what ours does; their MFU counts "
        "the base's FLOPs only (rank-8 products add ~0.3% on SFR)",
        "- Workloads (random ids, <s> … </s>): " + "; ".join(f"{k}: {v}" for k, v in res["workloads"].items()),
        "- Measured matmul peaks: " + ", ".join(f"**{k} {v:.1f} TFLOP/s**" for k, v in res["peaks"].items())
        + f" ({res['matmul']}, timed with {res['matmul_timer']})",
        f"- FLOPs: {FLOP_FORMULA}",
        f"- Cost: ${price:g} per GPU-hour (--usd-per-gpu-hour) ÷ tokens/s; the seed quotes "
        f"${SEED_USD_PER_M_TOKENS} per 1M tokens, i.e. {price / 3600 / SEED_USD_PER_M_TOKENS * 1e6:,.0f} tokens/s "
        "at this price",
        "- Times are wall clock around the whole call (synchronised), after a warm-up pass; "
        "sentence-transformers' time includes parsing the id strings (its stand-in for tokenizing).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), "",
        "## Targets", "", "| target | need | measured | verdict |", "|---|---:|---:|---|",
        *(f"| {t['target']} | ≥ {t['need']} | {t['shown']} | {t['verdict']} |" for t in res.get("targets", [])), "",
        "## Throughput", "",
        "| workload | method | texts | real tokens | s | tokens/s | texts/s | model TFLOP/s | MFU vs measured peak "
        "| MFU vs datasheet | padding | peak mem GiB | $ per 1M tokens | ours ÷ this | min cos vs ours |",
        "|---|---|" + "---:|" * 13,
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['texts']} | {r['real_tokens']} | {r['seconds']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {r['texts_per_s']:,.1f} | {r['model_tflops']:.3g} "
            f"| {fmt(r['mfu_measured_peak'], '.1%')} | {fmt(r['mfu_datasheet'], '.1%')} | {r['padding_ratio']:.1%} "
            f"| {fmt(r['peak_mem_gib'], '.2f')} | {r['usd_per_m_tokens']:.4f} | {fmt(r['ours_over_this'], '.2f')}× "
            f"| {fmt(r['min_cosine_vs_ours'], '.5f')} |")
    if res.get("passes"):
        names = [k for k in res["passes"][0] if k.endswith(" ms")]
        lines += ["", "## One forward pass (rows of 512-token docs; median, host work included)", "",
                  "| padded tokens | rows | " + " | ".join(f"{n} | {n[:-3]} tokens/s" for n in names) + " |",
                  "|---:|---:|" + "---:|---:|" * len(names)]
        for p in res["passes"]:
            cells = " | ".join(f"{p[n]:.1f} | {p['padded_tokens'] / p[n] * 1000:,.0f}" for n in names)
            lines.append(f"| {p['padded_tokens']} | {p['rows']} | {cells} |")
    check = res["correctness"]
    lines += ["", f"## Correctness: {'PASS' if check['passed'] else 'FAIL'}", "",
              f"Engine vs fp32 per-text reference on a random Mistral (4 layers, hidden 512), {check['texts']} "
              f"texts of {check['lengths'][0]}–{check['lengths'][1]} tokens sharing 4096-token passes; threshold "
              f"{check['threshold']}; control, |cosine| between different texts: "
              f"{check['control_mean_cosine_between_texts']:.3f}.", "",
              "| variant | min cosine | mean cosine | padding | verdict |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {v['min_cosine']:.6f} | {v['mean_cosine']:.6f} | {v['padding_ratio']:.1%} "
              f"| {'PASS' if v['passed'] else 'FAIL'} |" for name, v in check["variants"].items()]
    lines += [f"\n**Failed:** {error}" for error in res["errors"]]
    lines += ["", f"Total run time {res.get('total_s', float('nan')):.1f} s (model init {res['init_s']:.1f} s)."]
    return "\n".join(lines) + "\n"


def write_results(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_engine.json").write_text(json.dumps({**res, "flop_formula": FLOP_FORMULA}, indent=2) + "\n")
    (out_dir / "gpu_engine.md").write_text(markdown(res))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model and workloads (CPU check)")
    parser.add_argument("--quick", action="store_true", help="half-size workloads")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="engine token budget")
    parser.add_argument("--pass-sizes", help="single-pass sizes (default 512…16384; --small 128…1024)")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=2.5)
    parser.add_argument("--no-baselines", action="store_true", help="only our engine")
    parser.add_argument("--no-lora", action="store_true", help="no LoRA rows (several adapters over one base)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "python": platform.python_version()}
    for package in ("transformers", "sentence-transformers", "torchao"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    dtype = pick_dtype("auto", device)  # the engine's rule: bf16 on CUDA, fp32 on CPU
    dtype_name = str(dtype).replace("torch.", "")
    out_dir = Path(args.out)
    name = torch.cuda.get_device_name(device) if on_cuda else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    card, sheet = datasheet_for(name) if on_cuda else ("not applicable on CPU", {})
    fp8_skipped = fp8_skip_reason(device)
    print(f"device: {name} (datasheet: {card} {sheet}); dtype {dtype}; out: {out_dir}", flush=True)
    if fp8_skipped:
        print(f"FP8 rows skipped: {fp8_skipped}", flush=True)

    print("correctness check ...", flush=True)
    check = correctness_check(device, args.seed, fp8=not fp8_skipped, lora=not args.no_lora)
    for variant, v in check["variants"].items():
        print(f"  {variant:14s} min cosine {v['min_cosine']:.6f} -> {'PASS' if v['passed'] else 'FAIL'}", flush=True)

    matmul_n, iters = (8192, 50) if on_cuda else (1024, 5)
    peaks = {"bf16": measure_matmul_peak(device, dtype, matmul_n, iters)}
    if not fp8_skipped:
        peaks["fp8"] = measure_matmul_peak(device, dtype, matmul_n, iters, fp8=True)
    print("matmul peaks " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()) + f" ({matmul_n}³)")

    config = mistral_config("small" if args.small else "sfr")
    t_init = time.perf_counter()
    models = {"bf16": build_random_model(config, device, dtype, args.seed)}
    if not fp8_skipped:  # the same random model (same seed), its linear layers quantized by torchao
        for granularity in ("row", "tensor"):
            models[f"fp8 per-{granularity}"] = quantize_fp8(build_random_model(config, device, torch.bfloat16,
                                                                               args.seed), granularity)
    if not args.no_lora:  # its own copy of the base: PEFT wraps the layers of the model it is given
        models["lora bf16"] = add_random_adapters(build_random_model(config, device, dtype, args.seed), 2, 8,
                                                  args.seed + 1)
        if not fp8_skipped:  # the adapters first, then FP8 for the base's layers (LoRA's stay bf16)
            models["lora fp8 per-row"] = quantize_fp8(add_random_adapters(
                build_random_model(config, device, torch.bfloat16, args.seed), 2, 8, args.seed + 1))
    synchronize(device)
    init_s = time.perf_counter() - t_init
    print(f"models built in {init_s:.1f} s: {', '.join(models)}", flush=True)

    methods, timed_engines = build_methods(models, device, args.max_batch_tokens, baselines=not args.no_baselines)
    scale = "small" if args.small else "quick" if args.quick else "full"
    # Sized so each workload takes a few seconds per method on an H100 (~40 k tok/s); CPU attention over
    # 32×2048 padded rows is slow, so --small stops at 1024 tokens (it checks the script only).
    counts = {"full": (256, 384, 4096), "quick": (128, 192, 2048), "small": (16, 32, 256)}[scale]
    longest = 1024 if args.small else 2048
    workloads = make_workloads(np.random.default_rng(args.seed), config.vocab_size, counts, longest)
    embedding = models["bf16"].get_input_embeddings().weight.numel()
    res = {
        "device": device, "device_name": name, "dtype": dtype_name,
        "n_layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "non_embedding_params": sum(p.numel() for p in models["bf16"].parameters()) - embedding,
        "peaks": peaks, "datasheet": sheet, "datasheet_card": card, "usd_per_gpu_hour": args.usd_per_gpu_hour,
        "model": "tiny Mistral (--small)" if args.small else "SFR-Embedding-Mistral architecture",
        "scale": scale, "max_batch_tokens": args.max_batch_tokens, "fp8_skipped": fp8_skipped,
        "st_label": next((m.name for m in methods if m.name.startswith("sentence-transformers")),
                         "none (--no-baselines)"),
        "matmul": f"{matmul_n}³ torch.matmul in {dtype_name}" + ("" if fp8_skipped else ", torch._scaled_mm in e4m3"),
        "matmul_timer": "CUDA events" if on_cuda else "perf_counter, best of 5",
        "versions": versions(), "correctness": check, "init_s": init_s, "errors": [], "rows": [],
        "workloads": {w: f"{len(s)} texts, {min(map(len, s))}–{max(map(len, s))} tokens, {sum(map(len, s))} in all"
                      for w, s in workloads.items()},
    }
    print("warm-up, then benchmark:", flush=True)
    benchmark(res, methods, workloads, out_dir)
    res["targets"] = targets(res["rows"])
    print("single passes:", flush=True)
    sizes = args.pass_sizes or ("128,256,512,1024" if args.small else "512,1024,2048,4096,8192,16384")
    res["passes"] = pass_timings(timed_engines, [int(n) for n in sizes.split(",")], config.vocab_size, device,
                                 reps=3 if args.small else 5)
    res["total_s"] = time.perf_counter() - t0
    write_results(res, out_dir)
    print("\n" + markdown(res))
    print(f"wrote {out_dir / 'gpu_engine.md'} and {out_dir / 'gpu_engine.json'}")
    if not check["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
