"""What one served model is: the typed contract shared by the configs, the engine and the graph."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Pooling = Literal["last_token", "mean", "cls"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "fp8"]
MAX_BATCHES_IN_FLIGHT = 64


class Tuning(BaseModel):
    """Expert settings of an Embedder deployment (`tuning:` in a model entry): how its batches
    are cut into forward passes, scheduled and waited for. They change speed, never the vectors;
    models that share a base set them alike. Every default is the value measured best (or the
    only one measured) by the benchmark its description names or points to (docs/decisions.md):
    change one only to re-measure, with that benchmark, on your hardware and traffic. A dial at the top level of a model entry
    is an error that says where it moved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    micro_batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Padded tokens of one forward pass (a batch runs as several, sorted by length). "
        "Default per device: max_batch_tokens on a GPU; on CPU at most 1024, where smaller passes "
        "stay in cache (measured: docs/decisions.md#cpu-pass-size). Lower it on a GPU whose memory "
        "cannot hold the activations of max_batch_tokens at once.",
    )
    batch_pass_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Padded tokens of one forward pass of batch-class work (indexing) while "
        "interactive requests are about (one in the last 10 s; otherwise batch work takes the "
        "interactive pass size). A query that arrives while such a pass runs waits for it, so "
        "these stay small. Default per device: at most 512 on CPU (measured: "
        "docs/decisions.md#batch-pass-tokens), at most 4096 on a GPU (unmeasured: "
        "docs/performance.md#pending-a-gpu). Lower "
        "it if queries wait too long beside indexing; raise it if indexing throughput matters more.",
    )
    batch_share: float = Field(
        default=0.25,
        gt=0,
        lt=1,
        description="When interactive and batch passes both wait, the least share of passes that "
        "go to batch work (0.25: every fourth), so that indexing never starves. Raise it if "
        "indexing falls behind under steady query load (measured: `python -m bench.mixed_traffic`).",
    )
    batch_wait_timeout_s: float = Field(
        default=0.005,
        ge=0,
        description="How long a replica waits for a batch to fill. Longer waits make bigger, "
        "cheaper batches at the cost of latency when traffic is light (measured: "
        "docs/decisions.md#adaptive-batch-wait).",
    )
    busy_batch_wait_timeout_s: float = Field(
        default=0.02,
        ge=0,
        description="The wait used instead while forward passes kept the replica busy more than "
        "half of the last second: bigger batches cost less per text, and an idle replica keeps "
        "the short wait (measured: docs/decisions.md#adaptive-batch-wait). Lower it "
        "if latency under load matters more than throughput.",
    )
    cpu_threads: int | None = Field(
        default=None,
        gt=0,
        description="torch threads of an Embedder replica on CPU. Default: OMP_NUM_THREADS, "
        "which Ray sets from the replica's num_cpus; set it when the replica should use more "
        "cores than it reserves from Ray.",
    )
    cpu_lanes: int | None = Field(
        default=None,
        gt=0,
        description="On CPU, how many forward passes run side by side, each on "
        "cpu_threads/cpu_lanes threads. Default: cpu_threads (one thread per pass: measured "
        "best, docs/decisions.md#cpu-lanes). "
        "Ignored on a GPU, which runs one pass at a time.",
    )
    spread_small_batches: bool = Field(
        default=True,
        description="On CPU with several lanes, cut a batch smaller than one pass per lane into "
        "about one pass per lane of equal size (smaller passes, a little more CPU per text), "
        "so that the lanes finish it together (measured: docs/decisions.md#spread-small-batches). "
        "Ignored on a GPU.",
    )
    batches_in_flight: int | None = Field(
        default=None,
        gt=0,
        le=MAX_BATCHES_IN_FLIGHT,
        description="Batches an Embedder replica runs at once. Default per device: one per CPU "
        "lane (the lanes take the next batch's passes while a batch finishes; measured: "
        "docs/decisions.md#batches-in-flight), one on a GPU (its memory holds one "
        "batch's activations). Raise it on a GPU only if its memory holds several batches' activations.",
    )
    pack_above_padding: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Run a batch as packed passes (no padding: sequences share rows, position ids "
        "restart per sequence) when its sorted padded passes would waste more than this share "
        "of their tokens; 0: always pack, 1: never. Default per device: 1 (padded passes: packing "
        "lost on CPU, docs/decisions.md#packing; the GPU is unmeasured, "
        "docs/performance.md#pending-a-gpu). Only for models whose attention masks follow "
        "packed position ids (decoders such as Mistral).",
    )


