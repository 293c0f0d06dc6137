"""Data: local files and ``datasets`` -> typed examples -> token ids with loss masks ->
deterministic, resumable batches. Nothing is dropped silently: see :class:`DataReport`."""

from rlhf_jax.data.batches import (
    Batch,
    PairBatch,
    Pairs,
    RankedBatch,
    Rankings,
    Sequences,
    SharedPromptPairs,
    SharedPromptRankings,
    SharedPromptResponses,
    StepSequences,
    UnpairedSequences,
    added_fields,
)
from rlhf_jax.data.dataset import DataConfig, load_data
from rlhf_jax.data.encode import (TRUNCATION, Encoded, EncodedPair, EncodedRanking, EncodedSteps, EncodedUnpaired, Encoder,
                                  encode_examples)
from rlhf_jax.data.formats import (
    FORMATS,
    Conversation,
    DataFormat,
    MalformedRow,
    Preference,
    Prompt,
    PromptCompletion,
    Ranking,
    Steps,
    Unpaired,
    load_examples,
    parse_row,
    register_format,
)
from rlhf_jax.data.hh_rlhf import split_dialogues
from rlhf_jax.data.loader import Loader, TokenizedData, batch_indices
from rlhf_jax.data.packing import PackedRows, pack
from rlhf_jax.data.report import DataError, DataReport
from rlhf_jax.data.tokenizer import BUILTIN_BYTES, byte_tokenizer, has_tokenizer, load_tokenizer

__all__ = [
    "Batch", "PairBatch", "Pairs", "RankedBatch", "Rankings", "Sequences", "SharedPromptPairs", "SharedPromptRankings",
    "SharedPromptResponses", "StepSequences", "UnpairedSequences", "added_fields",
    "BUILTIN_BYTES", "FORMATS", "DataFormat", "register_format", "TRUNCATION", "Conversation", "DataConfig", "DataError", "DataReport", "Encoded",
    "EncodedPair", "EncodedRanking", "EncodedSteps", "EncodedUnpaired", "Encoder", "encode_examples", "Loader", "MalformedRow", "PackedRows",
    "Preference", "Prompt", "PromptCompletion", "Ranking", "Steps", "TokenizedData", "Unpaired", "batch_indices", "byte_tokenizer", "has_tokenizer", "load_data",
    "load_examples", "load_tokenizer", "pack", "parse_row", "split_dialogues",
]
