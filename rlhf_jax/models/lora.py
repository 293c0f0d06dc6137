"""Low-rank adapters (LoRA, Hu et al., 2021): ``y = x W + b + (alpha / r) (x A) B``.

``A [in, r]`` and ``B [r, out]`` are ``nnx.LoRAParam`` (``B`` starts at zero, so the adapted
model starts equal to the base); ``W`` and ``b`` stay ``nnx.Param``. Train with
``nnx.split(model, nnx.LoRAParam, ...)`` (see :func:`trainable_filter`) so the optimizer
holds state for the adapters only; :func:`merge_lora` folds ``W + (alpha / r) A B`` back into
plain linear layers for export.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.layers import Linear


class LoRALinear(Linear):
    """A :class:`Linear` whose frozen ``kernel``/``bias`` (same variables, same paths) get a
    trainable low-rank update. A stacked kernel ``[L, in, out]`` (scanned decoder blocks) gets
    stacked adapters ``[L, in, r]``, ``[L, r, out]``, one pair per layer."""

    def __init__(self, base: Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        *layers, d_in, d_out = base.kernel.get_value().shape  # layers: the stacked axis of scanned blocks
        *layer_names, in_name, out_name = base.kernel.get_metadata().get("out_sharding") or (None,) * (2 + len(layers))
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.scale = alpha / rank
        param_dtype = base.kernel.get_value().dtype
        # torch's kaiming_uniform(a=sqrt 5), fan-in per layer
        a_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", batch_axis=tuple(range(len(layers))))
        with nnx.use_eager_sharding(False):
            self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (*layers, d_in, rank), param_dtype),
                                        out_sharding=(*layer_names, in_name, None))
            self.lora_b = nnx.LoRAParam(jnp.zeros((*layers, rank, d_out), param_dtype),
                                        out_sharding=(*layer_names, None, out_name))

    def merged_kernel(self) -> jax.Array:
        """``W + (alpha / r) A B`` ``[..., in, out]``: the kernel the adapted layer computes with."""
        return self.kernel[...] + self.scale * (self.lora_a[...] @ self.lora_b[...]).astype(self.kernel[...].dtype)

    def __call__(self, x_NI: jax.Array) -> jax.Array:
        """``x W + b + s (x A) B``, factored so the backward pass never forms a full ``dW``."""
        dtype = self.dtype or x_NI.dtype
        x_MI = x_NI.reshape(-1, x_NI.shape[-1]).astype(dtype)
        update_MO = (x_MI @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return self._apply(x_NI, self.kernel[...]) + self.scale * update_MO.reshape(*x_NI.shape[:-1], -1)


def _linear_slots(model: nnx.Module, kind: type) -> list[tuple[nnx.Module, str | int, nnx.Module]]:
    """``(parent, attribute or index, child)`` for every child module of type ``kind``."""
    slots = []
    for _, parent in nnx.iter_modules(model):
        for key, child in nnx.iter_children(parent):
            if isinstance(child, kind):
                slots.append((parent, key, child))
    return slots


def apply_lora(model: nnx.Module, targets: Sequence[str], *, rank: int = 8, alpha: float = 16.0,
               rngs: nnx.Rngs) -> nnx.Module:
    """Wrap every linear layer whose attribute name is in ``targets`` (e.g. ``("q_proj",
    "v_proj")``) in a :class:`LoRALinear`, in place; returns the model. Unknown target
    names raise, listing the linear layer names the model has."""
    slots = [s for s in _linear_slots(model, Linear) if not isinstance(s[2], LoRALinear)]
    available = sorted({str(key) for _, key, _ in slots})
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} match no linear layer; the model has: {', '.join(available)}")
    for parent, key, child in slots:
        if key in targets:
            setattr(parent, key, LoRALinear(child, rank=rank, alpha=alpha, rngs=rngs))
    return model


def _replace_adapters(model: nnx.Module, kernel_of) -> nnx.Module:
    """A copy of ``model`` (new module objects over the same arrays) with every
    :class:`LoRALinear` replaced by a plain ``Linear`` over its kernel and bias variables,
    the kernel set to ``kernel_of(adapter)`` when given; ``model`` itself without adapters."""
    if not _linear_slots(model, LoRALinear):
        return model
    model = nnx.clone(model)
    for parent, key, child in _linear_slots(model, LoRALinear):
        with nnx.use_eager_sharding(False):
            linear = nnx.eval_shape(lambda c=child: Linear(*c.kernel.get_value().shape[-2:], (None, None),
                                                           rngs=nnx.Rngs(0), dtype=c.dtype,
                                                           param_dtype=c.kernel.get_value().dtype,
                                                           bias=c.bias is not None))
        kernel = None if kernel_of is None else kernel_of(child)
        linear.kernel, linear.bias = child.kernel, child.bias  # keep the variables' metadata
        if kernel is not None:
            linear.kernel.set_value(kernel)
        setattr(parent, key, linear)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every :class:`LoRALinear` folded into a plain ``Linear`` of
    kernel ``W + (alpha / r) A B``; the model itself is returned when it has no adapters."""
    return _replace_adapters(model, LoRALinear.merged_kernel)


def without_lora(model: nnx.Module) -> nnx.Module:
    """The base model under ``model``'s adapters: every :class:`LoRALinear` replaced by a plain
    ``Linear`` over the *same* kernel and bias arrays, so it holds no second copy of the
    weights -- the frozen reference of a LoRA policy, whose base never trains. The model
    itself is returned when it has no adapters."""
    return _replace_adapters(model, None)


def trainable_filter(model: nnx.Module):
    """``nnx.LoRAParam`` when the model has adapters (the base stays frozen), else ``nnx.Param``."""
    return nnx.LoRAParam if _linear_slots(model, LoRALinear) else nnx.Param
