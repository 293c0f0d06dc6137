"""A LoRA policy's reference is its own base under the adapters: the same arrays (no second
copy of the weights), and the same log-probs as a separately loaded frozen copy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rl_tiny import tiny

from rlhf_jax import models
from rlhf_jax.models import sequence_logprobs, without_lora
from rlhf_jax.train import TrainState


def test_the_lora_reference_shares_the_base_arrays_and_equals_a_frozen_copy():
    policy = models.apply_lora(tiny("lm", 0), ("q_proj", "v_proj"), rank=4, alpha=8, rngs=nnx.Rngs(1))
    tx = optax.adam(1e-1)
    state = TrainState.create(policy, tx, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(2), (3, 10), 1, 16)
    mask = jnp.ones_like(ids)

    @jax.jit
    def step(params):  # move the adapters away from zero, so the policy differs from its base
        grads = jax.grad(lambda p: -jnp.sum(sequence_logprobs(state.model(p), ids, mask)))(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    for _ in range(3):
        state = state.replace(params=step(state.params))
    reference = without_lora(state.model())
    base = {id(x) for x in jax.tree.leaves(state.frozen)}
    assert all(id(x) in base for x in jax.tree.leaves(nnx.state(reference, nnx.Param)))  # the same arrays: no copy
    separate = tiny("lm", 0)  # the frozen copy a separate load would give
    logprobs = nnx.jit(lambda model: sequence_logprobs(model, ids, mask))
    got, want = (np.asarray(logprobs(m)) for m in (reference, separate))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(np.asarray(logprobs(state.model())) - want).max() > 1e-3  # the adapters act


def test_lora_dpo_and_ppo_runs_start_at_the_reference(tmp_path):
    """DPO's first loss is ln 2 and PPO's first KL 0 only if the reference is the policy's base."""
    import json

    from phase_runs import cli

    lora = "model.lora={rank: 4, alpha: 8, targets: [q_proj, v_proj]}"
    dpo = cli("dpo", "configs/dpo_tiny.yaml", lora, "train.steps=2", "train.optimizer.warmup_steps=0",
              "checkpoint.export_hf=false",
              "metrics.progress=false", "train.samples=0", f"output_dir={tmp_path / 'dpo'}")
    assert dpo.returncode == 0, dpo.stderr
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["kind"] == "dpo/train")
    assert first["step"] == 1 and abs(first["loss"] - np.log(2)) < 1e-5, first
    assert 0.1 < first["peak_rss_gb"] < 64  # every phase logs its peak memory
    # max_length 64 = pad_multiple: every batch is padded to 64, one compiled step program
    assert [r["step_programs"] for r in rows if r["kind"] == "dpo/train"] == [1, 1]
    ppo = cli("ppo", "configs/ppo_tiny.yaml", lora, "train.iterations=1", "checkpoint.export_hf=false",
              "metrics.progress=false", f"output_dir={tmp_path / 'ppo'}")
    assert ppo.returncode == 0, ppo.stderr
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if r["kind"] == "ppo/train")
    assert abs(train["kl"]) < 1e-6 and abs(train["first_ratio_max"] - 1) < 1e-6, train
    assert 0.1 < train["peak_rss_gb"] < 64 and train["update_programs"] == 1
