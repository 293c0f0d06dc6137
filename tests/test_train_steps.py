"""Phase steps on tiny random models: SFT memorises, the RM separates a separable set, DPO
starts at ln 2 and widens margins; accumulation equals the big batch; a non-finite batch
is skipped; the sharded step equals the single-device step."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from rlhf_jax import data, models, train
from rlhf_jax.models.sharding import place

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

V, T = 32, 12


def tiny(head="lm", seed=0):
    config = models.config_from_hf({
        "model_type": "llama", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    })
    return models.build_model(config, head, rngs=nnx.Rngs(seed))


def sft_batch(b=8, seed=0, micro=1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, T + 1, size=b)
    ids = rng.integers(1, V, size=(b, T))
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = mask.copy()
    loss_mask[:, :2] = 0  # a two-token "prompt"
    return micro_batches(data.Sequences(ids * mask, mask, loss_mask.astype(np.float32)), micro)


def micro_batches(batch, micro):
    """``batch`` (leaves ``[n, ...]``) as ``micro`` micro-batches ``[micro, n / micro, ...]`` of jax arrays."""
    return jax.tree.map(lambda v: jnp.asarray(v.reshape(micro, v.shape[0] // micro, *v.shape[1:])), batch)


def pair_batch(n, seed, micro=1):
    """Chosen rows hold token 5 somewhere, rejected rows token 6: separable by one token."""
    rng = np.random.default_rng(seed)
    chosen, rejected = rng.integers(10, V, size=(2, n, T))
    chosen[np.arange(n), rng.integers(0, T, n)] = 5
    rejected[np.arange(n), rng.integers(0, T, n)] = 6
    mask = np.ones((n, T), np.int32)
    loss_mask = np.concatenate([np.zeros((n, 4)), np.ones((n, T - 4))], 1).astype(np.float32)
    return micro_batches(data.Pairs(data.Sequences(chosen, mask, loss_mask), data.Sequences(rejected, mask, loss_mask)),
                         micro)


def shared_pair_batch(n, seed, micro=1):
    """Pairs as shared-prompt rows (``data.shared_prompt``): a 4-token prompt, then an 8-token
    chosen and an 8-token rejected response."""
    rng = np.random.default_rng(seed)
    segments = np.broadcast_to(np.repeat([0, 1, 2], [4, 8, 8]), (n, 20))
    batch = data.SharedPromptPairs(rng.integers(10, V, size=(n, 20)), np.ones((n, 20), np.int32),
                                   segments.astype(np.int32))
    return micro_batches(batch, micro)


def run(loss_fn, model, batch, steps, lr):
    tx = optax.adam(lr)
    state = train.TrainState.create(model, tx, jax.random.key(0))
    step = jax.jit(train.make_train_step(loss_fn, tx))
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(jax.tree.map(float, metrics))
    return state, history


def test_sft_memorises_a_fixed_batch():
    state, history = run(train.sft_loss_sums, tiny(), sft_batch(), steps=150, lr=1e-2)
    assert history[0]["loss"] > 3.0 and history[-1]["loss"] < 0.05


def test_reward_model_separates_a_separable_set():
    state, history = run(train.rm_loss_sums, tiny("score"), pair_batch(64, seed=0), steps=60, lr=3e-3)
    held_out = jax.tree.map(lambda x: x[0], pair_batch(128, seed=1))
    chosen, rejected = train.pair_scores(state.model(), held_out)
    assert float(jnp.mean(chosen > rejected)) > 0.95 and history[-1]["accuracy"] == 1.0


def test_dpo_starts_at_ln2_and_widens_the_margin():
    policy = tiny()
    batch = pair_batch(16, seed=0)
    batch = jax.vmap(lambda b: train.reference_logps(policy, b))(batch)  # reference = the initial policy
    _, history = run(train.dpo_loss_sums, policy, batch, steps=30, lr=3e-3)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["reward_margin"] > 0.5 and history[-1]["loss"] < history[0]["loss"] - 0.2


def test_simpo_and_orpo_start_at_their_hand_values_and_widen_the_margin():
    """At the start both responses' log-probs come from the same untrained model: SimPO's loss is
    -log sigmoid(beta (mean_w - mean_l) - gamma) per pair, ORPO's the chosen NLL plus lam times
    the odds-ratio loss, each worked out here from the response log-probs; training separates
    the pairs without a reference model."""
    from rlhf_jax.train.reference_free import orpo_loss_sums, simpo_loss_sums

    policy, batch = tiny(), pair_batch(16, seed=0)
    flat = jax.tree.map(lambda x: x[0], batch)
    logps = np.asarray(train.response_logps(policy, flat), np.float64)
    mean_w, mean_l = logps[:, 0] / (T - 4), logps[:, 1] / (T - 4)  # 4 prompt tokens, T - 4 response tokens
    simpo0 = np.mean(np.logaddexp(0.0, -(2.0 * (mean_w - mean_l) - 1.0)))
    log_odds = (mean_w - np.log1p(-np.exp(mean_w))) - (mean_l - np.log1p(-np.exp(mean_l)))
    orpo0 = np.mean(-mean_w + 0.1 * np.logaddexp(0.0, -log_odds))
    for loss_fn, start in ((simpo_loss_sums, simpo0), (orpo_loss_sums, orpo0)):
        _, history = run(loss_fn, tiny(), batch, steps=40, lr=3e-3)
        assert history[0]["loss"] == pytest.approx(start, rel=1e-5)
        assert history[-1]["reward_accuracy"] == 1.0 and history[-1]["loss"] < history[0]["loss"] - 0.1


def test_kto_starts_at_half_its_weights_and_separates_the_labels():
    """KTO against the starting policy as its reference: every log-ratio and the reference point
    are 0, so each example's loss is lambda * (1 - sigmoid(0)) = lambda / 2 (eq. 8, worked by
    hand); training then gives desirable completions positive implicit rewards and undesirable
    ones negative."""
    from rlhf_jax.train.kto import add_reference_logps, kto_loss_sums

    pairs = jax.tree.map(lambda x: x[0], pair_batch(8, seed=0))
    desirable = np.arange(16) < 8  # the chosen rows desirable, the rejected ones not
    sequences = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), pairs.chosen, pairs.rejected)
    mismatched = jax.tree.map(lambda a: jnp.roll(a, -1, axis=0), sequences)
    batch = micro_batches(data.UnpairedSequences(sequences, jnp.asarray(desirable), mismatched), 1)
    policy = tiny()
    batch = nnx.jit(add_reference_logps)(policy, batch)
    weights = {"desirable_weight": 1.0, "undesirable_weight": 3.0}
    _, history = run(functools.partial(kto_loss_sums, **weights), policy, batch, steps=40, lr=3e-3)
    assert history[0]["loss"] == pytest.approx((8 * 1.0 / 2 + 8 * 3.0 / 2) / 16, abs=1e-6)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["reward_accuracy"] == 1.0 and history[-1]["loss"] < history[0]["loss"] - 0.2


def test_averaged_logps_are_the_sums_over_the_response_tokens():
    """``dpo.average_logps`` (IPO as the torch stacks compute it): each response's log-prob
    divided by its tokens, for separate and for shared-prompt rows."""
    model = tiny()
    for batch in (pair_batch(4, 0), shared_pair_batch(4, 0)):
        flat = jax.tree.map(lambda x: x[0], batch)
        summed, averaged = (np.asarray(train.response_logps(model, flat, average=a)) for a in (False, True))
        lengths = np.asarray(flat.response_lengths_BK())
        assert lengths.min() > 1
        np.testing.assert_allclose(averaged * lengths, summed, rtol=1e-6)


def test_reference_in_the_step_program_equals_a_separate_call():
    """DPO's fused step (reference log-probs + update in one program) is the two-call step."""
    tx, reference, batch = optax.adam(1e-2), tiny(seed=1), pair_batch(8, 0, micro=2)
    step = train.make_train_step(train.dpo_loss_sums, tx)
    fused = train.jit_train_step(step, reference=reference, prepare=train.add_reference_logps)
    separate = jax.jit(step)
    a, b = train.TrainState.create(tiny(), tx, jax.random.key(0)), train.TrainState.create(tiny(), tx, jax.random.key(0))
    for _ in range(3):
        a, a_metrics = fused(a, batch)
        b, b_metrics = separate(b, nnx.jit(train.add_reference_logps)(reference, batch))
    assert float(a_metrics["loss"]) == pytest.approx(float(b_metrics["loss"]), abs=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):  # two programs: float-order noise
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def remat_copy(model):
    """The same weights with every block rematerialised (``model.remat``)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    copy.model.remat = True
    return copy


@pytest.mark.parametrize("shared", [False, True])
def test_rematerialised_dpo_step_equals_the_plain_one(shared):
    """Per-block remat in the fused DPO step -- policy and reference both rematerialised, the
    reference's parameters from outside the gradient's trace -- gives the plain step's
    loss and parameters."""
    tx = optax.adam(1e-2)
    batch = shared_pair_batch(4, 0, micro=2) if shared else pair_batch(4, 0, micro=2)
    results = []
    for remat in (False, True):
        policy, reference = tiny(), tiny(seed=1)
        if remat:
            policy, reference = remat_copy(policy), remat_copy(reference)
        step = train.jit_train_step(train.make_train_step(train.dpo_loss_sums, tx), reference=reference,
                                    prepare=train.add_reference_logps)
        state = train.TrainState.create(policy, tx, jax.random.key(0))
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((float(metrics["loss"]), jax.tree.leaves(state.params)))
    (plain_loss, plain), (remat_loss, remat) = results
    assert remat_loss == pytest.approx(plain_loss, abs=1e-6)
    for x, y in zip(plain, remat):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.parametrize("phase", ["sft", "rm", "dpo"])
def test_accumulating_micro_batches_equals_the_big_batch(phase):
    if phase == "sft":
        loss_fn, head, make = train.sft_loss_sums, "lm", lambda m: sft_batch(8, micro=m)
    elif phase == "rm":
        loss_fn, head, make = train.rm_loss_sums, "score", lambda m: pair_batch(8, 0, micro=m)
    else:
        loss_fn, head = train.dpo_loss_sums, "lm"
        ref = tiny(seed=1)
        make = lambda m: jax.vmap(lambda b: train.reference_logps(ref, b))(pair_batch(8, 0, micro=m))  # noqa: E731
    tx = optax.sgd(1.0)  # new params = params - mean gradient, so they compare the gradients
    step = jax.jit(train.make_train_step(loss_fn, tx))
    results = [step(train.TrainState.create(tiny(head), tx, jax.random.key(0)), make(m)) for m in (1, 4)]
    (big, big_metrics), (acc, acc_metrics) = results
    assert float(acc_metrics["loss"]) == pytest.approx(float(big_metrics["loss"]), abs=1e-6)
    for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sft_tokens_are_weighted_by_count_not_by_micro_batch():
    batch = sft_batch(8, micro=4)
    assert len({float(batch.loss_mask_BT[m].sum()) for m in range(4)}) > 1  # uneven token counts
    loss_sum, count, _ = train.sft_loss_sums(tiny(), jax.tree.map(lambda x: x.reshape(8, -1), batch))
    _, metrics = jax.jit(train.make_train_step(train.sft_loss_sums, optax.sgd(0.0)))(
        train.TrainState.create(tiny(), optax.sgd(0.0), jax.random.key(0)), batch)
    assert float(metrics["loss"]) == pytest.approx(float(loss_sum / count), rel=1e-6)


def test_a_non_finite_batch_is_skipped_and_counted():
    tx = optax.adam(1e-2)
    state = train.TrainState.create(tiny(), tx, jax.random.key(0))
    step = jax.jit(train.make_train_step(train.sft_loss_sums, tx))
    state, _ = step(state, sft_batch())
    bad = sft_batch()
    bad = bad.replace(loss_mask_BT=bad.loss_mask_BT.at[0, 3, 5].set(jnp.nan))
    after, metrics = step(state, bad)
    assert not bool(metrics["applied"]) and int(after.skipped_updates) == 1 and int(after.step) == 2
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("phase", ["rm", "dpo"])
def test_a_shared_prompt_batchs_sharded_step_equals_single_device(phase):
    """Rankings that share their prompt (one row per response) on a data x fsdp mesh; the
    plain phases' steps on every mesh shape are tests/test_mesh.py's."""
    pairs = shared_pair_batch(16, 0, micro=2)
    if phase == "rm":
        loss_fn, head, batch = train.rm_loss_sums, "score", pairs
    else:
        loss_fn, head = train.dpo_loss_sums, "lm"
        batch = jax.vmap(lambda b: train.reference_logps(tiny(seed=1), b))(pairs)
    # SGD: Adam's first steps are ~lr * sign(g), which turns float-order noise in near-zero
    # gradients into lr-sized differences, so it cannot be compared element-wise.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    step = jax.jit(train.make_train_step(loss_fn, tx))
    state = train.TrainState.create(tiny(head), tx, jax.random.key(0))
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sharded_state = place(state, mesh)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(None, "data")))
    for _ in range(2):
        state, metrics = step(state, batch)
        sharded_state, sharded_metrics = step(sharded_state, sharded_batch)
    assert any(x.sharding.spec != PartitionSpec() for x in jax.tree.leaves(sharded_state.params))
    np.testing.assert_allclose(float(sharded_metrics["loss"]), float(metrics["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(sharded_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
