"""GPU benchmark of the engine (`serve_app.engine.embedder.EmbeddingEngine`) on the
SFR-Embedding-Mistral architecture, random weights and random token ids, in one run that cannot
lose its figures: each variant runs under its own try/except, most important first, and the
results are written after each one.

No Ray, no tokenizer, no downloads (the device machine has none of them; torchao and pydantic come
as wheels: bench/run_gpu_device.sh). Speed does not depend on the weight values, so the 7 B model
is built on `meta`, materialised on the GPU and filled with small random normals. Variants:

 1. matmul peak: 8192³ bf16 `torch.matmul` (and e4m3 `torch._scaled_mm`), CUDA events;
 2. docs (512 tokens), bf16: eager with an attention mask (the engine before mask-free passes),
    eager mask-free, compiled (its warm-up, i.e. compile start-up, timed);
 3. FP8 (torchao) compiled, per-row and per-tensor scales, on docs, vs compiled bf16 (lowest cosine);
 4. a mixed corpus (log-uniform 16-4096 tokens) vs the docs' rate, eager and compiled;
 5. one query pass (1 × 32 tokens): latency eager, compiled, compiled with CUDA graphs;
 6. packed vs sorted padded passes on the mixed corpus;
 7. correctness on a smaller random Mistral: bf16 compiled vs an fp32 per-text reference (cosine
    >= 0.999), FP8 vs bf16 lowest cosine, a padded row vs the row alone in bf16;
 8. later, if time is left: single passes of 512-16384 padded tokens, LoRA adapters (mixed
    passes vs a pass per adapter), sentence-transformers `encode`.
Every throughput row gives tokens/s, % of the measured matmul peak and $ per 1M tokens.

  bash bench/run_gpu_device.sh                               # the device run (H200), < 8 min
  python bench/gpu_engine.py --small --device cpu --out /tmp/x  # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import timeit
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
LORA_MODELS = {"base": BASE, "a": "adapter_0", "b": "adapter_1"}  # a shared base's models in the LoRA rows
QUERY_TOKENS = 32
FLOP_FORMULA = (
    "model FLOPs of a text of L real tokens = 2·N·L + 2·n_layers·d·L², "
    "N = non-embedding parameters, d = hidden size; the attention term is "
    "4·n_layers·L·d per token (QKᵀ and AV), halved because the kernel is causal. "
    "Padding is not counted: MFU is useful work / time / peak."
)
# (hidden, intermediate, layers, heads, KV heads): SFR-Embedding-Mistral's config.json; --small, to check the
# script on a CPU; the correctness check's: small enough for an fp32 per-text reference, same 4:1 GQA ratio.
SIZES = {"sfr": (4096, 14336, 32, 32, 8), "small": (256, 512, 2, 4, 2), "check": (512, 1792, 4, 8, 2)}


def make_engine(model, device: str, max_batch_tokens: int, packed: bool = False, lora: bool = False,
                cpu_threads: int | None = None, compile: bool = False, cuda_graphs: bool | None = None,
                max_width: int = 4096) -> EmbeddingEngine:
    """Our engine around an in-memory model (SFR's pooling: last token, L2-normalized), with sorted
    padded passes or, `packed`, padding-free ones (pack_above_padding 0); `lora`: a PeftModel of
    LORA_MODELS' adapters; `compile`: the compiled forward (compiled.py; it compiles `model`'s
    layers in place: give eager engines a model of their own)."""
    return EmbeddingEngine(model, device, "last_token", True, max_batch_tokens, cpu_threads,
                           pack_above_padding=0.0 if packed else 1.0, adapters=LORA_MODELS if lora else None,
                           compile=compile, max_width=max_width, cuda_graphs=cuda_graphs)


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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


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


def datasheet_for(name: str) -> tuple[str, dict]:
    for card, bf16, fp8 in DATASHEETS:
        if card.lower() in name.lower():
            return card, {"bf16": bf16, **({"fp8": fp8} if fp8 else {})}
    return "not in the table", {}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "python": platform.python_version()}
    for package in ("transformers", "peft", "sentence-transformers", "torchao"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found



# ---- the run: shared state, rows, results written after every variant -------------------------

@dataclass
class Run:
    args: argparse.Namespace
    device: str
    dtype: torch.dtype
    out_dir: Path
    res: dict
    config: object = None
    workloads: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)
    vectors: dict = field(default_factory=dict)  # (variant, workload) -> vectors, for cosines

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def label(self) -> str:
        """The run's dtype in row names: bf16 on a GPU, fp32 on a CPU check."""
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def fp8(self) -> bool:
        return not self.res["fp8_skipped"]


