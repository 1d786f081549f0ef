"""Planning forward passes: group sequences so that padding stays small and memory bounded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatch:
    indices: list[int]  # positions in the caller's list, longest first
    width: int  # padded length of every row

    @property
    def padded_tokens(self) -> int:
        return self.width * len(self.indices)


def plan_micro_batches(
    lengths: list[int], max_tokens: int, max_rows: int = 512, max_stretch: float = 1.5
) -> list[MicroBatch]:
    """Sort by length and cut greedily so no micro-batch exceeds `max_tokens` padded tokens.

    Sorting first means each row is padded only to the longest of its neighbours in length,
    not to the longest of the whole batch (which is what FIFO batching pays for). A batch is
    also cut where the next row is more than `max_stretch` times shorter than its widest row,
    once the batch is big enough (an eighth of the budget) to keep the device busy on its own.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    batches: list[MicroBatch] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        full = width * (len(current) + 1) > max_tokens or len(current) >= max_rows
        wasteful = width > max_stretch * lengths[index] and width * len(current) >= max_tokens // 8
        if current and (full or wasteful):
            batches.append(MicroBatch(current, lengths[current[0]]))
            current = []
        current.append(index)
    if current:
        batches.append(MicroBatch(current, lengths[current[0]]))
    return batches


def padding_ratio(lengths: list[int], batches: Sequence[MicroBatch | PackedPass]) -> float:
    """Share of computed tokens that were padding (0.0 = none)."""
    padded = sum(batch.padded_tokens for batch in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0


@dataclass(frozen=True)
class PackedPass:
    """Sequences packed without padding: each row holds several, end to end."""

    rows: list[list[int]]  # per row, positions in the caller's list, in the order packed
    width: int  # length of every row (the fullest row; the others end in slack)

    @property
    def indices(self) -> list[int]:
        return [index for row in self.rows for index in row]

    @property
    def padded_tokens(self) -> int:
        return self.width * len(self.rows)


def plan_packed_passes(lengths: list[int], max_tokens: int, max_rows: int = 512) -> list[PackedPass]:
    """Pack sequences into rows as wide as the longest one, then rows into passes of `max_tokens`.

    First-fit decreasing: each sequence, longest first, goes into the first row it fits, so
    rows end with little slack. Rows no wider than the longest sequence keep each row's
    attention (a dense mask under sdpa: width² per row) no costlier than that sequence's own.
    """
    if not lengths:
        return []
    capacity = max(lengths)
    rows: list[list[int]] = []
    fill: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        row = next((r for r, used in enumerate(fill) if used + lengths[index] <= capacity), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(index)
        fill[row] += lengths[index]
    # Rows into passes as sequences into padded micro-batches, fullest first (no stretch cut:
    # rows are all about as full).
    return [
        PackedPass([rows[r] for r in batch.indices], batch.width)
        for batch in plan_micro_batches(fill, max_tokens, max_rows, max_stretch=float("inf"))
    ]


# plan_micro_batches or plan_packed_passes.
Planner = Callable[[list[int], int], Sequence[MicroBatch | PackedPass]]


def plan_per_group(
    planner: Planner, lengths: list[int], max_tokens: int, groups: list[list[int]]
) -> list[MicroBatch | PackedPass]:
    """`planner`'s passes for each group of positions on its own, so that no pass mixes groups
    (e.g. sequences of different adapters), numbered as positions in `lengths`."""
    passes: list[MicroBatch | PackedPass] = []
    for group in groups:
        for p in planner([lengths[i] for i in group], max_tokens):
            if isinstance(p, PackedPass):
                passes.append(PackedPass([[group[i] for i in row] for row in p.rows], p.width))
            else:
                passes.append(MicroBatch([group[i] for i in p.indices], p.width))
    return passes
