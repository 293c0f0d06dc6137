"""Packing for SFT: several examples per row, kept apart by segment ids.

Rows are filled best-fit-decreasing (longest example first, into the row whose free space
fits it most tightly), which wastes little space and is deterministic. ``segment_ids`` is
1, 2, ... per example within a row and 0 on padding; the model's attention and positions
follow it, so no token sees another example. The first token of each segment has no
context within its segment, so its loss-mask entry is cleared."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from rlhf_jax.data.encode import Encoded


class PackedRows(NamedTuple):
    input_ids: np.ndarray  # [R, L] int32
    loss_mask: np.ndarray  # [R, L] bool
    segment_ids: np.ndarray  # [R, L] int32, 0 = padding


def pack(sequences: Sequence[Encoded], length: int, pad_id: int) -> PackedRows:
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i].ids), i))
    rows: list[list[int]] = []
    free_rows: dict[int, list[int]] = {}  # free space -> rows with exactly that much, in creation order
    for i in order:
        need = len(sequences[i].ids)
        if need > length:
            raise ValueError(f"example {i} has {need} tokens, more than the packed row length {length}")
        space = next((s for s in range(need, length + 1) if free_rows.get(s)), None)
        if space is None:
            rows.append([])
            row, space = len(rows) - 1, length
        else:
            row = free_rows[space].pop(0)
        rows[row].append(i)
        free_rows.setdefault(space - need, []).append(row)
    ids = np.full((len(rows), length), pad_id, np.int32)
    loss_mask = np.zeros((len(rows), length), bool)
    segment_ids = np.zeros((len(rows), length), np.int32)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            seq = sequences[i]
            end = start + len(seq.ids)
            ids[r, start:end], loss_mask[r, start:end], segment_ids[r, start:end] = seq.ids, seq.loss_mask, segment
            loss_mask[r, start] = False
            start = end
    return PackedRows(ids, loss_mask, segment_ids)
