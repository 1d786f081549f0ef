"""Request classes: every request is interactive (a person waits) or batch (indexing).

The class decides the order of work at every stage where work waits (the Ingress's coalescing,
the Embedder's batch queues, the engine's next forward pass) and which requests are shed first
under overload. It never changes a vector. Users write it as `priority` (the request field, a
key's default and the app's `args.priority`); the code calls it a request class throughout.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from serve_app.engine.scheduling import RequestClass

INTERACTIVE = RequestClass.INTERACTIVE
BATCH = RequestClass.BATCH

# The `priority` field as clients write it; published inline (not as a $ref) in /openapi.json.
PriorityField = Annotated[RequestClass, WithJsonSchema({"enum": [c.value for c in RequestClass], "type": "string"})]


class RequestClassPolicy(BaseModel):
    """`args.priority` of the app."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        description="false: one first-come-first-served path for every request (everything runs "
        "as interactive work, with the interactive pass size).",
    )
    interactive_max_inputs: int = Field(
        default=4, gt=0, description="A request with at most this many inputs and tokens is interactive."
    )
    interactive_max_tokens: int = Field(
        default=4096, gt=0, description="... and at most this many tokens (instructions and special tokens included)."
    )

    def declared(self, requested: RequestClass | None, key_default: RequestClass | None,
                 is_query: bool) -> RequestClass | None:
        """The class a request has whatever its size, in order: every request's when classes
        are off, its own `priority` field, its API key's default, a query's (input_type query or
        an instruction). None: its size decides (see classify)."""
        if not self.enabled:
            return INTERACTIVE
        if requested is not None:
            return requested
        if key_default is not None:
            return key_default
        return INTERACTIVE if is_query else None

    def classify(self, declared: RequestClass | None, n_inputs: int, n_tokens: int) -> RequestClass:
        """The class of one request, once its tokens are counted: a small one is interactive."""
        if declared is not None:
            return declared
        small = n_inputs <= self.interactive_max_inputs and n_tokens <= self.interactive_max_tokens
        return INTERACTIVE if small else BATCH

    def asks_interactive(self, declared: RequestClass | None, n_inputs: int) -> bool:
        """Before tokenizing: whether the request may run as interactive work, as far as what it
        declares and its input count tell. Decides where it is tokenized and whether it may use
        the interactive reserve of the in-flight budget; its class is decided by classify."""
        return declared == INTERACTIVE or (declared is None and n_inputs <= self.interactive_max_inputs)
