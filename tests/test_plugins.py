"""Extension points from outside the package: a plugin file (``RLHF_JAX_PLUGINS``) adds a toy
model family, a toy data format, a toy offline loss and a toy online algorithm with one
registration each, and the CLI runs them: the toy phase is a command that trains the toy
family on the toy format's rows, exports under its own class and tensor names, and loads
back; the toy phase and algorithm are pipeline phases."""

import json

import numpy as np
import pytest
from phase_runs import ROOT, cli

PLUGIN = ROOT / "tests" / "plugins" / "toy_extensions.py"


def test_a_plugin_adds_a_family_a_data_format_and_an_offline_loss_that_the_cli_runs(tmp_path):
    """The toy family trains on the toy format's rows with the toy loss; the format reads the
    rows into the examples the built-in format reads from the same pairs."""
    from safetensors.numpy import load_file

    demonstrations = [json.loads(line) for line in (ROOT / "tests" / "data" / "sft.jsonl").read_text().splitlines()]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": row["prompt"], "answer": row["completion"]}) + "\n"
                          for row in demonstrations))
    run = cli("toy_sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path}", "model.init.model_type=toy",
              f"data.source={qa}", "data.format=toy_qa",
              "train.steps=2", "train.optimizer.warmup_steps=0", "train.samples=0", "metrics.progress=false",
              extra_env={"RLHF_JAX_PLUGINS": str(PLUGIN)})
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "toy_sft/train"]
    assert len(losses) >= 1 and all(np.isfinite(losses))
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["model_type"] == "toy" and exported["architectures"] == ["ToyForCausalLM"]
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors and all(name.startswith(("toy.", "lm_head.")) for name in tensors), sorted(tensors)[:3]

    from rlhf_jax import models
    from rlhf_jax.data import load_examples
    from rlhf_jax.plugins import load_plugins

    load_plugins({"RLHF_JAX_PLUGINS": str(PLUGIN)})  # in this process too, to load the export back
    try:
        toy_rows, _ = load_examples(str(qa), "toy_qa")
        built_in, _ = load_examples(str(ROOT / "tests" / "data" / "sft.jsonl"), "prompt_completion")
        assert [row[1][:2] for row in toy_rows] == [row[1][:2] for row in built_in]
        reloaded = models.from_pretrained(tmp_path / "hf")
        np.testing.assert_array_equal(np.asarray(reloaded.model.embed_tokens.embedding[...]),
                                      tensors["toy.embed_tokens.weight"])
    finally:  # leave the registries as the other tests know them
        _unregister()


def _unregister() -> None:
    from rlhf_jax.data import FORMATS
    from rlhf_jax.models.families import FAMILIES
    from rlhf_jax.phases import PHASES
    from rlhf_jax.phases.algorithms import ALGORITHMS
    from rlhf_jax.rl import ESTIMATORS

    for registry, name in ((FAMILIES, "toy"), (FORMATS, "toy_qa"), (PHASES, "toy_sft"), (ALGORITHMS, "toy_median"),
                           (ESTIMATORS, "median")):
        registry.pop(name, None)


def test_a_plugins_phase_and_algorithm_chain_in_the_pipeline_and_its_estimator_is_the_median(tmp_path):
    """The toy phase starts the pipeline (an SFT variant) and the toy algorithm, which reads
    the rloo section's options and its own advantage estimator (the group median as the
    baseline, worked out here for one group), trains the policy from its checkpoint; the
    summary judges both."""
    import jax.numpy as jnp

    run = cli("pipeline", "phases=[toy_sft,toy_median]", f"output_dir={tmp_path}", "toy_sft.train.steps=2",
              "toy_sft.train.optimizer.warmup_steps=1",
              "toy_median.train.iterations=2", "toy_median.checkpoint.every=2", "toy_median.rollout.max_new_tokens=4",
              "judge.prompts=2", "judge.samples=1", "judge.max_new_tokens=4", "metrics.progress=false",
              extra_env={"RLHF_JAX_PLUGINS": str(PLUGIN)})
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "toy_median" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "toy_median/train"] == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["policies"]) == ["toy_sft", "toy_median"]

    from rlhf_jax.plugins import load_plugins
    from rlhf_jax.rl import ESTIMATORS

    load_plugins({"RLHF_JAX_PLUGINS": str(PLUGIN)})
    try:
        advantages, _ = ESTIMATORS["median"].advantages(jnp.asarray([[0.0, 1.0, 3.0, 10.0]]), None)
        np.testing.assert_allclose(advantages, [[-2.0, -1.0, 1.0, 8.0]])  # the median of 0, 1, 3, 10 is 2
    finally:
        _unregister()


def test_a_plugin_that_cannot_load_is_one_line_naming_it(tmp_path):
    run = cli("sft", "configs/sft_tiny.yaml", extra_env={"RLHF_JAX_PLUGINS": str(tmp_path / "missing.py")})
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "RLHF_JAX_PLUGINS: plugin" in run.stderr and "missing.py" in run.stderr and "no file" in run.stderr


def test_registries_refuse_a_second_owner_of_a_name():
    from rlhf_jax.models import Family, register_family
    from rlhf_jax.models.families import llama
    from rlhf_jax.phases import PHASES, register_phase

    with pytest.raises(ValueError, match="model_type 'llama' is already read by family llama"):
        register_family(Family("mine", {"llama": "Mine"}, llama.config_from_hf, llama.tensor_names))
    with pytest.raises(ValueError, match="an offline phase named 'sft' is already registered"):
        register_phase(PHASES["sft"])
