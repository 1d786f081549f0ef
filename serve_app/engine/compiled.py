"""A compiled forward: the model's repeated layer compiled once and reused by every layer.

Regional compilation (PyTorch's recipe, what transformers and accelerate call it): the decoder
layers of a model are instances of one class running one `forward`, so one `torch.compile` of
a function that takes the layer as an argument traces one graph, whose parameters are inputs,
and every layer runs it. Start-up compiles one layer, not the whole model.

Shapes: the layer is compiled with dynamic shapes, so new pass shapes do not recompile (torch
specialises a dimension of size 1 once, so a one-row pass compiles a second graph). Passes are
still bucketed (`pass_shape`): on CUDA, small passes to powers of two, so that CUDA graphs
(recorded per shape) stay a bounded set that the warm-up records before the replica is ready;
other passes to a multiple of 16 tokens wide, the tensor cores' alignment, for at most 15
tokens of padding per row.

CUDA graphs (mode="reduce-overhead") run small passes on CUDA only: they replay a recorded
pass with one launch instead of a launch per kernel, which matters where kernels are short
(a query pass); large passes are bound by their matmuls, and a graph per large shape would
keep that shape's activations allocated.
"""

from __future__ import annotations

import types
from typing import Any

import torch

# Passes of at most this many padded tokens run as CUDA graphs (on CUDA), in power-of-two shapes.
GRAPH_MAX_TOKENS = 2048
# The narrowest and widest rows of a CUDA-graph pass: shorter rows pad to the least width.
GRAPH_WIDTHS = (16, 512)
# Rows of larger passes pad to a multiple of this many tokens.
WIDTH_ALIGNMENT = 16


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _aligned(width: int) -> int:
    return -(-width // WIDTH_ALIGNMENT) * WIDTH_ALIGNMENT


def pass_shape(rows: int, width: int, max_width: int | None = None, graphs: bool = True) -> tuple[int, int]:
    """The (rows, width) a pass of `rows` rows of `width` tokens runs as, when compiled: with
    `graphs`, a CUDA-graph shape (powers of two) where one holds it, else `width` aligned (without
    CUDA graphs, padding small passes to powers of two would only cost compute); never wider than
    `max_width` (the model's longest input) unless `width` is, never fewer rows or narrower."""
    limit = max(width, max_width) if max_width else float("inf")
    graph = next_power_of_two(rows), max(GRAPH_WIDTHS[0], next_power_of_two(width))
    if graphs and graph[1] <= min(GRAPH_WIDTHS[1], limit) and graph[0] * graph[1] <= GRAPH_MAX_TOKENS:
        return graph
    return rows, int(min(_aligned(width), limit))


def graph_shapes(max_width: int | None = None) -> list[tuple[int, int]]:
    """Every CUDA-graph pass shape (what the warm-up records): power-of-two rows and widths."""
    widths = [w for w in (GRAPH_WIDTHS[0] << k for k in range(8)) if w <= GRAPH_WIDTHS[1]]
    return [(rows, width) for width in widths if max_width is None or width <= max_width
            for rows in (1 << k for k in range(12)) if rows * width <= GRAPH_MAX_TOKENS]


def repeated_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of identical layers: the longest ModuleList whose members share a class
    (Mistral's `layers`, BERT's `encoder.layer`; found inside a PeftModel's wrappers too)."""
    stacks = [
        module for module in model.modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1
        and len({type(layer) for layer in module}) == 1
    ]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of repeated layers to compile")
    return max(stacks, key=len)


def _call_layer(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The layer is an argument, not the compiled function's `self`: one graph serves every layer.
    return type(layer).forward(layer, *args, **kwargs)


def _call_layer_in_graphs(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    # A function of its own: torch keeps compiled graphs per function, and the CUDA-graph ones
    # must not take the plain ones' places (or count against their recompile limit).
    return type(layer).forward(layer, *args, **kwargs)


def compile_layers(model: torch.nn.Module, cuda_graphs: bool, max_width: int | None = None) -> None:
    """Compile the model's repeated layer in place; `cuda_graphs`: passes of a graph_shapes()
    shape run as CUDA graphs (mode="reduce-overhead"), the others as the compiled layer."""
    # Each model a process compiles adds a graph or two (its layer, and one-row passes); the
    # default limit (8) would quietly run a further model eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(_call_layer, dynamic=True)
    graphed = torch.compile(_call_layer_in_graphs, dynamic=True, mode="reduce-overhead") if cuda_graphs else None
    small_shapes = frozenset(graph_shapes(max_width)) if cuda_graphs else frozenset()

    def forward(layer: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        small = graphed is not None and tuple(hidden_states.shape[:2]) in small_shapes
        return (graphed if graphed is not None and small else compiled)(layer, hidden_states, *args, **kwargs)

    for layer in repeated_layers(model):
        layer.forward = types.MethodType(forward, layer)


def begin_pass(cuda_graphs: bool) -> None:
    """Before each pass with CUDA graphs: the previous pass's outputs were copied out, so the
    graphs may reuse their memory (without this, torch cannot tell a new pass from a replay)."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
