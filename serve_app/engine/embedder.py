"""Token ids → pooled, normalized float32 vectors. No Ray, no HTTP: benchmarkable on its own."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from .adapters import RowAdapters, adapter_names, load_adapters
from .attention import attends_only_backwards
from .batching import MicroBatch, PackedPass, padding_ratio, plan_micro_batches, plan_packed_passes, plan_per_group
from .compiled import begin_pass, compile_layers, graph_shapes, pass_shape
from .errors import RowsOutOfMemory
from .faults import FaultInjection, probe_device, release_cached_memory
from .host_memory import HostMemoryTrimmer
from .loading import ResolvedSpec, load_model, load_tokenizer, resolve_spec
from .packing import pack_inputs_and_spans, pool_packed, supports_packing
from .quantization import check_fp8_supported, quantize_fp8
from .scheduling import PassScheduler, RequestClass
from .simulated_gpu import SimulatedGpu
from .spec import ModelSpec, check_shareable, dtype_name, merges_adapter

logger = logging.getLogger(__name__)

# On CPU, a batch's forward passes run side by side in lanes (threads), each pass on its own
# cores, rather than one pass at a time on every core: no OpenMP barrier waits for a core that
# the HTTP side took, and one pass's Python overhead overlaps the others' matrix products.
# Measured: docs/decisions.md#cpu-lanes.
# Within a lane of several threads, passes below this many padded tokens run on one thread:
# with a core busy elsewhere, a small pass on 2 threads waits at OpenMP barriers
# (docs/decisions.md#single-thread-small-passes).
SINGLE_THREAD_BELOW_TOKENS = 1024
# On CPU, a batch runs as forward passes of at most this many padded tokens; with one-thread
# lanes, smaller passes keep activations in cache (docs/decisions.md#cpu-pass-size).
CPU_MICRO_BATCH_TOKENS = 1024
# On CPU, batch-class passes of this many padded tokens while queries are about: a query waits for
# at most the running ones (docs/decisions.md#batch-pass-tokens).
CPU_BATCH_PASS_TOKENS = 512
# On a GPU, batch-class passes stay this small (interactive ones take the whole max_batch_tokens),
# so that a query waits for little more than one such pass: see docs/request-classes.md.
GPU_BATCH_PASS_TOKENS = 4096
# Batch work runs at the batch pass size while an interactive call came this recently.
INTERACTIVE_RECENT_S = 10.0
# Per device, the padding share above which a batch runs as packed passes (1.0: never): packing
# lost on CPU (docs/decisions.md#packing); the GPU is unmeasured (docs/performance.md#pending-a-gpu).
DEFAULT_PACK_ABOVE_PADDING = {"cpu": 1.0, "cuda": 1.0}
# With several adapters over one base, a padded pass takes rows of any adapters (PEFT applies
# each row's own), rather than one pass per adapter; packed passes always keep one adapter per
# row, since PEFT picks adapters per row.
# Measured: docs/decisions.md#adapters-mixed-passes (CPU; the GPU is pending).
MIX_ADAPTERS_IN_PASSES = True
# Per device, whether `compile: auto` compiles the forward (compiled.py). Both stay eager until
# measured (`python -m bench.cpu_engine compile`, bench/gpu_engine.py: docs/performance.md#pending-a-gpu).
DEFAULT_COMPILE = {"cpu": False, "cuda": False}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        # Fail the replica at once: better than a model that loads on the wrong device.
        raise RuntimeError(
            f"device: cuda, but torch {torch.__version__} on this node sees no CUDA GPU "
            "(torch.cuda.is_available() is False: a CPU-only torch build, or no GPU driver). "
            "Install a CUDA build of torch on the GPU nodes, or serve deploy/local.yaml on a CPU machine."
        )
    return requested


def pick_dtype(requested: str, device: str) -> torch.dtype:
    return _DTYPES[dtype_name(requested, device)]


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # float32, one row per sequence, in the order given
    real_tokens: int
    padded_tokens: int  # tokens the forward passes computed, padding included
    # Sequences that did not fit in device memory even alone (their rows are NaN), and how
    # many passes ran out of device memory on the way (each one was rerun in halves).
    unfit_rows: tuple[int, ...] = ()
    out_of_memory_events: int = 0


@dataclass(frozen=True)
class PassResult:
    """One pass's vectors (host; on a GPU, valid once `done` has happened), in its rows' order,
    with the positions of rows that did not fit alone and the out-of-memory events met."""

    rows: torch.Tensor
    done: torch.cuda.Event | None
    unfit: list[int]
    out_of_memory_events: int


class EmbeddingEngine:
    """Runs a model over batches of token-id sequences.

    Safe to call from several threads at once. Each call belongs to a request class (see
    scheduling.py): its forward passes wait in that class's queue, and the lanes (one thread
    on a GPU, one per lane on CPU) take interactive passes before batch passes, so a query
    never waits behind queued batch passes, only behind those already running.
    Rows are right-padded: with a causal model the real tokens never attend to the padding
    after them, and positions start at 0 as for a lone text, so a text's vector does not
    depend on its batch-mates or on its class. Pooling reads each row at its own length.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str,
        pooling: str,
        normalize: bool,
        micro_batch_tokens: int,
        cpu_threads: int | None = None,
        cpu_lanes: int | None = None,
        batch_pass_tokens: int | None = None,
        batch_share: float = 0.25,
        pack_above_padding: float = 1.0,
        adapters: Mapping[str, str] | None = None,
        compile: bool = False,
        max_width: int | None = None,
        cuda_graphs: bool | None = None,
        spread_small_batches: bool = True,
    ):
        self.model = model.eval()
        # Causal decoders run their padded passes without an attention mask (attention.py).
        self.causal = attends_only_backwards(self.model, device)
        # Compiled: every layer runs one compiled graph, passes in bucketed shapes no wider
        # than `max_width` (the longest input); on CUDA, small passes replay CUDA graphs unless
        # `cuda_graphs` is False (the GPU benchmark compares both).
        self.compiled = compile
        self.cuda_graphs = compile and device.startswith("cuda") and cuda_graphs is not False
        self.max_width = max_width
        if compile:
            compile_layers(self.model, self.cuda_graphs, max_width)
        # Several models over one base (a PeftModel with their LoRA adapters unmerged): each
        # model's adapter name (adapters.BASE: the bare base); every call names each row's model.
        self.adapters = dict(adapters) if adapters else None
        self._row_adapters = RowAdapters(self.model) if adapters else None
        self.mix_adapters = MIX_ADAPTERS_IN_PASSES
        self.cpu_threads = cpu_threads or torch.get_num_threads()
        # A GPU runs one pass at a time (the host only queues work); CPU cores split into lanes.
        self.lanes = 1 if device != "cpu" else max(1, min(cpu_lanes or self.cpu_threads, self.cpu_threads))
        self.threads_per_lane = self.cpu_threads // self.lanes
        self.spread_small_batches = spread_small_batches and self.lanes > 1
        self.device = device
        self.pooling = pooling
        self.normalize = normalize
        # Padded tokens of one pass, per class: batch passes may be smaller, since a query that
        # arrives while one runs waits for it to finish (see _pass_tokens).
        self.pass_tokens = {
            RequestClass.INTERACTIVE: micro_batch_tokens,
            RequestClass.BATCH: batch_pass_tokens or micro_batch_tokens,
        }
        self._last_interactive_call = float("-inf")
        self.pack_above_padding = pack_above_padding
        # No KV cache: nothing is generated, and a cache keeps every layer's keys and values
        # alive until the pass ends (it also hides packed position ids from the mask builder).
        config: Any = model.config  # transformers' config (torch types a module's attributes as modules or tensors)
        self._no_cache = {"use_cache": False} if hasattr(config, "use_cache") else {}
        self.dimensions = int(config.hidden_size)
        self.pin_memory = device.startswith("cuda")
        self.host_memory = HostMemoryTrimmer()
        self._previous_pass_done: torch.cuda.Event | None = None  # GPU: completion event of the pass launched before
        lane_setup = (lambda: torch.set_num_threads(self.threads_per_lane)) if device == "cpu" else None
        self._scheduler = PassScheduler(self.lanes, batch_share, lane_setup)
        self.faults = FaultInjection.from_environment()
        self._warming_up = False  # the warm-up's passes must fit whole: no splitting
        # What load() decided from the models' files, when it loaded them: per model, and the first's.
        self.resolved_models: dict[str, ResolvedSpec] = {}
        self.resolved: ResolvedSpec | None = None

    @classmethod
    def load(cls, spec: ModelSpec, cpu_threads: int | None = None) -> EmbeddingEngine:
        return cls.load_models([spec], cpu_threads)

    @classmethod
    def load_in_worker(cls, specs: Sequence[ModelSpec]) -> EmbeddingEngine:
        """load_models in a Ray worker (a Serve replica, a batch job's actor), on the cores it
        reserved: tuning.cpu_threads, else OMP_NUM_THREADS, which Ray sets from the worker's
        num_cpus. Set process-wide, so that workers sharing a machine don't oversubscribe it."""
        specs = list(specs)
        threads = max(1, specs[0].tuning.cpu_threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
        torch.set_num_threads(threads)
        return cls.load_models(specs, threads)

    @classmethod
    def load_models(cls, specs: Sequence[ModelSpec], cpu_threads: int | None = None) -> EmbeddingEngine:
        """One model, or several over one base (spec.share_base): the base loads once, and the
        models' adapters stay unmerged beside it. A lone model's adapter is merged into the
        weights unless it says merge_adapter: false (spec.merges_adapter). CPU threads:
        `cpu_threads`, else tuning.cpu_threads, else torch's current count."""
        specs = list(specs)
        check_shareable(specs)
        spec = specs[0]  # the settings all of them share
        simulated = SimulatedGpu.from_environment()
        if simulated is not None:
            return cls._load_simulated(specs, simulated)
        device = pick_device(spec.device)
        if spec.quantization == "fp8":
            check_fp8_supported(spec.name, device)  # before minutes of loading weights
        tokenizer = load_tokenizer(spec)
        resolved = {s.name: resolve_spec(s, tokenizer) for s in specs}
        merge = merges_adapter(specs)
        model: torch.nn.Module = load_model(resolved[spec.name], device, pick_dtype(spec.dtype, device), merge_adapter=merge)
        names = adapter_names(specs)
        unmerged = not merge and any(s.adapter for s in specs)
        if unmerged:
            model = load_adapters(model, specs, names).to(device)
        if spec.quantization == "fp8":
            quantize_fp8(model, spec.fp8_granularity)
        tuning = spec.tuning
        micro, batch_pass = pass_sizes(spec, on_gpu=device.startswith("cuda"))
        engine = cls(
            model, device, resolved[spec.name].pooling, spec.normalize, micro, cpu_threads or tuning.cpu_threads,
            tuning.cpu_lanes,
            batch_pass, tuning.batch_share, choose_pack_above_padding(spec, model, device),
            names if unmerged else None, choose_compile(spec, device), resolved[spec.name].max_input_tokens,
            spread_small_batches=tuning.spread_small_batches,
        )
        engine.resolved_models = resolved
        engine.resolved = resolved[spec.name]
        return engine

    @classmethod
    def _load_simulated(cls, specs: Sequence[ModelSpec], gpu: SimulatedGpu) -> EmbeddingEngine:
        """A benchmark's engine over a simulated GPU (simulated_gpu.py): the models' tokenizer
        rules and the GPU's pass sizes, one lane, padded passes; no weights are loaded, and every
        model (adapters too) gets the simulated vectors."""
        spec = specs[0]
        resolved = {s.name: resolve_spec(s, load_tokenizer(spec)) for s in specs}
        micro, batch_pass = pass_sizes(spec, on_gpu=True)
        engine = cls(gpu.model(), "cpu", "last_token", True, micro, cpu_threads=1, cpu_lanes=1,
                     batch_pass_tokens=batch_pass, batch_share=spec.tuning.batch_share,
                     max_width=resolved[spec.name].max_input_tokens)
        engine.resolved_models = resolved
        engine.resolved = resolved[spec.name]
        return engine

    def embed(self, sequences: list[list[int]], request_class: RequestClass = RequestClass.BATCH,
              models: Sequence[str] | None = None) -> np.ndarray:
        """One float32 row per sequence, in the order given. Raises RowsOutOfMemory if some
        sequence did not fit in device memory even alone."""
        done = self.embed_counted(sequences, request_class, models)
        if done.unfit_rows:
            raise RowsOutOfMemory.of(list(done.unfit_rows), done.vectors)
        return done.vectors

    def embed_counted(self, sequences: list[list[int]], request_class: RequestClass = RequestClass.BATCH,
                      models: Sequence[str] | None = None) -> Embedded:
        """The vectors, with the real and padded token counts of the passes that made them.

        `models`: each sequence's model, needed (and read) only by an engine of several adapters.
        A pass that runs out of device memory is rerun in halves (see _forward_fitting); a
        sequence that does not fit even alone gets a NaN row and is named in `unfit_rows`, and
        the others still get their vectors. Any other failure of a pass fails the call, and
        the call's passes still queued are cancelled.
        """
        lengths = [len(ids) for ids in sequences]
        adapters = self._row_adapter_names(models, len(sequences))
        pass_tokens = self._pass_tokens(request_class)
        plan = self._plan(lengths, pass_tokens, adapters)
        # A small batch (a group of queries) in one or two uneven passes leaves a lane idle
        # while the other finishes; a closed loop of clients tends to send one such batch at a
        # time. The warm-up's passes keep the shapes it chose (compiled.py's first traces).
        if self.spread_small_batches and self.lanes <= len(lengths) and not self._warming_up:
            spread = spread_pass_tokens(lengths, plan, self.lanes)
            if spread < pass_tokens:
                plan = self._plan(lengths, spread, adapters)
        # Biggest first, so that the lanes finish together.
        plan.sort(key=lambda batch: batch.padded_tokens, reverse=True)
        running = [
            self._scheduler.submit(request_class, partial(self._run_pass, batch, [sequences[i] for i in batch.indices],
                                                     [adapters[i] for i in batch.indices] if adapters else None))
            for batch in plan
        ]
        out = np.empty((len(sequences), self.dimensions), dtype=np.float32)
        unfit, out_of_memory_events = [], 0
        try:
            for batch, future in zip(plan, running, strict=True):
                result = future.result()
                if result.done is not None:
                    result.done.synchronize()
                out[batch.indices] = result.rows.numpy()
                unfit += [batch.indices[p] for p in result.unfit]
                out_of_memory_events += result.out_of_memory_events
        except BaseException:
            for future in running:  # their vectors would be thrown away: free the lanes
                future.cancel()
            raise
        self.host_memory.maybe_trim()
        return Embedded(out, sum(lengths), sum(b.padded_tokens for b in plan), tuple(sorted(unfit)), out_of_memory_events)

    def _pass_tokens(self, request_class: RequestClass) -> int:
        """The pass size of a call: batch work takes the smaller batch pass size only while
        queries are about (an interactive call within INTERACTIVE_RECENT_S): small batch passes cut
        query latency beside an indexing load at a cost in bulk throughput
        (docs/decisions.md#batch-pass-tokens), a price indexing alone need not pay."""
        now = time.monotonic()
        if request_class is RequestClass.INTERACTIVE:
            self._last_interactive_call = now
            return self.pass_tokens[request_class]
        recent = now - self._last_interactive_call < INTERACTIVE_RECENT_S
        return self.pass_tokens[RequestClass.BATCH if recent else RequestClass.INTERACTIVE]

    @property
    def micro_batch_tokens(self) -> int:
        """Padded tokens of an interactive pass (and of batch passes while no query is about)."""
        return self.pass_tokens[RequestClass.INTERACTIVE]

    def warm_up(self) -> None:
        """Prove at start that the replica can run its largest passes, and run the first passes
        (kernels, allocator, lazy init) before any request does.

        Per pass size, one pass per lane of the largest shape the engine can be given: as many
        rows of the longest input (max_input_tokens) as the pass takes (at least one), which
        needs the most activation memory of any pass of that size. Those passes run whole: one
        that runs out of device memory fails the start with the settings to lower, rather than
        every long request later.
        """
        width = max(resolved.max_input_tokens for resolved in self.resolved_models.values()) if self.resolved_models else 16
        self._warming_up = True
        try:
            if self.compiled:
                self._warm_up_compiled()
            for request_class, tokens in self.pass_tokens.items():
                if request_class is RequestClass.BATCH and tokens == self.pass_tokens[RequestClass.INTERACTIVE]:
                    continue  # the same passes again
                rows = max(1, tokens // width)
                n = rows * self.lanes
                try:
                    # Rows of every adapter, so that each one's layers have run too.
                    self.embed([[0] * width] * n, request_class, self._warm_up_models(n))
                except torch.OutOfMemoryError as exc:
                    raise RuntimeError(
                        f"the largest forward pass does not fit in {self.device} memory: {rows} rows of "
                        f"{width} tokens (max_input_tokens), {rows * width} padded tokens, the pass size that "
                        f"max_batch_tokens (or tuning.micro_batch_tokens / tuning.batch_pass_tokens) allows: lower "
                        f"max_batch_tokens (or max_input_tokens), or give the replica a device with more "
                        f"free memory ({exc})"
                    ) from exc
        finally:
            self._warming_up = False
        self._last_interactive_call = float("-inf")  # the warm-up is no query

    def _warm_up_models(self, n: int) -> list[str] | None:
        """The models of `n` warm-up rows: every adapter in turn, so that each one's layers run too."""
        models = list(self.adapters or [])
        return [models[k % len(models)] for k in range(n)] if models else None

    def _warm_up_compiled(self) -> None:
        """Compile before the first request does: a pass of several rows first (its trace gives
        rows and width a symbol each; a first pass as many rows as tokens wide would give them
        one, and later shapes would compile again), then one of one row (torch compiles a graph
        of its own for a dimension of size 1); on CUDA, then record a CUDA graph of every small
        pass shape (compiled.graph_shapes), on the lane that will replay it."""
        shapes = [(2, 32), (1, 16)] + (graph_shapes(self.max_width) if self.cuda_graphs else [])
        for rows, width in shapes:
            self.embed([[0] * width] * rows, RequestClass.INTERACTIVE, self._warm_up_models(rows))

    def check_device(self) -> None:
        """Raise if the device cannot run work any more (lost, or its context poisoned)."""
        self.faults.check_device()
        probe_device(self.device)

    def _row_adapter_names(self, models: Sequence[str] | None, n: int) -> list[str] | None:
        """Each row's adapter name, for an engine of several adapters (else None)."""
        if self._row_adapters is None or self.adapters is None:
            return None
        if models is None or len(models) != n:
            raise ValueError(f"this engine serves {sorted(self.adapters)}: name the model of each of the {n} rows")
        try:
            return [self.adapters[model] for model in models]
        except KeyError as exc:
            raise ValueError(f"model {exc.args[0]!r} is not one of this engine's {sorted(self.adapters)}") from None

    def _run_pass(self, batch: MicroBatch | PackedPass, rows: list[list[int]],
                  adapters: list[str] | None) -> PassResult:
        """One pass, on a lane: its rows on the host, and (GPU) the event that says they are there.
        `adapters`: each row's adapter name, in `rows`' order."""
        pooled, unfit, events = self._forward_fitting(batch, rows, adapters)
        if not self.pin_memory:
            return PassResult(pooled, None, unfit, events)
        host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
        host.copy_(pooled, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        # The host runs ahead of the GPU: without a bound it would queue every waiting batch
        # pass on the device, and a query's pass would run after all of them. Waiting for the
        # previous pass keeps at most one pass queued behind the running one.
        previous, self._previous_pass_done = self._previous_pass_done, done
        if previous is not None:
            previous.synchronize()
        return PassResult(host, done, unfit, events)

    def _forward_fitting(self, batch: MicroBatch | PackedPass, rows: list[list[int]],
                         adapters: list[str] | None) -> tuple[torch.Tensor, list[int], int]:
        """The pass's vectors; if it runs out of device memory, those of its halves (recursively,
        as padded passes, longest rows first), so that a pass too big for the memory left still
        serves every row that fits. Also: the positions of rows that did not fit alone (NaN
        vectors), and the out-of-memory events met."""
        try:
            self.faults.before_pass(batch.padded_tokens, self._warming_up)
            rows_of_adapters: AbstractContextManager[None] = nullcontext()
            if adapters is not None and self._row_adapters is not None:
                rows_of_adapters = self._row_adapters.rows(_pass_adapters(batch, adapters))
            with rows_of_adapters:
                return self._forward(batch, rows), [], 0
        except torch.OutOfMemoryError:
            if self._warming_up:
                raise
        # Outside the except block: the exception's traceback, which holds the failed pass's
        # tensors in its frames, is gone, so the memory can really be freed.
        release_cached_memory(self.device)
        if len(rows) == 1:
            logger.warning("a row of %d tokens does not fit in %s memory even alone", len(rows[0]), self.device)
            return torch.full((1, self.dimensions), float("nan"), device=self.device), [0], 1
        logger.warning("a pass of %d rows, %d padded tokens, ran out of %s memory: rerunning it in halves",
                       len(rows), batch.padded_tokens, self.device)
        half = len(rows) // 2
        vectors, unfit, events = [], [], 1
        for start, end in ((0, half), (half, len(rows))):
            part = MicroBatch(batch.indices[start:end], max(map(len, rows[start:end])))
            part_vectors, part_unfit, part_events = self._forward_fitting(
                part, rows[start:end], adapters[start:end] if adapters is not None else None)
            vectors.append(part_vectors)
            unfit += [start + p for p in part_unfit]
            events += part_events
        return torch.cat(vectors), unfit, events

    # ---- the hook a pass scheduler calls: plan a call's passes, then run each ----------------

    def _plan(self, lengths: list[int], max_tokens: int | None = None,
              adapters: list[str] | None = None) -> list[MicroBatch | PackedPass]:
        """Passes of at most `max_tokens` (default: the interactive pass size) for sequences of
        these lengths: sorted padded micro-batches, or packed passes when the padded ones would
        waste more than `pack_above_padding` of their tokens. With each sequence's `adapters`, a
        packed row (and, unless mix_adapters, a padded pass) holds one adapter's sequences only."""
        max_tokens = max_tokens or self.micro_batch_tokens
        groups = None
        if adapters is not None:
            positions: dict[str, list[int]] = {}
            for i, name in enumerate(adapters):
                positions.setdefault(name, []).append(i)
            groups = list(positions.values()) if len(positions) > 1 else None
        padded: list[MicroBatch | PackedPass] = [*plan_micro_batches(lengths, max_tokens)] if (
            groups is None or self.mix_adapters) else plan_per_group(plan_micro_batches, lengths, max_tokens, groups)
        if self.pack_above_padding >= 1.0 or padding_ratio(lengths, padded) <= self.pack_above_padding:
            return padded
        if groups is None:
            return [*plan_packed_passes(lengths, max_tokens)]
        return plan_per_group(plan_packed_passes, lengths, max_tokens, groups)

    @torch.inference_mode()  # per thread: lanes need it too
    def _forward(self, batch: MicroBatch | PackedPass, rows: list[list[int]]) -> torch.Tensor:
        """One pass's vectors, in `batch.indices` order; `rows` are its sequences in that order."""
        if self.device == "cpu" and self.threads_per_lane > 1:
            small = batch.padded_tokens < SINGLE_THREAD_BELOW_TOKENS
            torch.set_num_threads(1 if small else self.threads_per_lane)
        if isinstance(batch, PackedPass):
            return self._forward_packed(batch, rows)
        return self._forward_padded(batch, rows)

    def _forward_packed(self, batch: PackedPass, rows: list[list[int]]) -> torch.Tensor:
        ids, positions, spans = self._to_device(*pack_inputs_and_spans(batch, rows))
        hidden = self.model(input_ids=ids, position_ids=positions, **self._no_cache).last_hidden_state
        return self._normalized(pool_packed(hidden, spans, self.pooling))

    def _forward_padded(self, batch: MicroBatch, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded rows; compiled, in the pass's bucketed shape (extra rows of padding,
        which nobody pools). A causal model gets no mask: its real tokens never attend to the
        padding after them, and pooling reads each row at its own length."""
        n_rows, width = len(rows), batch.width
        if self.compiled:
            n_rows, width = pass_shape(n_rows, width, self.max_width, self.cuda_graphs)
        # Rows of padding pooled by nobody count one token, so that no mask row is all zeros.
        lengths = torch.ones(n_rows, dtype=torch.long)
        ids = torch.zeros((n_rows, width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            lengths[r] = len(row)
        inputs = {"input_ids": ids}
        if not self.causal:
            inputs["attention_mask"] = (torch.arange(width) < lengths.unsqueeze(1)).long()
        inputs, lengths = self._to_device(inputs, lengths)
        begin_pass(self.cuda_graphs)
        hidden = self.model(**inputs, **self._no_cache).last_hidden_state[: len(rows)]
        return self._normalized(pool(hidden, lengths[: len(rows)], self.pooling))

    def _to_device(self, *tensors: Any) -> tuple[Any, ...]:
        """Host tensors (or dicts of them) onto the device before the pass: on a GPU pinned
        and without blocking, so that the copies queue ahead of the pass's kernels."""
        def move(tensor: torch.Tensor) -> torch.Tensor:
            if self.pin_memory:
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)

        return tuple({k: move(v) for k, v in t.items()} if isinstance(t, dict) else move(t) for t in tensors)

    def _normalized(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def _pass_adapters(batch: MicroBatch | PackedPass, adapters: list[str]) -> list[str]:
    """The adapter of each row of a pass, from each sequence's (in `batch.indices` order): a
    packed row's sequences share one."""
    if isinstance(batch, PackedPass):
        starts = itertools.accumulate((len(row) for row in batch.rows[:-1]), initial=0)
        return [adapters[start] for start in starts]
    return adapters


def spread_pass_tokens(lengths: list[int], plan: Sequence[MicroBatch | PackedPass], lanes: int) -> int:
    """A pass size that cuts a batch into about one pass per lane (never narrower than its
    longest sequence), so that the lanes finish it together instead of one idling while the
    other runs a bigger pass. Only a batch that fits one round of the lanes gets a smaller
    pass size from it: a bigger one keeps `plan`'s."""
    padded = sum(p.padded_tokens for p in plan)
    return max(max(lengths), -(-padded // lanes))


def pass_sizes(spec: ModelSpec, on_gpu: bool) -> tuple[int, int]:
    """Padded tokens of an interactive pass and of a batch pass while queries are about."""
    micro = spec.tuning.micro_batch_tokens or (
        spec.max_batch_tokens if on_gpu else min(spec.max_batch_tokens, CPU_MICRO_BATCH_TOKENS)
    )
    return micro, spec.tuning.batch_pass_tokens or min(micro, GPU_BATCH_PASS_TOKENS if on_gpu else CPU_BATCH_PASS_TOKENS)


def choose_pack_above_padding(spec: ModelSpec, model: torch.nn.Module, device: str) -> float:
    """The spec's packing threshold, else the device's; 1.0 (never) for a model that cannot pack."""
    threshold = spec.tuning.pack_above_padding
    if threshold is None:
        threshold = DEFAULT_PACK_ABOVE_PADDING["cuda" if device.startswith("cuda") else "cpu"]
    if threshold < 1.0 and not supports_packing(model, device):
        if spec.tuning.pack_above_padding is not None:
            raise ValueError(
                f"model {spec.name!r}: tuning.pack_above_padding is set, but this model attends across "
                "packed sequences (its attention mask ignores position ids, as RoBERTa's does); "
                "remove the setting to run padded passes"
            )
        logger.info("model %s: attends across packed sequences; running padded passes", spec.name)
        threshold = 1.0
    return threshold


def choose_compile(spec: ModelSpec, device: str) -> bool:
    """The spec's `compile`, or with `auto` the device's default (DEFAULT_COMPILE)."""
    if spec.compile == "auto":
        return DEFAULT_COMPILE["cuda" if device.startswith("cuda") else "cpu"]
    return spec.compile


def pool(hidden: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool right-padded hidden states in float32; `lengths`: each row's real tokens, on the
    hidden states' device (reading them there costs no sync with the host)."""
    if mode == "last_token":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1].float()
    if mode == "cls":
        return hidden[:, 0].float()
    if mode == "mean":
        mask = torch.arange(hidden.shape[1], device=hidden.device) < lengths.unsqueeze(1)
        weights = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"unknown pooling mode {mode!r}")
