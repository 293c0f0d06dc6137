"""Training: the immutable :class:`TrainState`, the optimiser from config, one shared
accumulate-and-update step, and each phase's objective -- the model's forward plus a pure loss
of ``rlhf_jax.losses`` with per-example values -- as sums over its units (tokens, pairs,
rankings)."""

from rlhf_jax.train.dpo import add_reference_logps, dpo_loss_sums, reference_logps, response_logps
from rlhf_jax.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from rlhf_jax.train.rm import pair_scores, ranking_loss_sums, ranking_scores, rm_loss_sums
from rlhf_jax.train.sft import perplexity, sft_loss_sums, token_nll_rows
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import apply_gradients, jit_train_step, make_train_step

__all__ = [
    "OptimizerConfig",
    "apply_gradients",
    "TrainState",
    "add_reference_logps",
    "dpo_loss_sums",
    "jit_train_step",
    "learning_rate_schedule",
    "make_optimizer",
    "make_train_step",
    "pair_scores",
    "perplexity",
    "ranking_loss_sums",
    "ranking_scores",
    "reference_logps",
    "response_logps",
    "rm_loss_sums",
    "sft_loss_sums",
    "token_nll_rows",
]
