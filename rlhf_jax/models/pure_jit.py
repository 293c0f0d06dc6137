"""``jax.jit`` for functions that take flax modules and do not mutate them.

``nnx.jit`` returns the state of every module and ``nnx.Variable`` it is given as extra
outputs, so that in-place updates reach the caller's objects, and XLA materialises them: a
copy of each module's weights on every call, and for a donated train state the donated
buffers aliased to that copy instead of to the new state, so the old and the new state are
both alive at the end of the step. ``rlhf-jax plan`` found it: the 8B GRPO update's outputs
on v5p-8 were its arguments (24 GB per chip: the train state and the reference) plus the new
state. :func:`pure_jit` passes each module as its ``nnx.split`` (the graph static, the state
as arrays) to ``jax.jit`` and merges it inside, so the outputs are what the function returns.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx


@jax.tree_util.register_pytree_node_class
class _SplitModule:
    """A module as a pytree: its state the children, its graph definition the static part."""

    def __init__(self, graph, state):
        self.graph, self.state = graph, state

    def tree_flatten(self):
        return (self.state,), self.graph

    @classmethod
    def tree_unflatten(cls, graph, children):
        return cls(graph, children[0])


def _split(value):
    return _SplitModule(*nnx.split(value)) if isinstance(value, nnx.Module) else value


def _merged(value):
    return nnx.merge(value.graph, value.state) if isinstance(value, _SplitModule) else value


def _each(convert, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``convert`` applied to every positional and keyword argument."""
    return tuple(map(convert, args)), {name: convert(value) for name, value in kwargs.items()}


class PureJit:
    """``fun`` jitted with its module arguments (positional or keyword, at the top level) split;
    call it or ``lower`` it as the ``jax.jit`` of ``fun``."""

    def __init__(self, fun, **jit_kwargs):
        @functools.wraps(fun)  # jax.jit reads the signature (static_argnames by position)
        def merged(*args, **kwargs):
            args, kwargs = _each(_merged, args, kwargs)
            return fun(*args, **kwargs)

        self._jitted = jax.jit(merged, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        args, kwargs = _each(_split, args, kwargs)
        return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs) -> jax.stages.Lowered:
        """``jax.jit(fun).lower`` on the arguments (abstract ones too: ``nnx.eval_shape`` modules)."""
        args, kwargs = _each(_split, args, kwargs)
        return self._jitted.lower(*args, **kwargs)


def pure_jit(fun, **jit_kwargs) -> PureJit:
    """``jax.jit(fun, **jit_kwargs)`` for a ``fun`` that reads the flax modules it is given and
    returns what it computes (a forward, a scoring pass, a functional update returning the new
    state): its outputs are ``fun``'s alone, and a donated argument's buffers can hold the new
    state (module docstring). ``jit_kwargs``: ``jax.jit``'s (``static_argnames``,
    ``donate_argnums``, ...)."""
    return PureJit(fun, **jit_kwargs)
