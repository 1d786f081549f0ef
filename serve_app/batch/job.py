"""`python -m serve_app.batch`: embed a corpus with Ray Data, resumably, on the service's engine.

    read (CorpusDatasource) → [Ray Data's checkpoint filter] → Tokenize (CPU actors)
        → Embed (engine actors, one per GPU) → EmbeddingSink (Parquet + errors)

Ray Data does the reading, sharding, retries of lost tasks and actors, progress bars and
writing, and its checkpointing makes the job resumable: every write task records the ids it
wrote with a two-phase commit, a rerun on the same output skips them and removes the files
of tasks that never committed, so the output holds every valid id exactly once.
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import time
from dataclasses import dataclass

from serve_app.batch.config import JobModel, load_job_model

EMBEDDINGS_DIR = "embeddings"
CHECKPOINT_DIR = "_checkpoint"
ERRORS_FILE = "errors.jsonl"
BATCH_ROWS = 1024  # rows per engine call: sorted by length, then cut into max_batch_tokens batches
TOKENIZE_ROWS = 256
# Logical CPUs of the light stages, so that on a small machine the engine actor and the
# reads, tokenizer and writes all fit at once (logical: they use what they need).
READ_CPUS = WRITE_CPUS = 0.25
TOKENIZE_CPUS = 0.5


@dataclass(frozen=True)
class Summary:
    documents: int  # embedded and written by this run
    tokens: int
    errors: int  # bad rows found by this run
    errors_in_output: int  # lines of errors.jsonl: every bad row of every run on this output
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"documents {self.documents:,} | tokens {self.tokens:,} | errors {self.errors:,} "
            f"({self.errors_in_output:,} in {ERRORS_FILE}) | {self.seconds:.1f} s | "
            f"{self.tokens_per_s:,.0f} tokens/s"
        )


def output_uri(output: str) -> str:
    """A local path made absolute (Ray's checkpointing needs it); URIs pass through."""
    if "://" in output:
        return output.rstrip("/")
    return os.path.abspath(output)


def engine_actors(actor_options: dict, cpu_threads: int | None) -> int:
    """How many engine actors fit the cluster now: one per `num_gpus` GPUs, else per CPU share.

    On CPU an actor counts the torch threads it will run, not only its logical CPUs, so that
    actors do not oversubscribe cores (2 cores, 2 threads: one actor).
    """
    import ray

    available = ray.available_resources()
    asks = {"GPU": actor_options.get("num_gpus", 0)}
    if not asks["GPU"]:
        asks["CPU"] = max(actor_options.get("num_cpus", 1), cpu_threads or 0)
    asks |= actor_options.get("resources", {})
    fits = [math.floor(available.get(name, 0) / ask + 1e-9) for name, ask in asks.items() if ask]
    return max(1, min(fits, default=1))


def run(
    job: JobModel,
    input_path: str,
    output: str,
    *,
    id_field: str = "id",
    text_field: str = "text",
    input_type: str = "document",
    actors: int | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Summary:
    """Run the job on the connected Ray cluster; returns what this run did."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ray.data.checkpoint import CheckpointConfig

    from serve_app.batch.reader import CorpusDatasource
    from serve_app.batch.sink import EmbeddingSink
    from serve_app.batch.stages import Embed, Tokenize

    started = time.perf_counter()
    output = output_uri(output)
    spec = job.spec.model_dump()
    actors = actors or engine_actors(job.actor_options, job.spec.tuning.cpu_threads)
    corpus = CorpusDatasource(input_path, id_field=id_field, text_field=text_field)
    sink = EmbeddingSink(posixpath.join(output, EMBEDDINGS_DIR))
    context = DataContext.get_current()
    previous_checkpoint_config = context.checkpoint_config
    context.checkpoint_config = CheckpointConfig(
        id_column="id",
        checkpoint_path=posixpath.join(output, CHECKPOINT_DIR),
        delete_checkpoint_on_success=False,  # a rerun of a finished job must find it done
    )
    try:
        (
            ray.data.read_datasource(corpus, num_cpus=READ_CPUS)
            .map_batches(
                Tokenize,
                fn_constructor_kwargs={"spec": spec, "input_type": input_type},
                batch_size=TOKENIZE_ROWS,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(min_size=1, max_size=actors),
                num_cpus=TOKENIZE_CPUS,
            )
            .map_batches(
                Embed,
                fn_constructor_kwargs={"spec": spec},
                batch_size=batch_rows,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors),
                **job.actor_options,
            )
            .write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
        )
    finally:
        context.checkpoint_config = previous_checkpoint_config
    errors_in_output = sink.merge_errors(ERRORS_FILE)
    totals = sink.totals
    return Summary(
        totals.get("documents", 0), totals.get("tokens", 0), totals.get("errors", 0), errors_in_output,
        time.perf_counter() - started,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.batch",
        description="Embed a corpus (JSONL or Parquet) into Parquet vectors with Ray Data, using a "
        "model exactly as the Serve config serves it. Resumable: rerun on the same --output.",
    )
    parser.add_argument("--config", required=True, help="the Serve config file (e.g. deploy/config.yaml)")
    parser.add_argument("--model", required=True, help="a model `name` from the config's models list")
    parser.add_argument("--input", required=True, help="a JSONL/Parquet file or a directory; local or a URI (s3://...)")
    parser.add_argument("--output", required=True, help="directory (local or URI) for embeddings/, errors.jsonl")
    parser.add_argument("--id-field", default="id")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--input-type", choices=["document", "query"], default="document",
                        help="query: apply the model's query_instruction, as input_type=query does online")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on (default: Ray's own: RAY_ADDRESS, as `ray job submit` "
                        "sets it, else a cluster started on this machine, else a new local instance)")
    parser.add_argument("--actors", type=int, default=None,
                        help="engine actors at most (default: as many as fit the cluster's free GPUs, or CPUs)")
    parser.add_argument("--batch-rows", type=int, default=BATCH_ROWS,
                        help="rows per engine call, length-sorted and cut into max_batch_tokens batches")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = load_job_model(args.config, args.model)  # a bad config fails before Ray starts
    import ray

    ray.init(address=args.address)
    try:
        summary = run(
            job, args.input, args.output, id_field=args.id_field, text_field=args.text_field,
            input_type=args.input_type, actors=args.actors, batch_rows=args.batch_rows,
        )
    finally:
        ray.shutdown()
    print(summary, flush=True)
    return 0
