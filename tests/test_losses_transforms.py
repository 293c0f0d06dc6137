"""Every loss under jit and without, under pmap with axis_name (= the global batch), under
grad (= float64 finite differences), and traced once per shape by jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from loss_cases import cases

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

CASES = cases()
IDS = [c.name for c in CASES]
N_DEVICES = 8


def as_jax(args, dtype=jnp.float32):
    return tuple(jnp.asarray(a) if a.dtype in (bool, np.int64) else jnp.asarray(a, dtype) for a in args)


class TestJitAndEager(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_every_loss_agrees_with_and_without_jit(self):
        for case in CASES:
            args = as_jax(case.args)
            loss, aux = self.variant(case.fn)(*args)
            expected_loss, expected_aux = case.fn(*args)
            chex.assert_trees_all_close((loss, aux), (expected_loss, expected_aux), rtol=1e-6, atol=1e-6)
            assert np.isfinite(float(loss)), case.name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pmap_with_axis_name_equals_the_global_batch(case):
    assert jax.device_count() == N_DEVICES, "tests/conftest.py must set 8 fake CPU devices"
    args = as_jax(case.args)
    global_loss, global_aux = case.fn(*args)
    sharded = tuple(a.reshape(N_DEVICES, a.shape[0] // N_DEVICES, *a.shape[1:]) for a in args)
    per_device = jax.pmap(lambda *xs: case.fn(*xs, axis_name="devices"), axis_name="devices")(*sharded)
    # Every device holds the global value.
    first = jax.tree.map(lambda x: x[0], per_device)
    chex.assert_trees_all_close(first, (global_loss, global_aux), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[-1], per_device), first, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_matches_float64_finite_differences(case):
    with jax.enable_x64(True):
        args = as_jax(case.args, jnp.float64)

        def loss_of(*diff_args):
            full = list(args)
            for i, a in zip(case.differentiable, diff_args):
                full[i] = a
            return case.fn(*full)[0]

        diff_args = tuple(args[i] for i in case.differentiable)
        check_grads(loss_of, diff_args, order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)
        grads = jax.grad(loss_of, argnums=tuple(range(len(diff_args))))(*diff_args)
        assert any(float(jnp.abs(g).sum()) > 0 for g in grads), f"{case.name}: zero gradient"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_traces_once_for_a_fixed_shape(case):
    traced = []

    def fn(*xs):
        traced.append(1)
        return case.fn(*xs)

    jitted = jax.jit(fn)
    for seed in range(3):
        fresh = next(c for c in cases(seed=seed) if c.name == case.name)
        jitted(*as_jax(fresh.args))
    assert len(traced) == 1, f"{case.name} traced {len(traced)} times"
