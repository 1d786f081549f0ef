"""Request classes: every request is interactive (a person waits) or batch (indexing).

The class decides the order of work at every stage where work waits (the Ingress's coalescing,
the Embedder's batch queues, the engine's next forward pass) and which requests are shed first
under overload. It never changes a vector.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RequestClass = Literal["interactive", "batch"]
INTERACTIVE: RequestClass = "interactive"
BATCH: RequestClass = "batch"


class PriorityPolicy(BaseModel):
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


def classify(
    policy: PriorityPolicy,
    requested: RequestClass | None,
    key_default: RequestClass | None,
    is_query: bool,
    n_inputs: int,
    n_tokens: int | None,
) -> RequestClass:
    """The class of one request; `n_tokens` None means not tokenized yet (a provisional answer).

    In order: the request's own `priority` field, its API key's default, a query (input_type
    query or an instruction), a small request; everything else is batch.
    """
    if not policy.enabled:
        return INTERACTIVE
    if requested is not None:
        return requested
    if key_default is not None:
        return key_default
    if is_query:
        return INTERACTIVE
    small = n_inputs <= policy.interactive_max_inputs and (n_tokens or 0) <= policy.interactive_max_tokens
    return INTERACTIVE if small else BATCH
