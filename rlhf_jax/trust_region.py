"""TRPO's update as pure functions (Schulman et al., 2015, "Trust Region Policy Optimization",
appendix C): the natural-gradient direction by conjugate gradient on Fisher-vector products,
then a backtracking line search that keeps the KL inside the trust region.

The Fisher matrix is never formed: at the old parameters the Hessian of
``KL(pi_old || pi_theta)`` is the Fisher information, so ``F v`` is a Hessian-vector product
of the KL -- forward-over-reverse (``jax.jvp`` of ``jax.grad``), one backward and one forward
pass. Parameters are any pytree; the solver works on their flat vector
(``jax.flatten_util.ravel_pytree``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, iterations: int = 10,
                       tolerance: float = 1e-10) -> jax.Array:
    """``x`` with ``A x = b`` for a symmetric positive-definite ``A`` given only ``matvec(v) =
    A v`` (Hestenes & Stiefel, 1952): at most ``iterations`` steps, stopping once the squared
    residual is below ``tolerance``; exact in ``n`` steps for an ``n x n`` system in exact
    arithmetic. ``b`` ``[n]``; returns ``[n]``. Raises ``ValueError`` for a ``b`` that is not 1-D."""
    if b.ndim != 1:
        raise ValueError(f"b must be a vector [n], got shape {b.shape}")

    def cond(carry):
        i, _, _, _, rr = carry
        return (i < iterations) & (rr > tolerance)

    def body(carry):
        i, x, r, p, rr = carry
        ap = matvec(p)
        alpha = rr / jnp.vdot(p, ap)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = jnp.vdot(r, r)
        return i + 1, x, r, r + (rr_new / rr) * p, rr_new

    x0 = jnp.zeros_like(b)
    return jax.lax.while_loop(cond, body, (0, x0, b, b, jnp.vdot(b, b)))[1]


def fisher_vector_product(kl_fn: Callable[[jax.Array], jax.Array], flat_params: jax.Array, v: jax.Array, *,
                          damping: float = 0.0) -> jax.Array:
    """``(F + damping I) v`` with ``F`` the Hessian of ``kl_fn`` (the mean KL(pi_old || pi) as a
    function of the flat parameters ``[n]``) at ``flat_params``: at the old parameters, the
    Fisher information of the policy. ``v`` ``[n]``; returns ``[n]``."""
    return jax.jvp(jax.grad(kl_fn), (flat_params,), (v,))[1] + damping * v


class TRPOAux(NamedTuple):
    """What a TRPO step did: the loss before and after, the KL reached, the step fraction the
    line search kept (0: no step was accepted and the parameters are unchanged)."""
    loss_before: jax.Array
    loss_after: jax.Array
    kl: jax.Array
    step_fraction: jax.Array


def trpo_step(loss_fn: Callable[[Any], jax.Array], kl_fn: Callable[[Any], jax.Array], params: Any, *,
              max_kl: float = 0.01, cg_iterations: int = 10, damping: float = 0.1, backtrack: float = 0.5,
              max_backtracks: int = 10) -> tuple[Any, TRPOAux]:
    """One TRPO update of ``params`` (a pytree): ``loss_fn(params)`` the surrogate to minimise
    (e.g. ``-mean(rho A)``), ``kl_fn(params)`` the mean KL(pi_old || pi_params), 0 with zero
    gradient at ``params``. The direction ``x = F^-1 (-g)`` by :func:`conjugate_gradient` on
    :func:`fisher_vector_product` (damped), scaled to the trust region's edge
    ``sqrt(2 max_kl / x^T F x)`` (eq. 14's quadratic model), then shortened by ``backtrack``
    until the loss falls and the KL is at most ``max_kl`` (at most ``max_backtracks`` tries;
    none accepted: the parameters are returned unchanged). Returns ``(params, TRPOAux)``;
    raises ``ValueError`` for ``max_kl <= 0`` or ``backtrack`` outside (0, 1)."""
    if max_kl <= 0:
        raise ValueError(f"max_kl must be > 0 (nats), got {max_kl}")
    if not 0 < backtrack < 1:
        raise ValueError(f"backtrack must be in (0, 1), got {backtrack}")
    flat, unravel = ravel_pytree(params)

    def flat_loss(x):
        return loss_fn(unravel(x))

    def flat_kl(x):
        return kl_fn(unravel(x))

    loss_before, g = jax.value_and_grad(flat_loss)(flat)
    fvp = lambda v: fisher_vector_product(flat_kl, flat, v, damping=damping)  # noqa: E731
    direction = conjugate_gradient(fvp, -g, iterations=cg_iterations)
    full_step = jnp.sqrt(2.0 * max_kl / jnp.maximum(jnp.vdot(direction, fvp(direction)), 1e-12)) * direction

    def cond(carry):
        k, accepted = carry
        return (k < max_backtracks) & ~accepted

    def body(carry):
        k, _ = carry
        candidate = flat + backtrack ** k * full_step
        ok = (flat_loss(candidate) < loss_before) & (flat_kl(candidate) <= max_kl)
        return jnp.where(ok, k, k + 1), ok

    k, accepted = jax.lax.while_loop(cond, body, (0, jnp.asarray(False)))
    fraction = jnp.where(accepted, backtrack ** k, 0.0)
    new_flat = flat + fraction * full_step
    aux = TRPOAux(loss_before, flat_loss(new_flat), flat_kl(new_flat), fraction)
    return unravel(new_flat), aux
