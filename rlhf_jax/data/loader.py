"""A deterministic loader: the batch at step ``k`` is a pure function of (seed, epoch, k).

Epoch ``e`` visits the examples in the order ``permutation(seed, e)``; step ``k`` takes the
``k % steps_per_epoch``-th slice of ``batch_size`` of it. Resuming at step ``k`` needs no
iterator state, and every process computes the same global order and builds only its own
``batch_size / process_count`` rows. The ``n % batch_size`` examples that do not fill a
last batch sit out that epoch (a different set each epoch, since the order is reshuffled).

Batches are padded to the longest sequence in the *global* batch rounded up to a multiple
of ``pad_multiple`` (and at most ``max_length``; a shared-prompt row, which holds a prompt and
all its responses, is not capped), so a run compiles a few shapes, not one per batch, and
every process agrees on the shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from rlhf_jax.data.batches import (Batch, Pairs, Rankings, SharedPromptPairs, SharedPromptRankings, Sequences,
                                   StepSequences, UnpairedSequences)
from rlhf_jax.data.encode import Encoded, EncodedPair, EncodedRanking, EncodedSteps, EncodedUnpaired, prompt_length
from rlhf_jax.data.packing import PackedRows
from rlhf_jax.data.report import DataError


def shared_prompt_length(sequences: Sequence[Encoded]) -> int:
    """The prompt the responses share: the tokens before the first response (loss-mask) token,
    equal in every sequence."""
    prompt = min(prompt_length(seq) for seq in sequences)
    first = sequences[0].ids[:prompt]
    if any(not np.array_equal(seq.ids[:prompt], first) for seq in sequences):
        raise DataError("the responses of a shared-prompt example do not start from the same prompt tokens; "
                        "set data.shared_prompt to false")
    return prompt


def _shared_rows(groups: Sequence[Sequence[Encoded]], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """``(ids, mask, segment_ids)``, one row per group: its shared prompt (segment 0), then each
    response (segment ``k + 1``) after it -- prefix sharing (Wang et al., 2024): the prompt
    runs once instead of once per response. Padding is on the right, segment 0 with mask 0."""
    ids = np.full((len(groups), length), pad_id, np.int32)
    mask = np.zeros((len(groups), length), np.int32)
    segment_ids = np.zeros((len(groups), length), np.int32)
    for row, sequences in enumerate(groups):
        end = prompt = shared_prompt_length(sequences)
        ids[row, :prompt] = sequences[0].ids[:prompt]
        for k, seq in enumerate(sequences, start=1):
            response = seq.ids[prompt:]
            ids[row, end: end + len(response)], segment_ids[row, end: end + len(response)] = response, k
            end += len(response)
        mask[row, :end] = 1
    return ids, mask, segment_ids


def _pad(sequences: Sequence[Encoded], length: int, pad_id: int) -> Sequences:
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    loss_mask = np.zeros((len(sequences), length), np.float32)
    for row, seq in enumerate(sequences):
        n = len(seq.ids)
        ids[row, :n], mask[row, :n], loss_mask[row, :n] = seq.ids, 1, seq.loss_mask
    return Sequences(ids, mask, loss_mask)


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Encoded items of one kind (SFT sequences, packed rows, pairs, rankings or unpaired
    examples) and how to batch them. ``columns``: per-item arrays ``[len(self), ...]`` (e.g.
    cached reference log-probs) that every batch carries in the batch field of their name.
    ``shared_prompt``: pairs and rankings are batched one row per example, the prompt once with
    its responses after it (:class:`SharedPromptPairs`, :class:`SharedPromptRankings`),
    instead of one padded row per response."""

    items: Sequence | PackedRows
    pad_id: int
    max_length: int
    pad_multiple: int = 64
    columns: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    shared_prompt: bool = False

    def __post_init__(self):
        if self.shared_prompt and not isinstance(self.items[0], EncodedPair | EncodedRanking):
            raise DataError(f"data.shared_prompt applies to preference pairs and rankings, not to "
                            f"{type(self.items[0]).__name__} examples; set it to false")

    def with_columns(self, columns: Mapping[str, np.ndarray]) -> TokenizedData:
        for name, values in columns.items():
            if len(values) != len(self):
                raise ValueError(f"column {name} has {len(values)} values for {len(self)} items")
        return dataclasses.replace(self, columns={**self.columns, **columns})

    def __len__(self) -> int:
        return len(self.items.input_ids) if isinstance(self.items, PackedRows) else len(self.items)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        if isinstance(self.items, PackedRows):
            return np.full(len(indices), self.max_length)
        if self.shared_prompt:
            return np.asarray([_shared_length(sequences_of(self.items[i])) for i in indices])
        return np.asarray([max(len(s.ids) for s in sequences_of(self.items[i])) for i in indices])

    def padded_length(self, indices: np.ndarray) -> int:
        longest = int(self.lengths(indices).max())
        rounded = -(-longest // self.pad_multiple) * self.pad_multiple
        return rounded if self.shared_prompt else min(self.max_length, rounded)  # shared rows exceed max_length

    def collate(self, indices: np.ndarray, length: int) -> Batch:
        """The rows ``indices`` as a typed batch (``data.batches``) of arrays ``[len(indices),
        ...]`` padded to ``length``, with the ``columns``' values of those rows."""
        batch = self._collate_items(indices, length)
        return batch.replace(**{name: values[indices] for name, values in self.columns.items()})

    def _collate_items(self, indices: np.ndarray, length: int) -> Batch:
        if isinstance(self.items, PackedRows):
            rows = PackedRows(*(a[indices] for a in self.items))
            return Sequences(rows.input_ids, (rows.segment_ids > 0).astype(np.int32),
                             rows.loss_mask.astype(np.float32), rows.segment_ids)
        items = [self.items[i] for i in indices]
        first = items[0]
        if self.shared_prompt:
            rows = _shared_rows([sequences_of(item) for item in items], length, self.pad_id)
            if isinstance(first, EncodedRanking):
                return SharedPromptRankings(*rows, valid_BK=self._ranking_valid(items))
            return SharedPromptPairs(*rows, margin_B=_margins(items))
        if isinstance(first, Encoded):
            return _pad(items, length, self.pad_id)
        if isinstance(first, EncodedPair):
            return Pairs(_pad([p.chosen for p in items], length, self.pad_id),
                         _pad([p.rejected for p in items], length, self.pad_id), margin_B=_margins(items))
        if isinstance(first, EncodedUnpaired):
            sequences = [u.sequence for u in items]
            partners = [self.items[(i + 1) % len(self.items)].sequence for i in indices]
            return UnpairedSequences(_pad(sequences, length, self.pad_id), np.asarray([u.desirable for u in items]),
                                     _pad(_mismatched(sequences, partners, length), length, self.pad_id))
        if isinstance(first, EncodedSteps):
            labels, mask = np.zeros((len(items), length), np.float32), np.zeros((len(items), length), np.float32)
            for row, item in enumerate(items):
                inside = item.step_ends < length
                labels[row, item.step_ends[inside]], mask[row, item.step_ends[inside]] = item.labels[inside], 1.0
            return StepSequences(_pad([item.sequence for item in items], length, self.pad_id), labels, mask)
        if isinstance(first, EncodedRanking):
            k = self.ranking_width
            flat = _pad([r.sequences[j] if j < len(r.sequences) else r.sequences[0] for r in items for j in range(k)],
                        length, self.pad_id)
            return Rankings(flat.input_ids_BT.reshape(len(items), k, length),
                            flat.attention_mask_BT.reshape(len(items), k, length), self._ranking_valid(items))
        raise TypeError(f"cannot batch {type(first).__name__}")

    @functools.cached_property
    def ranking_width(self) -> int:
        """``K``: the most responses any ranking of the data has (every batch has ``K`` slots)."""
        return max(len(r.sequences) for r in self.items)

    def _ranking_valid(self, rankings: Sequence[EncodedRanking]) -> np.ndarray:
        """``[b, K]``: which of the ``K`` slots hold a ranked response (best first)."""
        return np.arange(self.ranking_width)[None, :] < np.asarray([len(r.sequences) for r in rankings])[:, None]


def _margins(pairs: Sequence[EncodedPair]) -> np.ndarray | None:
    """``[b]`` margins when any pair has one (0 for those without), else None."""
    if not any(p.margin is not None for p in pairs):
        return None
    return np.asarray([p.margin or 0.0 for p in pairs], np.float32)


def _mismatched(sequences: Sequence[Encoded], partners: Sequence[Encoded], length: int) -> list[Encoded]:
    """Each sequence's prompt with its partner's completion, cut at ``length`` tokens: the
    mismatched pairs of KTO's reference point."""
    out = []
    for seq, other in zip(sequences, partners, strict=True):
        prompt, start = seq.ids[:prompt_length(seq)], prompt_length(other)
        ids = np.concatenate([prompt, other.ids[start:]])[:length]
        loss_mask = np.concatenate([np.zeros(len(prompt), other.loss_mask.dtype), other.loss_mask[start:]])[:length]
        out.append(Encoded(ids, loss_mask))
    return out


def _shared_length(sequences: Sequence[Encoded]) -> int:
    prompt = shared_prompt_length(sequences)
    return prompt + sum(len(seq.ids) - prompt for seq in sequences)


def sequences_of(item) -> tuple[Encoded, ...]:
    """The encoded sequences of one example: one for SFT and unpaired rows, chosen and
    rejected of a pair, every response of a ranking."""
    if isinstance(item, Encoded):
        return (item,)
    if isinstance(item, EncodedPair):
        return item.chosen, item.rejected
    if isinstance(item, EncodedUnpaired | EncodedSteps):
        return (item.sequence,)
    return item.sequences


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The example indices of step ``step``: epoch ``step // (n // batch_size)`` visits the
    examples in the order ``permutation(seed, epoch)``, a slice of ``batch_size`` per step."""
    epoch, k = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * batch_size: (k + 1) * batch_size]


@dataclasses.dataclass(frozen=True)
class Loader:
    data: TokenizedData
    batch_size: int  # global, across processes
    micro_batches: int = 1
    seed: int = 0
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.batch_size % (self.micro_batches * self.process_count):
            raise DataError(f"batch_size={self.batch_size} must divide into micro_batches={self.micro_batches} "
                            f"x processes={self.process_count}")
        if len(self.data) < self.batch_size:
            raise DataError(f"the data has {len(self.data)} examples (rows), fewer than batch_size={self.batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def global_indices(self, step: int) -> np.ndarray:
        """The example indices of step ``step``'s global batch."""
        return batch_indices(self.seed, step, len(self.data), self.batch_size)

    def batch(self, step: int) -> Batch:
        """This process's rows of step ``step``, each leaf ``[micro_batches, rows / micro_batches, ...]``."""
        indices = self.global_indices(step)
        length = self.data.padded_length(indices)
        share = len(indices) // self.process_count
        mine = indices[self.process_index * share: (self.process_index + 1) * share]
        m = self.micro_batches
        return jax.tree.map(lambda a: a.reshape(m, share // m, *a.shape[1:]), self.data.collate(mine, length))
