"""Shape buckets: pad prompt and completion lengths up to a few fixed sizes so that a run
compiles a handful of programs instead of one per batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bucket_length(length: int, buckets: Sequence[int], what: str = "length") -> int:
    """The smallest bucket ``>= length``; an error naming the largest bucket when none fits."""
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(f"{what} {length} exceeds the largest bucket {max(buckets)}; add a larger bucket")
    return fitting[0]


def left_pad_to(ids_BP: np.ndarray, mask_BP: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad (or drop leading all-padding columns) so the prompts are ``length`` wide; real
    tokens are never dropped."""
    real = int(mask_BP.sum(1).max())
    if real > length:
        raise ValueError(f"a prompt has {real} real tokens, more than the bucket {length}")
    width = ids_BP.shape[1]
    if width >= length:  # only leading columns that are padding in every row go
        if mask_BP[:, : width - length].any():
            raise ValueError("prompts must be left-padded: real tokens found before the last "
                             f"{length} columns")
        return ids_BP[:, width - length :], mask_BP[:, width - length :]
    pad = ((0, 0), (length - width, 0))
    return np.pad(ids_BP, pad, constant_values=pad_id), np.pad(mask_BP, pad)
