"""One optimisation step over a batch of micro-batches, shared by every phase.

A phase supplies ``loss_fn(model, micro_batch) -> (loss_sum, weight, metric_sums)``: the
loss *summed* over its units (tokens for SFT, pairs for RM and DPO), how many units there
were, and metrics summed the same way. The step scans the micro-batches (leading axis of
every batch leaf), adds up sums, weights and gradients, and divides once:

    L = sum_m loss_sum_m / sum_m weight_m,     g = sum_m grad(loss_sum_m) / sum_m weight_m

so gradient accumulation equals the large batch exactly, also when micro-batches hold
different numbers of tokens (averaging per micro-batch would not). A step whose loss or
gradients are not finite leaves params and optimiser state unchanged and is counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax.models.lora import without_lora
from rlhf_jax.train.state import TrainState, float32_moments

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, loss: jax.Array):
    """``(state after one optimiser update, finite)``; when ``loss`` or ``grads`` are not
    finite the params and optimiser state stay as they were and the skip is counted."""
    finite = _all_finite(grads) & jnp.isfinite(loss)

    def update(params, opt_state):
        # float32 moments and updates for any parameter dtype (train.state.float32_moments); the
        # update is applied in the parameters' own dtype
        updates, new_opt_state = tx.update(float32_moments(grads), opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    # a branch, not a select of (new, old): the update may then overwrite the donated buffers
    # in place instead of holding a second parameter- and optimiser-sized copy
    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params, state.opt_state)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    return new_state, finite


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
    """``step(state, batch) -> (state, metrics)``, to be wrapped in ``jax.jit`` by the caller
    (with ``donate_argnums=0``). ``metrics``: the mean loss and metrics, the gradient norm,
    whether the update was applied, and the running count of skipped updates."""

    def sums(params, state: TrainState, micro_batch):
        loss_sum, weight, metric_sums = loss_fn(state.model(params), micro_batch)
        return loss_sum, (weight, metric_sums)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        def one(micro_batch):
            (loss_sum, (w, m)), g = jax.value_and_grad(sums, has_aux=True)(state.params, state, micro_batch)
            return g, loss_sum, w, m

        def body(carry, micro_batch):  # accumulated in float32, whatever the parameters' dtype
            return jax.tree.map(jnp.add, carry, float32_moments(one(micro_batch))), None

        if jax.tree.leaves(batch)[0].shape[0] == 1:  # one micro-batch: no accumulator (a parameter-sized buffer)
            grad_sum, loss_sum, weight, metric_sums = one(jax.tree.map(lambda x: x[0], batch))
        else:
            shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], batch))
            zeros = float32_moments(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
            (grad_sum, loss_sum, weight, metric_sums), _ = jax.lax.scan(body, zeros, batch)
        denominator = jnp.maximum(weight, 1e-12)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        loss = loss_sum / denominator
        new_state, finite = apply_gradients(state, grads, tx, loss)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "applied": finite,
                   "skipped_updates": new_state.skipped_updates, "nonfinite_streak": new_state.nonfinite_streak,
                   "weight": weight}
        metrics |= {name: value / denominator for name, value in metric_sums.items()}
        return new_state, metrics

    return step


def train_step_program(step: Callable, *, reference_graph: nnx.GraphDef | None = None,
                       prepare: Callable | None = None, reference_is_base: bool = False):
    """The compiled program of ``step`` (state donated): ``(state, batch)``, or with a frozen
    reference's graph ``(state, reference_params, batch)`` -- ``prepare(reference, batch)``
    (DPO: its log-probs of the responses) run in the same program before the step. With
    ``reference_is_base`` the reference is the state's own model with its LoRA adapters off
    (``models.lora.without_lora``), read from the state inside the program: no second copy.
    ``jit_train_step`` runs it; ``rlhf-jax plan`` lowers it with abstract arguments."""
    if prepare is None:
        return jax.jit(step, donate_argnums=0)
    if reference_is_base:
        return jax.jit(lambda state, batch: step(state, prepare(without_lora(state.model()), batch)),
                       donate_argnums=0)
    return jax.jit(lambda state, params, batch: step(state, prepare(nnx.merge(reference_graph, params), batch)),
                   donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """``step(state, batch) -> (state, metrics)``, compiled; ``lower(state, batch)`` lowers the
    same program (after a call, compiling it again is a cache hit: XLA's analysis for free)."""

    program: Callable  # the jitted program of train_step_program
    reference_params: Any = None  # a frozen reference's parameters, passed to every call

    def _arguments(self, state, batch) -> tuple:
        return (state, batch) if self.reference_params is None else (state, self.reference_params, batch)

    def __call__(self, state, batch):
        return self.program(*self._arguments(state, batch))

    def lower(self, state, batch) -> jax.stages.Lowered:
        """The step's program lowered for ``state`` and ``batch`` (arrays or abstract ones)."""
        return self.program.lower(*self._arguments(state, batch))


def jit_train_step(step: Callable, *, reference: nnx.Module | None = None, prepare: Callable | None = None,
                   reference_is_base: bool = False) -> TrainStep:
    """``step(state, batch)`` compiled (:func:`train_step_program`), the state donated. With a
    frozen ``reference`` model its parameters are split once and passed to every call, not
    baked into the program as constants: one dispatch per step runs ``prepare`` and the step."""
    if reference is None:
        return TrainStep(train_step_program(step))
    if reference_is_base:
        return TrainStep(train_step_program(step, prepare=prepare, reference_is_base=True))
    graph, params = nnx.split(reference)
    return TrainStep(train_step_program(step, reference_graph=graph, prepare=prepare), params)
