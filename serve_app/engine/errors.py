"""Errors the engine reports about a client's input (mapped to HTTP 400 by the API layer)."""

from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """An input the model cannot take; `param` names the offending field, OpenAI-style."""

    def __init__(self, message: str, param: str | None = "input", code: str | None = "invalid_input"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str | None, str | None]]:
        return (type(self), (self.message, self.param, self.code))  # survive pickling across Ray actors with all fields


class RowsOutOfMemory(RuntimeError):
    """Inputs that did not fit in device memory even in a pass of their own.

    Start-up proves that a pass of the largest rows the settings allow fits (warm_up), and
    inputs longer than max_input_tokens never reach a pass, so such a row met memory that
    something else held for a while: it may fit later (HTTP 503 with Retry-After). `rows`:
    their positions in the call; `vectors`: the call's vectors, NaN in those rows, so that the
    rows of other requests in the call are still served.
    """

    def __init__(self, message: str, rows: list[int], vectors: Any = None):
        super().__init__(message)
        self.message = message
        self.rows = rows
        self.vectors = vectors

    @classmethod
    def of(cls, rows: list[int], vectors: Any = None) -> RowsOutOfMemory:
        return cls(f"{len(rows)} input(s) did not fit in the device's memory even in a forward pass of their "
                   "own; memory held elsewhere for a while may be the cause: retry shortly", rows, vectors)

    def __reduce__(self) -> tuple[type[RowsOutOfMemory], tuple[str, list[int], Any]]:
        return (type(self), (self.message, self.rows, self.vectors))  # survive pickling across Ray actors with all fields
