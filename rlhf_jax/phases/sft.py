"""SFT phase: next-token loss on completions / assistant turns; held-out loss and perplexity."""

from __future__ import annotations

import functools

import numpy as np

from rlhf_jax.data.formats import Conversation, PromptCompletion
from rlhf_jax.phases.config import SFTConfig
from rlhf_jax.train.sft import sft_loss_sums, token_nll_rows


class SFTPhase:
    name = "sft"
    summary = "supervised fine-tuning on demonstrations"
    checkpoint_fields = ("model.path",)
    examples = (PromptCompletion, Conversation)  # the rows it trains on: every data.format that yields them
    head = "lm"
    pipeline_role = "start"  # its place in the pipeline (phases.commands.Role)
    config_cls = SFTConfig
    samples = True  # sample completions for held-out prompts at the end

    def loss_fn(self, config: SFTConfig, reference):
        return functools.partial(sft_loss_sums, vocab_chunk=config.train.vocab_chunk)

    def eval_rows(self, config: SFTConfig, model, reference, batch) -> dict:
        """Per row: summed negative log-likelihood of the trained tokens, and their count."""
        nll_B, tokens_B = token_nll_rows(model, batch, vocab_chunk=config.train.vocab_chunk)
        return {"nll": nll_B, "tokens": tokens_B}

    def summarise(self, config: SFTConfig, rows: dict[str, np.ndarray]) -> dict:
        loss = rows["nll"].sum() / max(rows["tokens"].sum(), 1.0)
        return {"loss": float(loss), "perplexity": float(np.exp(loss)), "tokens": float(rows["tokens"].sum())}