# The dials that moved from a model entry's top level into `tuning`.
TUNING_FIELDS = tuple(Tuning.model_fields)


class ModelSpec(BaseModel):
    """One entry of the app's `models` list. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="What clients send as `model`.")
    source: str = Field(
        description="Hub id, local directory, or `package:<python_package>/<subdir>` "
        "for a model shipped inside an installed Python package."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    adapter: str | None = Field(
        default=None,
        description="PEFT LoRA adapter (hub id, directory or package:). Models that name the same "
        "source and revision share one Embedder deployment, which loads the base once and keeps "
        "their adapters unmerged (see merge_adapter).",
    )
    adapter_revision: str | None = Field(default=None, description="Revision of the adapter, as revision is of source.")
    merge_adapter: bool | None = Field(
        default=None,
        description="true: merge the adapter into the weights at load, in an Embedder deployment "
        "of this model's own (nothing extra per pass, one more copy of the base); false: keep it "
        "unmerged (LoRA's low-rank products run beside every linear layer of each pass). "
        "Default: merged when no other model names this base, else unmerged on the shared base.",
    )
    pooling: Pooling | None = Field(
        default=None,
        description="Default: the model's sentence-transformers Pooling config, else last_token.",
    )
    normalize: bool = Field(default=True, description="L2-normalize every vector.")
    append_eos: bool | None = Field(
        default=None,
        description="Append the EOS token to every input (what SFR/e5-mistral were trained "
        "with). Default: true for last_token pooling.",
    )
    max_input_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Longest input in tokens. Default: sentence-transformers max_seq_length, "
        "else the tokenizer's model_max_length, else 512.",
    )
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU.")
    quantization: Quantization = Field(
        default="none",
        description="fp8: the linear layers' weights and activations in float8 (torchao, "
        "fp8_granularity scales; the rest stays in dtype). Needs a CUDA GPU of compute capability >= 8.9 and "
        "the `fp8` extra; elsewhere the replica refuses to start.",
    )
    fp8_granularity: Literal["row", "tensor"] = Field(
        default="row",
        description="FP8 scales: row, one per token and per output channel (an outlier costs only "
        "its row precision); tensor, one per tensor. Per-row stays the default until "
        "bench/gpu_engine.py has measured both against compiled bf16 on a GPU.",
    )
    compile: bool | Literal["auto"] = Field(
        default="auto",
        description="Compile the forward (torch.compile of one decoder layer, reused by all; on "
        "CUDA, small passes as CUDA graphs), warmed up before the replica is ready. auto: the "
        "device's default (the engine's DEFAULT_COMPILE: eager everywhere until measured).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when torch sees a GPU, else CPU.")
    query_instruction: str | None = Field(
        default=None,
        description="Task applied to inputs sent with input_type=query, as "
        "'Instruct: {task}\\nQuery: {text}'.",
    )
    max_batch_tokens: int = Field(
        default=16384,
        gt=0,
        description="Token budget of one Embedder batch (what @serve.batch collects; parts of "
        "larger requests are cut to fit it).",
    )
    cache: bool = Field(
        default=True,
        description="Keep this model's vectors of interactive requests in the Ingress's LRU cache "
        "(args.cache sizes it), keyed by the exact token ids: a repeated query costs no Embedder call.",
    )
    token_id_inputs: Literal["accept", "reject"] = Field(
        default="accept",
        description="Whether `input` may be token ids. reject: a 400 that says why, for a model "
        "whose clients may tokenize with another vocabulary (LangChain's OpenAIEmbeddings sends "
        "tiktoken ids by default) and would otherwise get vectors of the wrong tokens.",
    )
    long_input: Literal["error", "chunk"] = Field(
        default="error",
        description="An input longer than max_input_tokens (without truncate): error, a 400 that "
        "states its length; chunk, embedded in consecutive windows that each fit (each with the "
        "model's special tokens), the input's vector being their token-weighted mean, re-normalized "
        "if the model normalizes. Queries with an instruction are never chunked.",
    )
    prompts: dict[str, Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict,
        description="Names for TEI's `prompt_name`, each mapped to a task applied as the query "
        "instruction ('Instruct: {task}\\nQuery: {text}'). `query` means query_instruction unless "
        "given here.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run Python code shipped with the model's files (transformers' trust_remote_code).",
    )
    tuning: Tuning = Field(
        default=Tuning(),
        description="Expert settings: batching, scheduling and CPU threads, with measured defaults.",
    )

    def prompt_tasks(self) -> dict[str, str]:
        """TEI's prompt names → instruction tasks: `query` is the query instruction by default."""
        default = {"query": self.query_instruction} if self.query_instruction else {}
        return default | self.prompts

    @model_validator(mode="before")
    @classmethod
    def _dials_live_in_tuning(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [name for name in TUNING_FIELDS if name in data]
            if moved:
                raise ValueError(
                    "; ".join(f"{name} moved to tuning.{name}" for name in moved)
                    + " (expert settings: nest them under `tuning:` in the model entry)"
                )
        return data

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, name: str) -> str:
        # Names become part of Serve deployment names and URLs.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", name):
            raise ValueError("model name must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
        return name

    @model_validator(mode="after")
    def _budget_holds_one_input(self) -> ModelSpec:
        if self.max_input_tokens is not None and self.max_input_tokens > self.max_batch_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least "
                f"max_input_tokens ({self.max_input_tokens})"
            )
        return self

    @model_validator(mode="after")
    def _merge_needs_an_adapter(self) -> ModelSpec:
        if self.merge_adapter is not None and self.adapter is None:
            raise ValueError("merge_adapter is set, but the model has no adapter")
        return self

    @model_validator(mode="after")
    def _fp8_computes_in_bfloat16(self) -> ModelSpec:
        if self.quantization == "fp8" and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(
                f"quantization: fp8 keeps the layers it does not quantize in bfloat16; "
                f"dtype {self.dtype} cannot be combined with it (use dtype: auto or bfloat16)"
            )
        return self


