"""From a data config to tokenized training (and held-out) data, with its report."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from rlhf_jax.config import at_least
from rlhf_jax.data.encode import TRUNCATION, Encoder, EncodedUnpaired, encode_examples
from rlhf_jax.data.formats import FORMATS, ON_MALFORMED, compares_responses, load_examples
from rlhf_jax.data.loader import TokenizedData
from rlhf_jax.data.packing import pack
from rlhf_jax.data.report import DataError, DataReport
from rlhf_jax.data.tokenizer import renders_prompts


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str  # a local .json/.jsonl/.parquet file (optionally .gz) or a datasets name
    format: str  # a name of data.formats.FORMATS: prompt_completion, alpaca, messages, preference, hh_rlhf, ...
    # a datasets name's split; a slice of it, or of a local file's rows, in datasets' syntax: train[:90%]
    split: str = "train"
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # our field -> the row's column
    max_length: int = 512
    max_prompt_length: int | None = None
    truncation: str = "truncate"  # truncate | drop | error (see rlhf_jax.data.encode)
    on_malformed: str = "error"  # error | skip (counted)
    append_eos: bool = True
    pack: bool = False  # SFT only: several examples per row, with segment ids
    # RM / DPO: a pair's (ranking's) prompt runs once, its responses after it. auto: on for pairs and
    # rankings (the phases also turn it off for an encoder reward model: phases.config.resolved_shared_prompt)
    shared_prompt: bool | Literal["auto"] = "auto"
    # auto: prompts render through the tokenizer's chat template when it has one (data.formats); never: plain text
    chat_template: Literal["auto", "never"] = "auto"
    pad_multiple: int = 64  # batches are padded to a multiple of this (a few compiled shapes)
    eval_source: str | None = None  # held-out data; else eval_size rows are held out of source
    eval_size: int = 0
    limit: int | None = None  # use only the first `limit` rows of source (quick runs)

    def __post_init__(self):
        for name, value, choices in (("format", self.format, FORMATS), ("truncation", self.truncation, TRUNCATION),
                                     ("on_malformed", self.on_malformed, ON_MALFORMED)):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
        fields = FORMATS[self.format].fields
        unknown = sorted(set(self.columns) - set(fields))
        if unknown:
            raise ValueError(f"columns: {unknown[0]!r} is not a field of the {self.format} format; it reads "
                             f"{', '.join(fields)} (columns maps each to the row's column name)")
        at_least(2, max_length=self.max_length)  # room for a prompt token and a response token
        at_least(1, max_prompt_length=self.max_prompt_length, pad_multiple=self.pad_multiple, limit=self.limit)
        at_least(0, eval_size=self.eval_size)
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} leaves no room for a response within "
                             f"max_length={self.max_length}; make it at most {self.max_length - 1}")


def _tokenize(rows, encoder, report, config: DataConfig, pad_id: int) -> TokenizedData:
    encoded = encode_examples(rows, encoder, report)
    if not encoded:
        raise DataError(f"{report.source}: every example was dropped ({report.summary()})")
    _warn_one_sided(encoded, report)
    items = pack(encoded, config.max_length, pad_id) if config.pack else encoded
    shared = config.shared_prompt is True or (config.shared_prompt == "auto" and compares_responses(config.format))
    return TokenizedData(items, pad_id=pad_id, max_length=config.max_length, pad_multiple=config.pad_multiple,
                         shared_prompt=shared)


def _warn_one_sided(encoded: list, report: DataReport) -> None:
    """Unpaired examples (KTO's) that are all desirable or all undesirable train one side only:
    the loss then only raises (or lowers) their likelihood against the reference point, with
    no contrast (Ethayarajh et al., 2024, keep both kinds, weighted to a ratio near 1-4/3)."""
    labels = [e.desirable for e in encoded if isinstance(e, EncodedUnpaired)]
    if labels and len(set(labels)) == 1:
        side, other = ("desirable", "undesirable") if labels[0] else ("undesirable", "desirable")
        report.warnings.append(f"all {len(labels)} examples are {side}: nothing {other} to contrast them with; add "
                               f"{other} rows (label: {str(not labels[0]).lower()}) or use SFT")


def read_split(config: DataConfig) -> tuple[list, list | None, list[DataReport]]:
    """``(train examples, held-out examples or None, reports)``, untokenized. Held-out rows
    drawn from ``source`` are a fixed pseudo-random choice (independent of the run's seed),
    so they never leak into training."""
    report = DataReport(config.source)
    rows, report = load_examples(config.source, config.format, columns=config.columns, split=config.split,
                                 on_malformed=config.on_malformed, report=report)
    rows = rows[: config.limit] if config.limit is not None else rows
    eval_rows, reports = None, [report]
    if config.eval_source is not None:
        eval_report = DataReport(config.eval_source)
        eval_rows, eval_report = load_examples(config.eval_source, config.format, columns=config.columns,
                                               split=config.split.split("[")[0], on_malformed=config.on_malformed, report=eval_report)
        reports.append(eval_report)
    elif config.eval_size:
        if config.eval_size >= len(rows):
            raise DataError(f"eval_size={config.eval_size} leaves no training rows out of {len(rows)}")
        held = set(np.random.default_rng(0).permutation(len(rows))[: config.eval_size].tolist())
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
        report.held_out = len(eval_rows)
        reports.append(DataReport(f"{config.source} (held out)", rows=len(eval_rows)))
    return rows, eval_rows, reports


def load_data(config: DataConfig, tokenizer, *,
              keep_responses: bool = False) -> tuple[TokenizedData, TokenizedData | None, list[DataReport]]:
    """``(train, held_out or None, reports)``: :func:`read_split`, then tokenized
    (``keep_responses``: reward-model inputs, see ``data.encode``)."""
    encoder = Encoder(tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                      truncation=config.truncation, append_eos=config.append_eos,
                      chat_template=renders_prompts(tokenizer, config.chat_template), keep_responses=keep_responses)
    rows, eval_rows, reports = read_split(config)
    pad_id = tokenizer.pad_token_id
    train = _tokenize(rows, encoder, reports[0], config, pad_id)
    held_out = None if eval_rows is None else _tokenize(eval_rows, encoder, reports[1], config, pad_id)
    return train, held_out, reports
