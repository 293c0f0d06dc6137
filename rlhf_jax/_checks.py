"""Argument validation with errors that name the argument.

Shape and dtype checks run at trace time (free at run time). Mask *values* can only be
checked when the mask is concrete (an eager call or a NumPy array); under ``jit`` the
values are not known and the check is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


def check_rank(x, rank: int, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``x`` has ``rank`` dimensions."""
    try:
        chex.assert_rank(x, rank)
    except AssertionError:
        raise ValueError(
            f"{name} must have rank {rank}, got shape {jnp.shape(x)} (rank {jnp.ndim(x)})"
        ) from None


def check_floating(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_same_shape(named: Sequence[tuple[str, object]]) -> None:
    """Raise ``ValueError`` listing every shape unless all arrays in ``named`` agree."""
    shapes = [(name, jnp.shape(x)) for name, x in named]
    if len({shape for _, shape in shapes}) > 1:
        listing = ", ".join(f"{name}{shape}" for name, shape in shapes)
        raise ValueError(f"shape mismatch: {listing} must all have the same shape")


def check_binary(x, name: str) -> None:
    """Require a bool array, or a numeric one whose values are 0 or 1 when concrete."""
    dtype = jnp.result_type(x)
    if dtype == jnp.bool_:
        return
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"{name} must be bool or numeric 0/1, got dtype {dtype}")
    if isinstance(x, jax.core.Tracer):
        return
    values = np.unique(np.asarray(x))
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(
            f"{name} must contain only 0 and 1 (it is a mask), found {bad[:5].tolist()}; "
            "pass a bool array, or 0/1 values"
        )


def check_choice(value: str, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")


def check_mask_like(mask, like, mask_name: str, like_name: str) -> None:
    """A token or batch mask: same shape as ``like`` and binary."""
    check_same_shape([(like_name, like), (mask_name, mask)])
    check_binary(mask, mask_name)
