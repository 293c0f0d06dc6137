"""LoRA on every supported family, biased projections included (Qwen2's q/k/v, GPT-2's fused
c_attn and its biased MLP): the merged model computes what the adapted one does, the export
reloads in transformers with the adapted model's logits, and the adapters-off reference
equals a separately loaded frozen copy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import padded_batch, save_tiny, torch_forward, transformers

from rlhf_jax import models
from rlhf_jax.models.token_logprobs import sequence_logprobs

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

TARGETS = {  # every projection of attention and the MLP that the family has
    "gpt2": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
FAMILIES = ["gpt2", "llama", "qwen2", "gemma", "mistral_window"]


def _random_adapters(model, seed):
    """Non-zero ``A`` and ``B`` everywhere, so the adapters change every output."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merges_exports_and_switches_off_on_every_family(tmp_path, family):
    reference_torch = save_tiny(tmp_path / "base", family)
    ids, mask = padded_batch("right")
    targets = TARGETS["gpt2" if family == "gpt2" else "llama"]
    model = models.apply_lora(models.from_pretrained(tmp_path / "base"), targets, rank=2, alpha=4.0,
                              rngs=nnx.Rngs(0))
    _random_adapters(model, 1)
    adapted = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)

    merged = models.merge_lora(model)
    assert not any(isinstance(m, models.LoRALinear) for _, m in nnx.iter_modules(merged))
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids), jnp.asarray(mask)))[valid], adapted[valid],
                               atol=1e-5)

    models.save_pretrained(model, tmp_path / "export")  # merges first
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export",
                                                                 attn_implementation="eager").eval()
    np.testing.assert_allclose(torch_forward(exported, ids, mask)[valid], adapted[valid], atol=1e-4)
    assert np.abs(torch_forward(reference_torch, ids, mask)[valid] - adapted[valid]).max() > 1e-3  # adapters act

    logprobs = nnx.jit(lambda m: sequence_logprobs(m, jnp.asarray(ids), jnp.asarray(mask)))
    off = np.asarray(logprobs(models.without_lora(model)))
    frozen = np.asarray(logprobs(models.from_pretrained(tmp_path / "base")))
    np.testing.assert_allclose(off, frozen, atol=1e-6)


def test_rlhf_jax_dpo_with_lora_on_qwen2_trains_starts_at_its_base_and_exports(tmp_path):
    """Qwen2's biased q/k/v under LoRA through the command: the first DPO loss is ln 2 (the
    reference is the policy's base, switched off), and the merged export reloads in
    transformers with the trained model's log-probs."""
    import json
    import math

    from phase_runs import cli

    from rlhf_jax.data import byte_tokenizer

    save_tiny(tmp_path / "qwen2", "qwen2", vocab_size=258)
    byte_tokenizer().save_pretrained(tmp_path / "qwen2")
    run = cli("dpo", "configs/dpo_tiny.yaml", "model.init=null", f"model.path={tmp_path / 'qwen2'}",
              "model.lora={rank: 4, alpha: 8, targets: [q_proj, k_proj, v_proj]}", "train.steps=3",
              "train.optimizer.warmup_steps=0", "metrics.progress=false", "train.samples=0",
              f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["kind"] == "dpo/train")
    assert abs(first["loss"] - math.log(2)) < 1e-5
    ids, mask = padded_batch("right")
    ours = models.from_pretrained(tmp_path / "run" / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").eval()
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_forward(exported, ids, mask)[valid],
                               np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))[valid], atol=1e-4)
