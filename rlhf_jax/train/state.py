"""The one immutable train state threaded through every phase."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax.models.lora import trainable_filter


def float32_moments(tree):
    """``tree`` with its floating leaves as float32: what an optimiser's state is initialised
    from and its updates computed in, so bf16 (or fp16) parameters keep float32 moments -- the
    mixed-precision recipe of Micikevicius et al., 2018, "Mixed Precision Training". Float32
    leaves are returned as they are."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@flax.struct.dataclass
class TrainState:
    """``params`` are the trained variables (the LoRA adapters when the model has them, else
    every ``nnx.Param``); ``frozen`` is the rest of the model. ``skipped_updates`` counts the
    steps whose gradients were not finite and were therefore not applied; ``nonfinite_streak``
    how many of the latest steps in a row were (``train.guard`` stops a run at a limit)."""

    step: jax.Array
    params: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    skipped_updates: jax.Array
    nonfinite_streak: jax.Array
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        """A step-0 state of ``model``: its trainable variables (``models.trainable_filter``) as
        ``params``, the rest ``frozen``, ``tx``'s initial optimiser state, and ``rng``."""
        graphdef, params, frozen = nnx.split(model, trainable_filter(model), ...)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(float32_moments(params)),
            rng=rng,
            skipped_updates=jnp.zeros((), jnp.int32),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            graphdef=graphdef,
        )

    def model(self, params: nnx.State | None = None) -> nnx.Module:
        """The model with ``params`` (default: the state's own) merged back in."""
        return nnx.merge(self.graphdef, self.params if params is None else params, self.frozen)