def timed_call(run: Run, fn: Callable[[], Embedded]) -> tuple[Embedded, float, float | None]:
    """One call, its wall time (GPU work included: synchronised before and after), peak GiB."""
    reset_memory(run.device)
    synchronize(run.device)
    start = time.perf_counter()
    done = fn()
    synchronize(run.device)
    seconds = time.perf_counter() - start
    return done, seconds, torch.cuda.max_memory_allocated() / 2**30 if run.on_cuda else None


def add_row(run: Run, workload: str, method: str, seqs, done: Embedded, seconds: float, peak=None,
            precision: str = "bf16", **extra) -> dict:
    """A throughput row: tokens/s, MFU against the measured peak and the datasheet, $ per 1M tokens."""
    res = run.res
    lengths = np.array([len(s) for s in seqs], dtype=np.float64)
    attention = 2.0 * res["n_layers"] * res["hidden"] * (lengths**2).sum()  # causal half of 4·l·L·d
    flops = 2.0 * res["non_embedding_params"] * lengths.sum() + attention
    achieved, tokens_per_s = flops / seconds / 1e12, done.real_tokens / seconds
    measured, sheet = res["peaks"].get(precision), res["datasheet"].get(precision)
    row = {"workload": workload, "method": method, "texts": len(seqs), "real_tokens": done.real_tokens,
           "padded_tokens": done.padded_tokens, "seconds": seconds, "tokens_per_s": tokens_per_s,
           "model_tflops": achieved, "mfu_measured_peak": achieved / measured if measured else None,
           "mfu_datasheet": achieved / sheet if sheet else None,
           "padding_ratio": 1 - done.real_tokens / done.padded_tokens, "peak_mem_gib": peak,
           "usd_per_m_tokens": res["usd_per_gpu_hour"] / 3600 / tokens_per_s * 1e6, **extra}
    res["rows"].append(row)
    print(f"  {workload:8s} {method[:52]:52s} {seconds:7.2f} s {tokens_per_s:10,.0f} tok/s "
          f"{fmt(row['mfu_measured_peak'], '8.1%')} of peak  ${row['usd_per_m_tokens']:.4f}/1M", flush=True)
    return row


