"""Errors the engine reports about a client's input (mapped to HTTP 400 by the API layer)."""


class InputError(ValueError):
    """An input the model cannot take; `param` names the offending field, OpenAI-style."""

    def __init__(self, message: str, param: str | None = "input", code: str | None = "invalid_input"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):  # survive pickling across Ray actors with all fields
        return (type(self), (self.message, self.param, self.code))
