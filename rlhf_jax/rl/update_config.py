"""What a clipped-ratio policy update reads: its algorithm's own config -- the YAML section
itself (``ppo:``, ``grpo:``, ...), whose common part is :class:`ClippedUpdateConfig` -- and,
from the rest of the run, an :class:`UpdateContext`: the rollout's sampling distribution and
group size, and where the KL to the reference goes and how it is estimated."""

from __future__ import annotations

import dataclasses

from rlhf_jax.config import at_least, greater_than
from rlhf_jax.kl import KLKind
from rlhf_jax.masked import Aggregation
from rlhf_jax.rollout.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class ClippedUpdateConfig:
    """What the clipped-ratio policy-gradient algorithms share (PPO and the critic-free
    family): passes over each rollout, the PPO clip (Schulman et al., 2017, eq. 7), how the
    per-token losses reduce (``masked.aggregate``), the truncated importance weights. Raises
    ``ValueError`` naming a value out of range."""

    epochs: int = 4  # passes over each rollout
    minibatches: int = 1  # optimiser steps per pass
    micro_batches: int = 1  # each minibatch's gradient accumulated over this many, exactly (less activation memory)
    clip_eps: float = 0.2  # the ratio clip
    loss_aggregation: Aggregation = "token_mean"
    loss_normalizer: float = 1.0  # the constant C of loss_aggregation: seq_sum (Dr. GRPO: max_new_tokens)
    tis_cap: float | None = None  # truncated importance sampling: min(pi_trainer / pi_sampler, tis_cap) per token

    def __post_init__(self):
        at_least(1, epochs=self.epochs, minibatches=self.minibatches, micro_batches=self.micro_batches)
        greater_than(0, clip_eps=self.clip_eps, loss_normalizer=self.loss_normalizer, tis_cap=self.tis_cap)


@dataclasses.dataclass(frozen=True)
class UpdateContext:
    """An update's inputs from outside its algorithm's section: the rollout's sampling
    distribution (``rollout.temperature`` / ``top_k`` / ``top_p`` / ``min_p``: the log-probs are
    that distribution's, ``rl.behaviour``), its samples per prompt (the critic-free groups),
    the per-token KL estimator of the reward (``kl.kind``) and whether the KL is a k3 loss term
    instead (``kl.in_loss``, resolved by the algorithm). Raises ``ValueError`` for a group size
    below 1."""

    sampling: SamplingConfig = SamplingConfig()
    group_size: int = 1  # completions per prompt, sample-major within a prompt (the rollout's order)
    kl_kind: KLKind = "k1"
    kl_in_loss: bool = False

    def __post_init__(self):
        at_least(1, group_size=self.group_size)
