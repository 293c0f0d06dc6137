"""Hugging Face tensor names <-> attribute paths in this library's models: the record and the
row builders the families (:mod:`rlhf_jax.models.families`) write their tables with.

Torch ``nn.Linear`` stores weights ``[out, in]`` and flax ``[in, out]`` (``transpose``);
GPT-2's ``Conv1D`` already stores ``[in, out]`` and fuses q, k and v into one ``c_attn``
tensor, which maps to several paths (split evenly on the last flax axis).
"""

from __future__ import annotations

import dataclasses

HEADS = ("lm", "score", "base")

Row = tuple[str, tuple[tuple, ...], bool]  # (Hugging Face name, our attribute paths, transpose)


@dataclasses.dataclass(frozen=True)
class TensorName:
    """One checkpoint tensor and the attribute path(s) it fills in our model."""
    hf: str  # full name in a checkpoint of the head's class, base-model prefix included
    paths: tuple[tuple, ...]  # attribute paths in our model; several = concatenated on the last axis
    transpose: bool
    prefix: str = ""  # the base-model prefix, absent from checkpoints saved from the base model


def entries(prefix: str, ours: tuple, rows: list[Row]) -> list[TensorName]:
    """``rows`` as :class:`TensorName` records: Hugging Face names under ``prefix``, our paths
    under ``ours``."""
    return [TensorName(prefix + hf, tuple(ours + p for p in paths), t, prefix) for hf, paths, t in rows]


def linear_rows(hf: str, ours: tuple, bias: bool, transpose: bool = True) -> list[Row]:
    """A linear layer's weight (and bias) rows."""
    rows = [(f"{hf}.weight", (ours + ("kernel",),), transpose)]
    return rows + ([(f"{hf}.bias", (ours + ("bias",),), False)] if bias else [])


def norm_rows(hf: str, ours: str, with_bias: bool) -> list[Row]:
    """A norm's scale (and bias) rows."""
    rows = [(f"{hf}.weight", ((ours, "scale"),), False)]
    return rows + ([(f"{hf}.bias", ((ours, "bias"),), False)] if with_bias else [])


def under(ours: tuple, rows: list[Row]) -> list[Row]:
    """``rows`` with our paths moved under ``ours`` (a layer's rows under ``("layers", i)``)."""
    return [(n, tuple(ours + p for p in paths), t) for n, paths, t in rows]


def decoder_heads(tie_word_embeddings: bool, head: str) -> list[TensorName]:
    """The rows a decoder's head adds: ``lm_head`` (unless tied to the embeddings) or ``score``."""
    if head == "lm" and not tie_word_embeddings:
        return entries("", (), linear_rows("lm_head", ("lm_head",), False))
    if head == "score":
        return entries("", (), linear_rows("score", ("score",), False))
    return []
