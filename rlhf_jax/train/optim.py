"""The optimiser from config: AdamW (Loshchilov & Hutter, 2019) with linear warm-up then
cosine, linear or constant decay, and global-norm gradient clipping; optionally a float32
master copy of low-precision parameters (:func:`with_master_weights`)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config import at_least, between, greater_than

Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (Loshchilov & Hutter, 2019) with a warm-up + decay schedule and global-norm gradient
    clipping. Raises ``ValueError`` for a value out of range."""
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int | None = None  # the schedule's length (decay ends here); None: the phase's steps
    schedule: Schedule = "cosine"
    end_learning_rate_ratio: float = 0.0  # final lr = ratio * learning_rate
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    # a float32 copy of the parameters in the optimiser state, updated in float32 and rounded to
    # the parameters' dtype after each step (with_master_weights): bf16 weights then keep updates
    # smaller than their rounding step. Costs 4 bytes per parameter
    master_weights: bool = False

    def __post_init__(self):
        greater_than(0, learning_rate=self.learning_rate, eps=self.eps, clip_norm=self.clip_norm)
        at_least(0, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay)
        at_least(1, total_steps=self.total_steps)
        between(0, 1, end_learning_rate_ratio=self.end_learning_rate_ratio)
        between(0, 1, b1=self.b1, b2=self.b2, open_high=True)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}")


def learning_rate_schedule(c: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine / linear decay to
    ``end_learning_rate_ratio * learning_rate`` at ``total_steps``, or constant. Raises
    ``ValueError`` when ``total_steps`` is unset."""
    if c.total_steps is None:
        raise ValueError("OptimizerConfig.total_steps is unset; give the schedule's length")
    end = c.learning_rate * c.end_learning_rate_ratio
    decay_steps = max(c.total_steps - c.warmup_steps, 1)
    decay = {
        "cosine": optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=c.end_learning_rate_ratio),
        "linear": optax.linear_schedule(c.learning_rate, end, decay_steps),
        "constant": optax.constant_schedule(c.learning_rate),
    }[c.schedule]
    if c.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
    return optax.join_schedules([warmup, decay], [c.warmup_steps])


class MasterWeightsState(typing.NamedTuple):
    """:func:`with_master_weights`' state: the wrapped optimiser's, and the float32 master copy."""
    inner: optax.OptState
    master: optax.Params


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` run on a float32 master copy of the parameters, kept in the optimiser state
    (Micikevicius et al., 2018, "Mixed Precision Training", sec. 3.1): each step updates the
    master in float32 and returns ``master - params`` (float32), so ``optax.apply_updates``
    gives the parameters the master rounded to their own dtype. Without it a bf16 weight drops
    every update smaller than half its rounding step (2^-9 of its magnitude). ``inner`` sees
    the master as its parameters (weight decay in float32). Float32 parameters are copied too;
    enable it for low-precision ones."""
    def to_float32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        master = to_float32(params)
        return MasterWeightsState(inner.init(master), master)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_master_weights needs the parameters in update()")
        updates, inner_state = inner.update(to_float32(grads), state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        return jax.tree.map(lambda m, p: m - p.astype(m.dtype), master, params), MasterWeightsState(inner_state, master)

    return optax.GradientTransformation(init, update)


def make_optimizer(c: OptimizerConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then AdamW on :func:`learning_rate_schedule`, on a
    float32 master copy of the parameters with ``master_weights``."""
    adamw = optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    tx = adamw if c.clip_norm is None else optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw)
    return with_master_weights(tx) if c.master_weights else tx
