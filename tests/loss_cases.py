"""Every loss of the core as a case: a function of batch-major arrays plus fixed options.

Used by the transformation tests (jit / no jit, pmap over 8 devices, grad, trace count).
All arrays in ``args`` have the batch as their leading axis, so they can be split across
devices along it.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import numpy as np

from rlhf_jax import losses
from rlhf_jax.kl import kl_penalty


class Case(NamedTuple):
    name: str
    fn: Callable  # fn(*args, axis_name=None) -> (loss, aux)
    args: tuple  # numpy arrays, batch-major
    differentiable: tuple[int, ...]  # indices of args that gradients flow into


def _token_arrays(rng, batch, length):
    lengths = rng.integers(1, length + 1, size=batch)
    mask = np.arange(length)[None, :] < lengths[:, None]
    logp = rng.normal(-2.0, 0.5, size=(batch, length))
    return logp, mask


def cases(batch: int = 16, length: int = 5, vocab: int = 6, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    logp, mask = _token_arrays(rng, batch, length)
    old = logp + rng.normal(0, 0.2, size=logp.shape)
    ref = logp + rng.normal(0, 0.2, size=logp.shape)
    adv_BT = rng.normal(size=logp.shape)
    pair = [rng.normal(-15, 3, size=batch) for _ in range(4)]
    lengths = [rng.integers(2, 20, size=batch).astype(np.float64) for _ in range(2)]
    mean_logps = [-rng.uniform(0.1, 2.0, size=batch) * n for n in lengths]
    logits = rng.normal(size=(batch, length, vocab))
    targets = rng.integers(0, vocab, size=(batch, length))
    desirable = (rng.random(batch) > 0.5).astype(np.float64)
    rewards_BK = rng.normal(size=(batch, 4))
    valid_BK = np.arange(4)[None, :] < rng.integers(2, 5, size=batch)[:, None]

    def kl_mean(logp, ref, mask, axis_name=None):
        from rlhf_jax.masked import aggregate

        return aggregate(kl_penalty(logp, ref, "k3"), mask, axis_name=axis_name), ()

    result = [
        Case("bradley_terry", partial(losses.bradley_terry_loss, center_coef=0.01), (pair[0], pair[1]), (0, 1)),
        Case("ranking_all_pairs", lambda r, v, axis_name=None: losses.ranking_loss(r, valid_BK=v, axis_name=axis_name), (rewards_BK, valid_BK), (0,)),
        Case(
            "ranking_plackett_luce",
            lambda r, v, axis_name=None: losses.ranking_loss(r, valid_BK=v, kind="plackett_luce", axis_name=axis_name),
            (rewards_BK, valid_BK),
            (0,),
        ),
        Case("simpo", losses.simpo_loss, (mean_logps[0], mean_logps[1], lengths[0], lengths[1]), (0, 1)),
        Case("orpo", losses.orpo_loss, (mean_logps[0], mean_logps[1], lengths[0], lengths[1]), (0, 1)),
        Case("kto", partial(losses.kto_loss, reference_point=0.3), (pair[0], pair[1], desirable), (0,)),
        Case("ppo_policy", partial(losses.ppo_policy_loss, dual_clip=3.0), (logp, old, adv_BT, mask), (0,)),
        Case("ppo_value", losses.ppo_value_loss, (logp, old, adv_BT, mask), (0,)),
        Case("entropy", losses.entropy_bonus, (logits, mask), (0,)),
        Case("sft", losses.sft_loss, (logits, targets, mask), (0,)),
        Case("sft_seq_mean", partial(losses.sft_loss, aggregation="seq_mean_token_mean"), (logits, targets, mask), (0,)),
        Case("reinforce", losses.reinforce_loss, (logp, pair[0], mask), (0,)),
        Case("grpo", losses.grpo_loss, (logp, old, ref, pair[1] / 10, mask), (0,)),
        Case("grpo_dr", partial(losses.grpo_loss, aggregation="seq_sum", normalizer=float(length)), (logp, old, ref, pair[1] / 10, mask), (0,)),
        Case("k3_token_mean", kl_mean, (logp, ref, mask), (0,)),
    ]
    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)]:
        result.append(
            Case(
                f"dpo_{loss_type}_{eps}",
                partial(losses.dpo_loss, loss_type=loss_type, label_smoothing=eps),
                tuple(pair),
                (0, 1),
            )
        )
    return result
