"""bf16 weights and compute with float32 optimizer moments: the tiny model's SFT loss curve in
bf16 tracks the float32 one; a float32 master copy keeps the updates bf16 rounds away."""

import json

from phase_runs import checkpoint_arrays, cli

SHORT = ["train.steps=12", "checkpoint.every=12", "checkpoint.export_hf=false", "metrics.progress=false"]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "sft/train"]


def test_a_bf16_run_tracks_the_float32_loss_curve(tmp_path):
    f32 = cli("sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'f32'}", *SHORT, "train.log_every=1")
    bf16 = cli("sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'bf16'}", *SHORT, "train.log_every=1",
               "model.dtype=bfloat16", "model.param_dtype=bfloat16")
    assert f32.returncode == 0 and bf16.returncode == 0, bf16.stderr
    full, half = _losses(tmp_path / "f32"), _losses(tmp_path / "bf16")
    assert len(full) == len(half) == 12 and full[-1] < 0.8 * full[0]  # it learns
    # bf16 keeps 8 bits of mantissa: each step's loss within 3% of float32's (measured: under 1%)
    for step, (a, b) in enumerate(zip(full, half), start=1):
        assert abs(b - a) <= 0.03 * a, (step, a, b)
    state = checkpoint_arrays(tmp_path / "bf16", 12)
    weights = {str(leaf.dtype) for leaf in _leaves(state["params"]) if leaf.ndim >= 2}
    moments = {str(leaf.dtype) for leaf in _leaves(state["opt_state"]) if leaf.ndim >= 2}
    assert weights == {"bfloat16"} and moments == {"float32"}  # bf16 weights, float32 Adam moments


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [] if tree is None or not hasattr(tree, "dtype") else [tree]


def test_master_weights_keep_the_updates_bf16_rounds_away_and_equal_the_float32_run():
    """SGD steps of 1e-3 on bf16 weights at 1.0 (whose rounding step there is 2^-7): without a
    master copy every update rounds away and the weights never move; with one, the float32
    master takes exactly the float32 run's steps and the weights are it rounded."""
    import jax.numpy as jnp
    import optax

    from rlhf_jax.train.optim import with_master_weights

    params = {"w": jnp.ones(4, jnp.bfloat16)}
    grads = {"w": jnp.ones(4, jnp.bfloat16)}
    inner = optax.sgd(1e-3)
    plain, plain_state = params, inner.init(params)
    master, master_tx = params, with_master_weights(inner)
    master_state = master_tx.init(params)
    full = {"w": jnp.ones(4, jnp.float32)}
    full_state = inner.init(full)
    for _ in range(20):
        updates, plain_state = inner.update(grads, plain_state, plain)
        plain = optax.apply_updates(plain, updates)
        updates, master_state = master_tx.update(grads, master_state, master)
        master = optax.apply_updates(master, updates)
        updates, full_state = inner.update({"w": grads["w"].astype(jnp.float32)}, full_state, full)
        full = optax.apply_updates(full, updates)
    assert plain["w"].dtype == master["w"].dtype == jnp.bfloat16
    assert bool(jnp.all(plain["w"] == 1.0))  # every step lost
    assert master_state.master["w"].dtype == jnp.float32
    assert bool(jnp.all(master_state.master["w"] == full["w"])) and float(full["w"][0]) < 0.9805
    assert bool(jnp.all(master["w"] == full["w"].astype(jnp.bfloat16)))


def test_the_master_weights_option_trains_a_bf16_model_through_its_optimizer_config():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rlhf_jax import config, models
    from rlhf_jax.data.batches import Sequences
    from rlhf_jax.phases.config import SFTConfig
    from rlhf_jax.train import TrainState, make_optimizer, make_train_step
    from rlhf_jax.train.sft import sft_loss_sums

    loaded = config.load(SFTConfig, "configs/sft_tiny.yaml", ["train.optimizer.master_weights=true",
                                                              "train.optimizer.total_steps=10"])
    model = models.build_model(models.config_from_hf({**loaded.model.init, "vocab_size": 64}), "lm",
                               rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    tx = make_optimizer(loaded.train.optimizer)
    state = TrainState.create(model, tx, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (1, 2, 16), 0, 64)
    batch = Sequences(ids, jnp.ones_like(ids), jnp.ones_like(ids), None)
    step = jax.jit(make_train_step(sft_loss_sums, tx))
    for _ in range(3):
        state, _ = step(state, batch)
    master = state.opt_state.master
    for weight, copy in zip(jax.tree.leaves(state.params), jax.tree.leaves(master), strict=True):
        assert weight.dtype == jnp.bfloat16 and copy.dtype == jnp.float32
        assert bool(jnp.all(weight == copy.astype(jnp.bfloat16)))
    assert any(bool(jnp.any(w != c)) for w, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(master)))
