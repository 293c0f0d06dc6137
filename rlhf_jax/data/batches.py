"""Typed batches: one pytree dataclass per layout, produced by
:meth:`rlhf_jax.data.TokenizedData.collate`; consumers dispatch on the type.

Leaves are ``[B, ...]`` arrays (numpy on the host, ``jax.Array`` once placed); the loader adds
a leading micro-batch axis ``[M, B / M, ...]`` to every leaf, and ``jax.tree.map`` reaches
every array of any layout. An optional field is ``None`` when the data has none (no margins;
reference log-probs not yet computed): ``None`` is not a leaf, so it costs no array.

Layouts:
- :class:`Sequences`: SFT rows (prompt + completion, or packed rows with segments);
- :class:`UnpairedSequences`: sequences with a desirable / undesirable label;
- :class:`StepSequences`: sequences with a label at each reasoning step's last token;
- :class:`Pairs`: a chosen and a rejected sequence per example, each its own padded row;
- :class:`SharedPromptPairs`, :class:`SharedPromptRankings`: one row per example holding its
  prompt once and every response after it (prefix sharing, Wang et al., 2024);
- :class:`Rankings`: ``K`` padded sequences per example, best first.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np


def _count(*masks) -> int:
    return int(sum(np.sum(np.asarray(mask)) for mask in masks))


@flax.struct.dataclass
class Sequences:
    """``input_ids_BT``, ``attention_mask_BT`` (1 on real tokens), ``loss_mask_BT`` (1 on the
    tokens to learn, aligned with ``input_ids_BT``) and -- for packed rows -- ``segment_ids_BT``
    (0 on padding, ``1, 2, ...`` per packed sequence; a token attends only within its segment)."""

    input_ids_BT: np.ndarray
    attention_mask_BT: np.ndarray
    loss_mask_BT: np.ndarray
    segment_ids_BT: np.ndarray | None = None

    def tokens(self) -> int:
        """The real (non-padding) tokens of the batch, on the host."""
        return _count(self.attention_mask_BT)


@flax.struct.dataclass
class UnpairedSequences:
    """Sequences and ``desirable_B`` (bool): the unpaired feedback of KTO (Ethayarajh et al.,
    2024). ``mismatched``: each example's prompt with the completion of the data's next example
    (index + 1, cyclically -- a fixed partner, whatever the batch, so a cached reference pass
    holds), on which KTO estimates its reference point (cut at the batch width when longer). ``reference_logps_BK`` ``[B, 2]``, once a reference model has
    read them: its summed completion log-probs (nats) of each example and of its mismatched row."""

    sequences: Sequences
    desirable_B: np.ndarray
    mismatched: Sequences
    reference_logps_BK: np.ndarray | None = None

    def tokens(self) -> int:
        """The real (non-padding) tokens of the batch, on the host."""
        return self.sequences.tokens()


@flax.struct.dataclass
class StepSequences:
    """Sequences whose responses are reasoning steps: ``step_mask_BT`` is 1 at each step's last
    token, ``step_labels_BT`` holds that step's label in [0, 1] there (0 elsewhere), the data
    of a process reward model (``train.prm``)."""

    sequences: Sequences
    step_labels_BT: np.ndarray
    step_mask_BT: np.ndarray

    def tokens(self) -> int:
        """The real (non-padding) tokens of the batch, on the host."""
        return self.sequences.tokens()


@flax.struct.dataclass
class Pairs:
    """``chosen`` and ``rejected`` :class:`Sequences` of one prompt each (``[B, T]``, the loss
    mask on the response), an optional per-pair ``margin_B`` (Llama 2) and -- once a
    reference model has read them -- ``reference_logps_BK`` ``[B, 2]``, the reference's summed
    response log-probs (nats), chosen then rejected."""

    chosen: Sequences
    rejected: Sequences
    margin_B: np.ndarray | None = None
    reference_logps_BK: np.ndarray | None = None

    def tokens(self) -> int:
        """The real (non-padding) tokens of the batch, on the host."""
        return self.chosen.tokens() + self.rejected.tokens()

    def length_gap_B(self):
        """The chosen response's tokens minus the rejected one's (the prompt is shared, so the
        difference of the whole sequences' lengths)."""
        return self.chosen.attention_mask_BT.sum(-1) - self.rejected.attention_mask_BT.sum(-1)

    def response_lengths_BK(self):
        """``[B, 2]``: the trained (loss-mask) tokens of the chosen and the rejected response."""
        return jnp.stack([self.chosen.loss_mask_BT.sum(-1), self.rejected.loss_mask_BT.sum(-1)], axis=-1)


@flax.struct.dataclass
class SharedPromptResponses:
    """Rows holding a prompt once and its responses after it: ``input_ids_BT``,
    ``attention_mask_BT`` and ``segment_ids_BT`` -- the prompt in segment 0, response ``k``
    (0-based) in segment ``k + 1``, padding with mask 0. Every response attends to the prompt
    and to itself (see ``models.decoder.visibility``), so its log-probs and scores equal those
    of prompt + response alone. The segment convention lives here: consumers take the masks
    below, not the segment numbers."""

    input_ids_BT: np.ndarray
    attention_mask_BT: np.ndarray
    segment_ids_BT: np.ndarray

    @property
    def responses(self) -> int:
        """``K``: the response slots of a row."""
        raise NotImplementedError

    def tokens(self) -> int:
        """The real (non-padding) tokens of the batch, on the host."""
        return _count(self.attention_mask_BT)

    def response_mask_BTK(self):
        """``[B, T, K]`` bool: the tokens of response ``k``."""
        k_K = np.arange(1, self.responses + 1)
        return (self.segment_ids_BT[..., None] == k_K) & (self.attention_mask_BT[..., None] > 0)

    def sequence_mask_BTK(self):
        """``[B, T, K]`` bool: the tokens of prompt + response ``k`` (what a model would read
        of that response alone)."""
        prompt_BT1 = (self.segment_ids_BT == 0)[..., None] & (self.attention_mask_BT[..., None] > 0)
        return prompt_BT1 | self.response_mask_BTK()


@flax.struct.dataclass
class SharedPromptPairs(SharedPromptResponses):
    """:class:`SharedPromptResponses` of two responses, chosen (segment 1) then rejected
    (segment 2), with the optional ``margin_B`` and ``reference_logps_BK`` of :class:`Pairs`."""

    margin_B: np.ndarray | None = None
    reference_logps_BK: np.ndarray | None = None

    @property
    def responses(self) -> int:
        """``K``: the response slots of a row."""
        return 2

    def length_gap_B(self):
        """The chosen response's tokens minus the rejected one's."""
        lengths_BK = self.response_lengths_BK()
        return lengths_BK[..., 0] - lengths_BK[..., 1]

    def response_lengths_BK(self):
        """``[B, 2]``: the tokens of the chosen and the rejected response."""
        return self.response_mask_BTK().sum(-2)


@flax.struct.dataclass
class SharedPromptRankings(SharedPromptResponses):
    """:class:`SharedPromptResponses` of up to ``K`` ranked responses, best first;
    ``valid_BK`` marks the slots that hold one (an empty slot has no tokens)."""

    valid_BK: np.ndarray

    @property
    def responses(self) -> int:
        """``K``: the response slots of a row."""
        return self.valid_BK.shape[-1]


@flax.struct.dataclass
class Rankings:
    """``K`` padded sequences per example, best first: ``input_ids_BKT``,
    ``attention_mask_BKT``; ``valid_BK`` marks the slots that hold a ranked response (a
    ranking shorter than ``K`` fills the rest with copies of its first, marked invalid)."""

    input_ids_BKT: np.ndarray
    attention_mask_BKT: np.ndarray
    valid_BK: np.ndarray

    def tokens(self) -> int:
        """The real (non-padding) tokens of the batch, on the host."""
        return _count(self.attention_mask_BKT)


Batch = Sequences | UnpairedSequences | StepSequences | Pairs | SharedPromptPairs | SharedPromptRankings | Rankings
RankedBatch = Rankings | SharedPromptRankings
PairBatch = Pairs | SharedPromptPairs


def added_fields(before, after) -> dict:
    """The fields ``after`` has that ``before`` lacked (``None`` there): what a pass such as
    the reference's added to a batch. ``{name: value}``."""
    return {name: getattr(after, name) for name in before.__dataclass_fields__
            if getattr(before, name) is None and getattr(after, name) is not None}
