"""Matrix-multiply FLOPs read from compiled HLO, every loop body counted as often as it runs,
against hand counts; PaLM's model FLOPs by hand."""

import re

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax.plan.flops import MatmulFlops, matmul_flops, model_flops

LAYERS, ROWS, WIDTH = 5, 8, 32
MATMUL = 2 * ROWS * WIDTH * WIDTH  # one [8, 32] x [32, 32] product


def scanned_loss(w_LDD, x_BD, remat=False):
    def layer(h_BD, w_DD):
        return jnp.tanh(h_BD @ w_DD), None
    h_BD, _ = jax.lax.scan(jax.checkpoint(layer) if remat else layer, x_BD, w_LDD)
    return jnp.sum(h_BD)


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("remat, passes", [(False, 3), (True, 4)])
def test_a_scanned_gradient_counts_every_layer_and_remat_recomputes_the_forward(remat, passes):
    """Forward 1 product per layer, backward 2 (the input's and the weight's gradients), and
    with remat the forward once more; XLA's own cost analysis counts the loop body once."""
    args = jnp.ones((LAYERS, WIDTH, WIDTH)), jnp.ones((ROWS, WIDTH))
    compiled = jax.jit(jax.grad(lambda w, x: scanned_loss(w, x, remat))).lower(*args).compile()
    counted = matmul_flops(compiled.as_text())
    assert counted.flops == passes * LAYERS * MATMUL and counted.uncounted_loops == 0
    assert compiled.cost_analysis()["flops"] < passes * LAYERS * MATMUL


def test_a_loop_without_a_known_trip_count_is_the_scan_form_or_counted_once_and_reported():
    """The TPU compiler writes no ``known_trip_count``: a loop ``i < N`` on a counter from a
    constant is still counted N times; a loop that stops on a condition of its values is
    counted once and reported."""
    args = jnp.ones((LAYERS, WIDTH, WIDTH)), jnp.ones((ROWS, WIDTH))
    text = compiled_text(jax.grad(scanned_loss), *args)
    note = r'"known_trip_count":\{"n":"\d+"\},?'
    bare = re.sub(note, "", text)
    assert re.search(note, text) and not re.search(note, bare)
    assert matmul_flops(bare).flops == 3 * LAYERS * MATMUL

    def by_twos(x_BD, w_DD):  # a counter that steps by 2 to 8: 4 trips, not 8
        return jax.lax.while_loop(lambda c: c[0] < 8, lambda c: (c[0] + 2, c[1] @ w_DD), (0, x_BD))[1]

    def by_data(x_BD, w_DD):  # a counter from 0 that a value advances: no count to read
        return jax.lax.while_loop(lambda c: c[0] < 8, lambda c: (c[0] + jnp.sum(c[1] > 0), c[1] @ w_DD), (0, x_BD))[1]

    square = jnp.ones((ROWS, WIDTH)), jnp.ones((WIDTH, WIDTH))
    assert matmul_flops(re.sub(note, "", compiled_text(by_twos, *square))) == MatmulFlops(4 * MATMUL)
    assert matmul_flops(re.sub(note, "", compiled_text(by_data, *square))) == MatmulFlops(MATMUL, 1)

    def until_large(x_BD, w_DD):
        return jax.lax.while_loop(lambda h: jnp.sum(h) < 1e6, lambda h: h @ w_DD + 1.0, x_BD)

    counted = matmul_flops(compiled_text(until_large, jnp.ones((ROWS, WIDTH)), jnp.ones((WIDTH, WIDTH))))
    assert counted.flops == MATMUL and counted.uncounted_loops == 1


def test_a_conditional_counts_its_costliest_branch_and_a_contraction_its_contracted_size():
    def branch(flag, x_BD, w_DD):
        return jax.lax.cond(flag, lambda: (x_BD @ w_DD) @ w_DD, lambda: x_BD @ w_DD)

    text = compiled_text(branch, True, jnp.ones((ROWS, WIDTH)), jnp.ones((WIDTH, WIDTH)))
    assert matmul_flops(text).flops == 2 * MATMUL
    batched = compiled_text(lambda a, b: jnp.einsum("bik,bkj->bij", a, b), jnp.ones((3, 4, 6)), jnp.ones((3, 6, 5)))
    assert matmul_flops(batched).flops == 2 * 3 * 4 * 5 * 6
    with pytest.raises(ValueError, match="no ENTRY"):
        matmul_flops("HloModule empty")


def test_model_flops_by_hand():
    # 2 sequences of 4 tokens, decoder weights 10, head 3 (over 6 tokens), 2 layers x 1 head x 2 dims
    attention = 8 * 4 * 2 * 1 * 2 * 4
    assert model_flops(10, 3, 2, 1, 2, 8, 4, passes=3, head_tokens=6) == (3 * (8 * 2 * 10 + attention + 2 * 3 * 6),
                                                                           3 * attention)
    assert model_flops(10, 3, 2, 1, 2, 8, 4, passes=1) == (8 * (2 * 10 + 64) + 2 * 3 * 8, 8 * 64)


def test_a_tpu_style_convolution_counts_the_window_positions_on_the_input_not_its_padding():
    """How libtpu writes a matrix product batched over heads: the head axis a spatial dimension
    of size 1 that a window of 4 slides over, padded 3 each side; each of the [2, 8, 4, 8]
    outputs sums 16 input features once, not 4 times. A Pallas kernel is counted as such."""
    text = """HloModule tpu_style
ENTRY %main (a: bf16[2,8,16,1], k: bf16[4,8,16,1]) -> bf16[2,8,4,8] {
  %a = bf16[2,8,16,1]{3,2,1,0} parameter(0)
  %k = bf16[4,8,16,1]{3,2,1,0} parameter(1)
  %kernel = f32[2]{0} custom-call(%a), custom_call_target="tpu_custom_call"
  ROOT %c = bf16[2,8,4,8]{3,2,1,0} convolution(%a, %k), window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
}
"""
    counted = matmul_flops(text)
    assert counted.flops == 2 * (2 * 8 * 4 * 8) * 16 and counted.custom_kernels == 1
