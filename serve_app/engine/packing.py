"""Padding-free passes: several sequences per row, kept apart by their position ids.

transformers (5.x, `masking_utils.find_packed_sequence_indices`) reads a row whose position ids
restart at 0 as several packed sequences, when no attention mask and no cache are passed, and
builds the block-diagonal causal mask itself (sdpa, eager and flex_attention alike). Decoder
models (Mistral, Llama, Qwen2, ...) build their masks that way, and under transformers 5.25 so do
BERT-style encoders (MiniLM); others, such as RoBERTa, build a mask that ignores position ids, so
their rows would attend across sequences: `supports_packing` checks a model before the engine
packs for it.
"""

from __future__ import annotations

import torch

from .batching import PackedPass


def pack_inputs_and_spans(batch: PackedPass, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, position ids and, per sequence, its (flat) start and length.

    `rows` are the sequences in `batch.indices` order. A row's slack after its last sequence
    gets positions restarting at 0 too, so it reads as one more sequence that nobody pools.
    """
    n_rows, width = len(batch.rows), batch.width
    ids = torch.zeros((n_rows, width), dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    starts, lengths = [], []
    sequences = iter(rows)
    for r, members in enumerate(batch.rows):
        offset = 0
        for _ in members:
            seq = next(sequences)
            ids[r, offset : offset + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            positions[r, offset : offset + len(seq)] = torch.arange(len(seq))
            starts.append(r * width + offset)
            lengths.append(len(seq))
            offset += len(seq)
        positions[r, offset:] = torch.arange(width - offset)
    return ids, positions, torch.as_tensor([starts, lengths], dtype=torch.long)


def pool_packed(hidden: torch.Tensor, spans: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool each packed sequence in float32: `spans` is [starts, lengths] of flat positions."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    starts, lengths = spans[0], spans[1]
    if mode == "last_token":
        return flat[starts + lengths - 1].float()
    if mode == "cls":
        return flat[starts].float()
    if mode == "mean":
        owner = torch.repeat_interleave(torch.arange(len(starts), device=flat.device), lengths)
        tokens = torch.cat([torch.arange(s, s + n, device=flat.device) for s, n in spans.T.tolist()])
        sums = torch.zeros((len(starts), flat.shape[-1]), dtype=torch.float32, device=flat.device)
        sums.index_add_(0, owner, flat[tokens].float())
        return sums / lengths.unsqueeze(1).to(torch.float32)
    raise ValueError(f"unknown pooling mode {mode!r}")


@torch.inference_mode()
def supports_packing(model: torch.nn.Module, device: str) -> bool:
    """Does `model` keep packed sequences apart? Two sequences packed in one row must give the
    hidden states they give alone; a model that attends across them changes the second one."""
    first, second = [5, 9, 13, 17, 21, 25, 29, 33], [7, 11, 15]
    row = torch.tensor([first + second], device=device)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    try:
        packed = model(input_ids=row, position_ids=positions, use_cache=False).last_hidden_state[0]
        alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).last_hidden_state[0]
    except (TypeError, ValueError):  # a model that takes no position ids (or no use_cache)
        return False
    packed, alone = packed[len(first) :].float(), alone.float()
    return bool(torch.nn.functional.cosine_similarity(packed, alone, dim=-1).min() > 0.999)
