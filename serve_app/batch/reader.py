"""Reading a corpus: JSONL or Parquet files → rows of (id, text), each checked on its own.

Ray Data's FileBasedDatasource does the file work (paths and directories, any pyarrow or
fsspec filesystem, compression, one read task per group of files, retries); this module only
turns one file's records into rows. Ray Data's own JSON reader infers one type per column
and fails the whole file on a record whose `text` is a number, and no reader of its reports
line numbers, so records are parsed here, one at a time: a bad record becomes a row that
carries its reason, and never stops the job.

Every row gets a non-null string `id` (Ray Data's checkpointing keys on it): the record's id
(an integer id is written as its decimal string), or for a record without a usable id a
stand-in made of the file and line, so that a rerun recognises that error row as done too.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),  # null on an error row
    ("path", pa.string()),
    ("line", pa.int64()),  # 1-based: the line of a JSONL file, the row of a Parquet file
    ("error", pa.string()),  # null, or the reason: a short code
    ("message", pa.string()),
])
ROWS_PER_BLOCK = 4096
READ_CHUNK_BYTES = 8 << 20
PARQUET_SUFFIX = ".parquet"
FILE_EXTENSIONS = ["jsonl", "json", "parquet", "jsonl.gz", "json.gz", "jsonl.zst", "json.zst"]
_MISSING = object()  # the field is absent
_NOT_A_RECORD = object()  # the line is not a JSON object


def check_record(id_value, text_value) -> tuple[str | None, str | None, str | None, str | None]:
    """(id, text, error code, message) for one record; the service's rules for a text input."""
    if id_value is _NOT_A_RECORD:
        return None, None, "invalid_json", "the line is not a JSON object"
    if id_value is _MISSING or id_value is None or id_value == "":
        return None, None, "missing_id", "the record has no id"
    if isinstance(id_value, bool) or not isinstance(id_value, (str, int)):
        return None, None, "invalid_id", f"the id must be a string or an integer, not {type(id_value).__name__}"
    record_id = str(id_value)
    if text_value is _MISSING or text_value is None:
        return record_id, None, "missing_text", "the record has no text"
    if not isinstance(text_value, str):
        return record_id, None, "invalid_text", f"the text must be a string, not {type(text_value).__name__}"
    if not text_value:
        return record_id, None, "empty_text", "the text is an empty string"
    return record_id, text_value, None, None


def stand_in_id(path: str, line: int) -> str:
    # NUL cannot appear in a JSON string id unescaped and is vanishingly rare in real ids.
    return f"\0{path}:{line}"


class _Rows:
    """Accumulates checked rows of one file and cuts them into blocks."""

    def __init__(self, path: str):
        self.path = path
        self.columns: dict[str, list] = {name: [] for name in ROW_SCHEMA.names if name != "path"}

    def add(self, line: int, record_id, text, error, message) -> None:
        self.columns["id"].append(record_id if record_id is not None else stand_in_id(self.path, line))
        self.columns["text"].append(text)
        self.columns["line"].append(line)
        self.columns["error"].append(error)
        self.columns["message"].append(message)

    def full(self) -> bool:
        return len(self.columns["id"]) >= ROWS_PER_BLOCK

    def take(self) -> pa.Table:
        n = len(self.columns["id"])
        arrays = {name: self.columns[name] for name in self.columns} | {"path": [self.path] * n}
        table = pa.Table.from_pydict(arrays, schema=ROW_SCHEMA)
        self.columns = {name: [] for name in self.columns}
        return table

    def __len__(self) -> int:
        return len(self.columns["id"])


class CorpusDatasource(FileBasedDatasource):
    """Rows of ROW_SCHEMA from JSONL (optionally compressed) and Parquet files."""

    def __init__(self, paths, *, id_field: str, text_field: str, **file_args):
        super().__init__(paths, file_extensions=FILE_EXTENSIONS, **file_args)
        self.id_field = id_field
        self.text_field = text_field

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(PARQUET_SUFFIX):  # Parquet needs random access (its footer comes last)
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        records = self._parquet_records(f) if path.endswith(PARQUET_SUFFIX) else self._jsonl_records(f)
        rows = _Rows(path)
        for line, id_value, text_value in records:
            rows.add(line, *check_record(id_value, text_value))
            if rows.full():
                yield rows.take()
        if len(rows):
            yield rows.take()

    def _jsonl_records(self, f):
        """(line, id, text) per non-blank line."""
        line, rest = 0, b""
        while True:
            chunk = f.read(READ_CHUNK_BYTES)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop() if chunk else b""
            for raw in lines:
                line += 1
                if raw.strip():
                    yield (line, *self._fields(raw))
            if not chunk:
                return

    def _fields(self, raw: bytes):
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            return _NOT_A_RECORD, None
        return record.get(self.id_field, _MISSING), record.get(self.text_field, _MISSING)

    def _parquet_records(self, f):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(f)
        present = [name for name in (self.id_field, self.text_field) if name in parquet.schema_arrow.names]
        line = 0
        for batch in parquet.iter_batches(columns=present, batch_size=ROWS_PER_BLOCK):
            ids = batch.column(self.id_field).to_pylist() if self.id_field in present else [_MISSING] * batch.num_rows
            texts = (
                batch.column(self.text_field).to_pylist() if self.text_field in present else [_MISSING] * batch.num_rows
            )
            for id_value, text_value in zip(ids, texts, strict=True):
                line += 1
                yield line, id_value, text_value