def dtype_name(requested: str, device: str) -> str:
    """The dtype a model runs in: `auto` is bfloat16 on CUDA, float32 elsewhere."""
    if requested == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return requested


# What one loaded base and its Embedder deployment are: models that share a base must agree on
# these (the rest, such as adapter, max_input_tokens or query_instruction, is each model's own).
# Every tuning dial is a setting of the deployment, so they all belong here.
SHARED_FIELDS = (
    "source", "revision", "trust_remote_code", "dtype", "device", "quantization", "fp8_granularity", "compile",
    "pooling", "normalize", "max_batch_tokens",
    *(f"tuning.{name}" for name in TUNING_FIELDS),
)


def _setting(spec: ModelSpec, field: str) -> object:
    """A SHARED_FIELDS value: `tuning.x` reads spec.tuning.x."""
    value: object = spec
    for part in field.split("."):
        value = getattr(value, part)
    return value


def share_base(models: list[ModelSpec]) -> list[list[ModelSpec]]:
    """The models of each Embedder deployment, in config order: those that name the same source
    and revision share one (one base in memory, their adapters unmerged), except a model with
    `merge_adapter: true`, which gets one of its own. Raises if models on one base disagree on
    a setting of the base's deployment (SHARED_FIELDS)."""
    groups: dict[tuple[str | None, ...], list[ModelSpec]] = {}
    for spec in models:
        key = (spec.name,) if spec.merge_adapter else (spec.source, spec.revision)
        groups.setdefault(key, []).append(spec)
    for group in groups.values():
        check_shareable(group)
    return list(groups.values())


def check_shareable(models: list[ModelSpec]) -> None:
    """Raise unless these models can be one Embedder deployment over one base."""
    first = models[0]
    for spec in models[1:]:
        differ = [f for f in SHARED_FIELDS if _setting(spec, f) != _setting(first, f)]
        if differ:
            raise ValueError(
                f"models {first.name!r} and {spec.name!r} share a base ({first.source}), so they share one "
                f"Embedder deployment, but set {', '.join(differ)} differently; set them alike, or give a "
                "model with an adapter merge_adapter: true for a deployment of its own"
            )
    merged = [spec.name for spec in models if spec.merge_adapter]
    if merged and len(models) > 1:
        raise ValueError(f"model(s) {merged}: merge_adapter: true cannot share a base with other models")


def merges_adapter(models: list[ModelSpec]) -> bool:
    """Whether a deployment of these models merges its adapter into the weights: one model with
    an adapter, unless it says merge_adapter: false."""
    return len(models) == 1 and models[0].adapter is not None and models[0].merge_adapter is not False


def format_query(task: str, text: str) -> str:
    """The instruction format SFR-Embedding-Mistral and e5-mistral were trained with."""
    return f"Instruct: {task}\nQuery: {text}"
