"""Writing a job's results: vectors as Parquet, bad rows as JSON lines, in one Ray Data write.

Output layout under `--output`:

    embeddings/*.parquet        id (string), embedding (float32 list), tokens (int32)
    embeddings/_errors/*.jsonl  the bad rows of each write task (hidden from Parquet readers)
    errors.jsonl                all bad rows, merged from embeddings/_errors/ after every run
    _checkpoint/                Ray Data's checkpoint: the ids already written

Ray Data's ParquetDatasink writes the vectors (file names, row groups, retries); this sink
only sets the bad rows aside first. Their file carries the name of the task's Parquet file,
so that Ray Data's checkpoint recovery, which deletes the files of a write task that never
committed by that name, deletes both. Every id of a write task, bad rows' included, is
checkpointed together: a rerun skips what was written, vectors and errors alike.
"""

from __future__ import annotations

import posixpath

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow.fs import FileSelector, FileType
from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
from ray.data.block import BlockAccessor

VECTOR_COLUMNS = ["id", "embedding", "tokens"]
ERRORS_DIR = "_errors"


class EmbeddingSink(ParquetDatasink):
    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.totals: dict[str, int] = {}

    def write(self, blocks, ctx) -> dict[str, int]:
        table = pa.concat_tables([BlockAccessor.for_block(block).to_arrow() for block in blocks])
        bad = pc.is_valid(table["error"])
        vectors = table.filter(pc.invert(bad)).select(VECTOR_COLUMNS)
        errors = table.filter(bad)
        super().write([vectors], ctx)
        if errors.num_rows:
            self._write_errors(errors, ctx)
        return {
            "documents": vectors.num_rows,
            "tokens": int(pc.sum(vectors["tokens"]).as_py() or 0),
            "errors": errors.num_rows,
        }

    def _write_errors(self, errors: pa.Table, ctx) -> None:
        filename = self.filename_provider.get_filename_for_task(ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx)
        stem = filename.rsplit(".", 1)[0]
        directory = posixpath.join(self.path, ERRORS_DIR)
        self.filesystem.create_dir(directory, recursive=True)
        with self.filesystem.open_output_stream(posixpath.join(directory, f"{stem}.jsonl")) as out:
            for row in errors.select(["id", "path", "line", "error", "message"]).to_pylist():
                if row["id"].startswith("\0"):  # a stand-in: the record had no usable id
                    row["id"] = None
                out.write(orjson.dumps(row) + b"\n")

    def on_write_complete(self, write_result) -> None:
        super().on_write_complete(write_result)
        for key in ("documents", "tokens", "errors"):
            self.totals[key] = sum((r or {}).get(key, 0) for r in write_result.write_returns)

    def merge_errors(self, filename: str) -> int:
        """Concatenate every task's bad rows into `filename` beside this sink's directory;
        returns how many there are."""
        destination = posixpath.join(posixpath.dirname(self.path), filename)
        self.filesystem.create_dir(posixpath.dirname(destination), recursive=True)
        selector = FileSelector(posixpath.join(self.path, ERRORS_DIR), allow_not_found=True)
        parts = sorted(f.path for f in self.filesystem.get_file_info(selector) if f.type == FileType.File)
        count = 0
        with self.filesystem.open_output_stream(destination) as out:
            for part in parts:
                with self.filesystem.open_input_stream(part) as f:
                    data = f.read()
                count += data.count(b"\n")
                out.write(data)
        return count