def throughput(run: Run, workload: str, method: str, engine: EmbeddingEngine, precision: str = "bf16",
               key: str | None = None, **extra) -> dict:
    """`engine` over a workload after a warm-up call on a sample of it; vectors kept under `key`."""
    seqs = run.workloads[workload]
    engine.embed(seqs[: max(2, len(seqs) // 16)])
    done, seconds, peak = timed_call(run, lambda: engine.embed_counted(seqs))
    if key:
        run.vectors[(key, workload)] = done.vectors
    return add_row(run, workload, method, seqs, done, seconds, peak, precision, **extra)


def warmed(run: Run, name: str, make: Callable[[], EmbeddingEngine]) -> EmbeddingEngine:
    """An engine, built and warmed up as a replica is before it is ready; the seconds recorded
    (for a compiled engine: the compile start-up cost)."""
    synchronize(run.device)
    start = time.perf_counter()
    engine = make()
    engine.warm_up()
    synchronize(run.device)
    run.res["warm_up_s"][name] = time.perf_counter() - start
    print(f"  warm-up {name}: {run.res['warm_up_s'][name]:.1f} s", flush=True)
    run.engines[name] = engine
    return engine


def budget(run: Run) -> int:
    return run.args.max_batch_tokens


def v_matmul_peak(run: Run) -> None:
    n, iters = (8192, 50) if run.on_cuda else (1024, 5)
    run.res["matmul"] = f"{n}³ torch.matmul in {run.res['dtype']}" + ("" if not run.fp8 else
                                                                      ", torch._scaled_mm in e4m3")
    run.res["peaks"]["bf16"] = measure_matmul_peak(run.device, run.dtype, n, iters)
    if run.fp8:
        run.res["peaks"]["fp8"] = measure_matmul_peak(run.device, run.dtype, n, iters, fp8=True)
    print("  matmul peaks " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in run.res["peaks"].items()), flush=True)


def sfr_model(run: Run, dtype: torch.dtype | None = None):
    return build_random_model(run.config, run.device, dtype or run.dtype, run.args.seed)


def v_docs_bf16(run: Run) -> None:
    """Eager with a mask (today's baseline), eager mask-free, compiled: the same weights."""
    run.models["eager"] = sfr_model(run)
    masked = make_engine(run.models["eager"], run.device, budget(run))
    masked.causal = False  # what the engine did before mask-free passes: every pass sends its mask
    throughput(run, "docs", f"{run.label} eager, attention mask (baseline)", masked, key="masked")
    eager = run.engines["eager"] = make_engine(run.models["eager"], run.device, budget(run))
    throughput(run, "docs", f"{run.label} eager, mask-free", eager, key="eager")
    run.models["compiled"] = sfr_model(run)
    compiled = run.engines["compiled"] = warmed(run, f"{run.label} compiled", lambda: make_engine(
        run.models["compiled"], run.device, budget(run), compile=True))
    throughput(run, "docs", f"{run.label} compiled, mask-free", compiled, key="compiled",
               warm_up_s=run.res["warm_up_s"][f"{run.label} compiled"])
    for key in ("eager", "compiled"):
        run.res["cosines"][f"docs: {run.label} {key} vs eager with mask, lowest"] = float(
            cosine_rows(run.vectors[(key, "docs")], run.vectors[("masked", "docs")]).min())


def v_fp8(run: Run) -> None:
    if not run.fp8:
        print(f"  skipped: {run.res['fp8_skipped']}", flush=True)
        return
    for granularity in ("row", "tensor"):
        name = f"fp8 per-{granularity} compiled"
        try:
            model = quantize_fp8(sfr_model(run, torch.bfloat16), granularity)
            engine = warmed(run, name, lambda: make_engine(model, run.device, budget(run), compile=True))
            run.engines.pop(name)
            throughput(run, "docs", name, engine, "fp8", key=name, warm_up_s=run.res["warm_up_s"][name])
            if ("compiled", "docs") in run.vectors:
                run.res["cosines"][f"docs: {name} vs bf16 compiled, lowest"] = float(
                    cosine_rows(run.vectors[(name, "docs")], run.vectors[("compiled", "docs")]).min())
        finally:  # its memory back before the next one
            run.engines.pop(name, None)
            model = engine = None
            reset_memory(run.device)


def v_mixed(run: Run) -> None:
    for name in ("eager", "compiled"):
        if name in run.engines:
            method = f"{run.label} {name}, mask-free"
            docs = next((r for r in run.res["rows"] if r["workload"] == "docs" and r["method"] == method), None)
            row = throughput(run, "mixed", method, run.engines[name], key=name)
            row["vs_docs_rate"] = row["tokens_per_s"] / docs["tokens_per_s"] if docs else None


def v_query_latency(run: Run) -> None:
    """One query pass of 1 × 32 tokens: median latency over many calls, host work included."""
    seq = random_text(np.random.default_rng(11), QUERY_TOKENS, run.config.vocab_size)
    engines = {"eager": run.engines.get("eager"), "compiled, CUDA graphs" if run.on_cuda else "compiled":
               run.engines.get("compiled")}
    if run.on_cuda and "compiled" in run.engines:  # the same compiled layer without CUDA graphs
        engines["compiled, no CUDA graphs"] = warmed(run, "compiled, no CUDA graphs", lambda: make_engine(
            run.models["compiled"], run.device, budget(run), compile=True, cuda_graphs=False))
    reps = 20 if run.args.small else 100
    for name, engine in engines.items():
        if engine is None:
            continue
        times = []
        for _ in range(reps + 5):  # the first 5: warm-up
            synchronize(run.device)
            start = time.perf_counter()
            engine.embed([seq])
            synchronize(run.device)
            times.append(time.perf_counter() - start)
        ms = float(np.median(times[5:]) * 1000)
        run.res["query_latency"].append({"method": f"{run.label} {name}", "rows": 1, "tokens": QUERY_TOKENS,
                                         "median_ms": ms, "p90_ms": float(np.percentile(times[5:], 90) * 1000)})
        print(f"  query 1×{QUERY_TOKENS} {run.label} {name}: {ms:.2f} ms median", flush=True)


def v_packed(run: Run) -> None:
    """Packed vs sorted padded passes on the mixed corpus, eager bf16 (the same weights)."""
    packed = make_engine(run.models["eager"], run.device, budget(run), packed=True)
    throughput(run, "mixed", f"{run.label} eager, packed passes", packed, key="packed")
    if ("eager", "mixed") not in run.vectors:
        throughput(run, "mixed", f"{run.label} eager, mask-free", run.engines["eager"], key="eager")
    run.res["cosines"]["mixed: packed vs sorted padded, lowest"] = float(
        cosine_rows(run.vectors[("packed", "mixed")], run.vectors.get(("eager", "mixed"))).min())


@torch.inference_mode()
def v_correctness(run: Run) -> None:
    """On a smaller random Mistral: bf16 compiled vs fp32 one text at a time (>= 0.999), a padded
    row vs itself alone (bf16), FP8 compiled vs bf16 compiled."""
    config, seed, device = mistral_config("check"), run.args.seed, run.device
    reference = build_random_model(config, device, torch.float32, seed)

    def same_weights(quantize: str | None = None):
        model = build_random_model(config, device, torch.bfloat16, seed)
        model.load_state_dict(reference.state_dict())  # the reference's weights, rounded to bf16
        return quantize_fp8(model, quantize) if quantize else model

    rng = np.random.default_rng(seed + 1)
    n_texts, longest = (12, 256) if run.args.small else (48, 1024)  # bf16 on a CPU is slow: --small stays small
    seqs = [random_text(rng, n, config.vocab_size) for n in log_uniform_lengths(rng, n_texts, 4, longest)]
    ref = reference_vectors([reference] * len(seqs), seqs, device)
    check = run.res["correctness"]
    check.update({"texts": len(seqs), "lengths": [min(map(len, seqs)), max(map(len, seqs))], "threshold": 0.999,
                  "control_mean_cosine_between_texts": float(np.abs(cosine_rows(ref, np.roll(ref, 1, 0))).mean())})

    def record(name: str, vectors: np.ndarray, expected: np.ndarray, threshold: float | None = 0.999) -> None:
        cos = cosine_rows(vectors, expected)
        check["variants"][name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                                   "threshold": threshold,
                                   "passed": None if threshold is None else bool(cos.min() >= threshold)}
        print(f"  {name}: lowest cosine {cos.min():.6f}", flush=True)
        write_results(run)

    compiled = make_engine(same_weights(), device, 4096, compile=True, max_width=1024)
    compiled.warm_up()
    bf16 = compiled.embed(seqs)
    record("bf16 compiled vs fp32 per text", bf16, ref)
    eager = make_engine(same_weights(), device, 4096, max_width=1024)
    alone = np.stack([eager.embed([s])[0] for s in seqs])
    record("bf16 eager: padded beside longer rows vs alone", eager.embed(seqs), alone)
    for granularity in ("row", "tensor") if run.fp8 else ():
        fp8 = make_engine(same_weights(granularity), device, 4096, compile=True, max_width=1024)
        fp8.warm_up()
        vectors = fp8.embed(seqs)
        record(f"fp8 per-{granularity} compiled vs bf16 compiled", vectors, bf16, threshold=None)
        record(f"fp8 per-{granularity} compiled vs fp32 per text", vectors, ref, threshold=None)
    check["passed"] = all(v["passed"] is not False for v in check["variants"].values())


def v_passes(run: Run) -> None:
    """Median wall time of one pass of N padded tokens (rows of 512-token docs), host work included:
    what a query waits behind one running pass."""
    sizes = [int(n) for n in (run.args.pass_sizes or ("128,256,512,1024" if run.args.small
                                                      else "512,2048,8192,16384")).split(",")]
    rng = np.random.default_rng(7)
    for size in sizes:
        width = min(512, size)
        seqs = [random_text(rng, width, run.config.vocab_size) for _ in range(size // width)]
        row = {"padded_tokens": size, "rows": len(seqs), "width": width}
        for name in ("eager", "compiled"):
            engine = run.engines.get(name)
            if engine is None:
                continue
            saved, engine.pass_tokens = engine.pass_tokens, dict.fromkeys(engine.pass_tokens, size)
            times = []
            for _ in range(4):  # the first: this shape's warm-up
                synchronize(run.device)
                start = time.perf_counter()
                engine.embed(seqs)
                synchronize(run.device)
                times.append(time.perf_counter() - start)
            engine.pass_tokens = saved
            row[f"{run.label} {name} ms"] = float(np.median(times[1:]) * 1000)
        run.res["passes"].append(row)
        print("  pass " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)


def v_lora(run: Run) -> None:
    """Two random rank-8 adapters and the bare base unmerged in one engine, on the mixed corpus:
    passes mixing adapters vs a pass per adapter (MIX_ADAPTERS_IN_PASSES)."""
    if run.args.no_lora:
        return
    for name in ("eager", "compiled"):  # their memory: the LoRA copy needs room
        run.engines.pop(name, None)
        run.models.pop(name, None)
    reset_memory(run.device)
    model = add_random_adapters(sfr_model(run), 2, 8, run.args.seed + 1)
    engine = make_engine(model, run.device, budget(run), lora=True)
    seqs = run.workloads["mixed"]
    for mix in (True, False):
        run_lora(engine, seqs[:8], mix)
        done, seconds, peak = timed_call(run, lambda: run_lora(engine, seqs, mix))
        add_row(run, "mixed", f"LoRA: 2 adapters + base, {'mixed passes' if mix else 'a pass per adapter'}",
                seqs, done, seconds, peak)


def v_sentence_transformers(run: Run) -> None:
    if run.args.no_baselines:
        return
    model = sfr_model(run)
    method = make_st_method(model, run.device)
    if method is None:
        return
    inputs = method.prepare(run.workloads["mixed"])
    method.run(inputs[:8])
    done, seconds, peak = timed_call(run, lambda: method.run(inputs))
    add_row(run, "mixed", method.name, run.workloads["mixed"], done, seconds, peak)


VARIANTS = [
    ("matmul peak", v_matmul_peak),
    ("docs bf16: eager with mask, mask-free, compiled", v_docs_bf16),
    ("docs fp8 compiled: per-row, per-tensor", v_fp8),
    ("mixed corpus vs docs", v_mixed),
    ("query pass latency", v_query_latency),
    ("packed vs sorted padded (mixed)", v_packed),
    ("correctness", v_correctness),
    ("single passes", v_passes),
    ("LoRA adapters", v_lora),
    ("sentence-transformers", v_sentence_transformers),
]


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(res: dict) -> str:
    sheet = ", ".join(f"{k} {v:.0f}" for k, v in res["datasheet"].items()) or "none"
    price = res["usd_per_gpu_hour"]
    lines = [
        f"# Engine benchmark on {res['device_name']}", "",
        f"- Device: **{res['device_name']}** (`{res['device']}`), dtype {res['dtype']}, attention sdpa; datasheet "
        f"({res['datasheet_card']}) dense TFLOP/s: {sheet}",
        f"- Model: random-weight {res['model']}: {res['n_layers']} layers, hidden {res['hidden']}, "
        f"{res['non_embedding_params'] / 1e9:.3f} B non-embedding parameters",
        f"- Engine: `EmbeddingEngine`, max_batch_tokens {res['max_batch_tokens']}; FP8: torchao "
        f"{res['versions'].get('torchao')} ({res['fp8_skipped'] or 'per-row and per-tensor scales'})",
        "- Workloads (random ids, <s> … </s>): " + "; ".join(f"{k}: {v}" for k, v in res["workloads"].items()),
        "- Measured matmul peaks: " + (", ".join(f"**{k} {v:.1f} TFLOP/s**" for k, v in res["peaks"].items())
                                       or "n/a") + f" ({res.get('matmul', 'n/a')})",
        f"- FLOPs: {FLOP_FORMULA}",
        f"- Cost: ${price:g} per GPU-hour ÷ tokens/s; the seed quotes ${SEED_USD_PER_M_TOKENS} per 1M tokens, "
        f"i.e. {price / 3600 / SEED_USD_PER_M_TOKENS * 1e6:,.0f} tokens/s at this price",
        "- Times: wall clock around the whole call (synchronised), after a warm-up call; warm-up (start-up, "
        "compiles included): " + (", ".join(f"{k} {v:.1f} s" for k, v in res["warm_up_s"].items()) or "n/a"),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), "",
        "## Throughput", "",
        "| workload | method | texts | real tokens | s | tokens/s | % of measured peak | % of datasheet | padding "
        "| peak mem GiB | $ per 1M tokens | ÷ docs rate |", "|---|---|" + "---:|" * 10,
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['texts']} | {r['real_tokens']} | {r['seconds']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {fmt(r['mfu_measured_peak'], '.1%')} | {fmt(r['mfu_datasheet'], '.1%')} "
            f"| {r['padding_ratio']:.1%} | {fmt(r['peak_mem_gib'], '.2f')} | {r['usd_per_m_tokens']:.4f} "
            f"| {fmt(r.get('vs_docs_rate'), '.2f')} |")
    if res["query_latency"]:
        lines += ["", f"## One query pass (1 × {QUERY_TOKENS} tokens)", "", "| method | median ms | p90 ms |",
                  "|---|---:|---:|"]
        lines += [f"| {q['method']} | {q['median_ms']:.2f} | {q['p90_ms']:.2f} |" for q in res["query_latency"]]
    if res["cosines"]:
        lines += ["", "## Cosines between variants", "", "| pair | cosine |", "|---|---:|"]
        lines += [f"| {k} | {v:.6f} |" for k, v in res["cosines"].items()]
    if res["passes"]:
        names = [k for k in res["passes"][0] if k.endswith(" ms")]
        lines += ["", "## One forward pass (rows of 512-token docs; median, host work included)", "",
                  "| padded tokens | rows | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
        lines += [f"| {p['padded_tokens']} | {p['rows']} | " + " | ".join(fmt(p.get(n), '.1f') for n in names) + " |"
                  for p in res["passes"]]
    check = res["correctness"]
    if check.get("variants"):
        lines += ["", f"## Correctness: {'PASS' if check.get('passed') else 'FAIL or incomplete'}", "",
                  f"A random Mistral (4 layers, hidden 512), {check['texts']} texts of {check['lengths'][0]}–"
                  f"{check['lengths'][1]} tokens sharing 4096-token passes; control, |cosine| between different "
                  f"texts: {check['control_mean_cosine_between_texts']:.3f}.", "",
                  "| variant | lowest cosine | mean cosine | needs | verdict |", "|---|---:|---:|---:|---|"]
        lines += [f"| {name} | {v['min_cosine']:.6f} | {v['mean_cosine']:.6f} | {fmt(v['threshold'], 'g')} "
                  f"| {'n/a' if v['passed'] is None else 'PASS' if v['passed'] else 'FAIL'} |"
                  for name, v in check["variants"].items()]
    lines += ["", "## Variants", "", "| variant | s | outcome |", "|---|---:|---|"]
    lines += [f"| {v['name']} | {v['seconds']:.1f} | {v['outcome']} |" for v in res["variants"]]
    lines += [f"\n**Failed:** {error}" for error in res["errors"]]
    lines += ["", f"Total run time {res.get('total_s', float('nan')):.1f} s."]
    return "\n".join(lines) + "\n"


def write_results(run: Run) -> None:
    run.out_dir.mkdir(parents=True, exist_ok=True)
    (run.out_dir / "gpu_engine.json").write_text(json.dumps({**run.res, "flop_formula": FLOP_FORMULA}, indent=2,
                                                            default=str) + "\n")
    (run.out_dir / "gpu_engine.md").write_text(markdown(run.res))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model and workloads (CPU check)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench" / "results" / "gpu"))
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="engine token budget")
    parser.add_argument("--pass-sizes", help="single-pass sizes (default 512…16384; --small 128…1024)")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=2.5)
    parser.add_argument("--only", help="comma-separated variant numbers (1-based) to run")
    parser.add_argument("--no-baselines", action="store_true", help="no sentence-transformers row")
    parser.add_argument("--no-lora", action="store_true", help="no LoRA rows (several adapters over one base)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype("auto", device)  # the engine's rule: bf16 on CUDA, fp32 on CPU
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    card, sheet = datasheet_for(name) if device.startswith("cuda") else ("not applicable on CPU", {})
    config = mistral_config("small" if args.small else "sfr")
    # Sized so each throughput row takes a few seconds on an H100/H200 (~40k tokens/s).
    counts, longest = ((16, 24, 8), 1024) if args.small else ((256, 192, 8), 4096)
    workloads = make_workloads(np.random.default_rng(args.seed), config.vocab_size, counts, longest)
    workloads.pop("queries")  # a query is one 1 × 32 pass, timed on its own
    hidden, _, layers, _, _ = SIZES["small" if args.small else "sfr"]
    res = {
        "device": device, "device_name": name, "dtype": str(dtype).replace("torch.", ""),
        "n_layers": layers, "hidden": hidden, "non_embedding_params": non_embedding_params(config),
        "peaks": {}, "datasheet": sheet, "datasheet_card": card, "usd_per_gpu_hour": args.usd_per_gpu_hour,
        "model": "tiny Mistral (--small)" if args.small else "SFR-Embedding-Mistral architecture",
        "max_batch_tokens": args.max_batch_tokens, "fp8_skipped": fp8_skip_reason(device),
        "versions": versions(), "errors": [], "rows": [],
        "warm_up_s": {}, "query_latency": [], "cosines": {}, "passes": [], "variants": [],
        "correctness": {"variants": {}},
        "workloads": {w: f"{len(s)} texts, {min(map(len, s))}–{max(map(len, s))} tokens, {sum(map(len, s))} in all"
                      for w, s in workloads.items()},
    }
    run = Run(args, device, dtype, Path(args.out), res, config, workloads)
    print(f"device: {name} (datasheet: {card} {sheet}); dtype {dtype}; out: {run.out_dir}", flush=True)
    if res["fp8_skipped"]:
        print(f"FP8 rows skipped: {res['fp8_skipped']}", flush=True)
    only = {int(k) for k in args.only.split(",")} if args.only else None
    for number, (variant, fn) in enumerate(VARIANTS, start=1):
        if only and number not in only:
            continue
        print(f"[{number}] {variant}", flush=True)
        start, outcome = time.perf_counter(), "ok"
        try:
            fn(run)
        except Exception as exc:  # noqa: BLE001  (one variant's failure must not cost the others' figures)
            traceback.print_exc()
            outcome = f"FAILED {exc!r}"[:300]
            res["errors"].append(f"{variant}: {exc!r}")
            reset_memory(device)
        res["variants"].append({"name": variant, "seconds": time.perf_counter() - start, "outcome": outcome})
        res["total_s"] = time.perf_counter() - t0
        write_results(run)
    print("\n" + markdown(res))
    print(f"wrote {run.out_dir / 'gpu_engine.md'} and {run.out_dir / 'gpu_engine.json'}")
    if res["correctness"].get("passed") is False:
        sys.exit(1)


def non_embedding_params(config) -> int:
    """Parameters of the model less its token embeddings, counted on `meta` (nothing allocated)."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


if __name__ == "__main__":
    main()
