"""Config validation up front: YAML numbers like 5e-6 are floats, a duplicate key or a Python
tag is an error, every numeric field has a range, every mapping's keys are checked, and a
field the chosen phase or algorithm does not use is refused (the audit)."""

import dataclasses
import typing

import pytest

from rlhf_jax import config, phases
from rlhf_jax.phases.audit import OFFLINE_RULES, audit_offline, online_rules
from rlhf_jax.phases.online import check_config
from rlhf_jax.phases.online_config import OnlineConfig

SFT = ["data.source=d.jsonl", "data.format=prompt_completion"]
ONLINE = ["data.source=p.jsonl", "data.format=prompt"]


def test_yaml_exponent_numbers_are_floats_in_files_and_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("data: {source: d.jsonl, format: prompt_completion}\ntrain:\n  optimizer:\n    learning_rate: 5e-6\n"
                    "    eps: 1E-8\n")
    loaded = config.load(phases.SFTConfig, path)
    assert loaded.train.optimizer.learning_rate == 5e-6 and loaded.train.optimizer.eps == 1e-8
    overridden = config.load(phases.SFTConfig, path, ["train.optimizer.learning_rate=1e-3"])
    assert overridden.train.optimizer.learning_rate == 1e-3
    assert config.parse_yaml("a: 3\nb: 1e3x\nc: -2.5e+2") == {"a": 3, "b": "1e3x", "c": -250.0}


def test_vocab_chunk_is_automatic_for_large_vocabularies():
    from rlhf_jax.phases.config import resolved_vocab_chunk

    assert config.load(phases.SFTConfig, None, SFT).train.vocab_chunk == "auto"
    assert resolved_vocab_chunk("auto", 49152) == 8192 and resolved_vocab_chunk("auto", 258) is None
    assert resolved_vocab_chunk(None, 49152) is None and resolved_vocab_chunk(512, 258) == 512
    with pytest.raises(config.ConfigError, match="vocab_chunk=0 is out of range"):
        config.load(phases.SFTConfig, None, [*SFT, "train.vocab_chunk=0"])


def test_yaml_booleans_are_yaml_1_2_and_merge_keys_work():
    assert config.parse_yaml("a: yes\nb: true\nc: off\nd: FALSE") == {"a": "yes", "b": True, "c": "off", "d": False}
    assert config.parse_yaml("base: &b {x: 1}\nc:\n  <<: *b\n  y: 2") == {"base": {"x": 1}, "c": {"x": 1, "y": 2}}
    with pytest.raises(config.ConfigError, match="metrics.progress: expected bool, got str 'no'"):
        config.load(phases.SFTConfig, None, [*SFT, "metrics.progress=no"])


@pytest.mark.parametrize("override, message", [
    ("model.init.num_attention_heads=5", "num_attention_heads=5 is not a multiple of num_key_value_heads=2"),
    ("model.init.hidden_size=big", "the sizes .* must be positive integers"),
    ("model.init.hidden_size=0", "must be positive integers|hidden_size=0 must be an integer >= 1"),
    ("model.init.num_hidden_layers=0", "num_hidden_layers=0 must be an integer >= 1"),
    ("model.init.rms_norm_eps=-1", "the norm epsilon -1.0 must be > 0"),
    ("train.steps=2", "optimizer.warmup_steps=3 exceeds steps=2"),
])
def test_model_init_values_and_the_warm_up_are_checked_up_front(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(phases.SFTConfig, "configs/sft_tiny.yaml", [override])


def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("data: {source: d.jsonl, format: prompt_completion}\ntrain:\n  steps: 3\ntrain:\n  batch_size: 2\n")
    with pytest.raises(config.ConfigError, match=r"sft.yaml line 4: the key 'train' appears twice .*first on line 2"):
        config.load(phases.SFTConfig, path)


def test_python_tags_and_broken_yaml_are_one_line_errors(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(config.ConfigError, match=r"evil.yaml line 1: .*python/object/apply:os.system.*not tagged"):
        config.load(phases.SFTConfig, path)
    path.write_text("data: [1,\n")
    with pytest.raises(config.ConfigError, match=r"evil.yaml line \d+, column \d+: not valid YAML"):
        config.load(phases.SFTConfig, path)
    with pytest.raises(config.ConfigError, match=r"config file .*missing.yaml does not exist"):
        config.load(phases.SFTConfig, tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size=0 is out of range; valid: >= 1"),
    ("train.micro_batches=0", "micro_batches=0 is out of range"),
    ("train.batch_size=6", None),  # valid with micro_batches=1
    ("train.steps=-3", "steps=-3 is out of range; valid: >= 1"),
    ("train.log_every=0", "log_every=0 is out of range"),
    ("train.eval_every=-1", "eval_every=-1 is out of range; valid: >= 0"),
    ("train.optimizer.learning_rate=0", "learning_rate=0.0 is out of range; valid: > 0"),
    ("train.optimizer.learning_rate=-1e-4", "learning_rate=-0.0001 is out of range; valid: > 0"),
    ("train.optimizer.learning_rate=.nan", "learning_rate=nan is out of range"),
    ("train.optimizer.b2=1.0", r"b2=1.0 is out of range; valid: \[0, 1\)"),
    ("checkpoint.keep=0", "checkpoint.keep=0 is out of range; valid: >= 1"),
    ("checkpoint.every=0", "every=0 is out of range"),
    ("data.eval_size=-1", "eval_size=-1 is out of range; valid: >= 0"),
    ("data.max_length=1", "max_length=1 is out of range; valid: >= 2"),
    ("data.max_prompt_length=128", "max_prompt_length=128 leaves no room for a response within max_length=128"),
    ("data.truncation=chop", "truncation='chop' is not one of truncate, drop, error"),
    ("data.columns={answer: output}", "columns: 'answer' is not a field of the prompt_completion format; it reads "
                                      "prompt, completion"),
    ("model.init={model_type: llama, hiden_size: 8}", "init.hiden_size is not a llama config.json field; did you "
                                                      "mean 'hidden_size'"),
    ("mesh.fsdp=0", "fsdp=0 is out of range; valid: >= 1, or -1"),
    ("mesh.sampler_rules={mlp: fsdp}", "sampler_rules: heads, kv, mlp, vocab must map as in rules"),
    ("dpo.beta=0", "dpo.beta=0.0 is out of range"),
])
def test_offline_numbers_have_ranges_and_mappings_have_their_keys_checked(override, message):
    cls = phases.DPOConfig if override.startswith("dpo.") else phases.SFTConfig
    overrides = [*SFT, "data.max_length=128", override] if cls is phases.SFTConfig else [
        "data.source=d.jsonl", "data.format=preference", override]
    if message is None:
        config.load(cls, None, overrides)
        return
    with pytest.raises(config.ConfigError, match=message):
        config.load(cls, None, overrides)


@pytest.mark.parametrize("override, message", [
    ("train.iterations=0", "iterations=0 is out of range; valid: >= 1"),
    ("rollout.prompts=0", "prompts=0 is out of range"),
    ("rollout.max_new_tokens=0", "max_new_tokens=0 is out of range"),
    ("rollout.top_p=0", r"top_p=0.0 is out of range; valid: \(0, 1\]"),
    ("ppo.minibatches=0", "minibatches=0 is out of range"),
    ("raft.epochs=0", "epochs=0 is out of range"),
    ("ppo.gamma=1.5", r"gamma=1.5 is out of range; valid: \[0, 1\]"),
    ("grpo.tis_cap=0", "tis_cap=0.0 is out of range; valid: > 0"),
    ("kl.beta=-0.1", "beta=-0.1 is out of range; valid: >= 0"),
    ("trpo.backtrack=0", r"backtrack=0.0 is out of range; valid: \(0, 1\)"),
    ("trpo.backtrack=1.5", r"backtrack=1.5 is out of range; valid: \(0, 1\)"),
    ("reward.max_length=1", "max_length=1 is out of range; valid: >= 2"),
    ("train.critic_optimizer.learning_rate=0", "learning_rate=0.0 is out of range"),
])
def test_online_numbers_have_ranges(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(OnlineConfig, None, [*ONLINE, override])


def _leaf_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = [a for a in (typing.get_args(hints[field.name]) or (hints[field.name],)) if dataclasses.is_dataclass(a)]
        if kind and field.name not in ("critic",):
            yield from _leaf_fields(kind[0], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


# fields every algorithm / phase of the config type uses (the rest are in the audit's rules)
ONLINE_USED_BY_ALL = {"algorithm", "output_dir", "seed", "data.source", "data.format", "data.split", "data.columns",
                      "data.max_length", "data.max_prompt_length", "data.on_malformed", "data.eval_source",
                      "data.eval_size", "data.limit", "data.chat_template", "reward.model", "reward.function", "reward.monitor",
                      "reward.missing_eos_penalty", "reward.whiten", "reward.clip", "reward.overlong_buffer",
                      "rollout.prompts",
                      "rollout.samples", "rollout.max_new_tokens", "rollout.temperature",
                      "rollout.completion_buckets", "rollout.environment", "rollout.engine",
                      # a reward source checks its own fields (RewardSource.__post_init__)
                      *(f"reward.sources.{name}" for name in ("name", "model", "function", "weight", "whiten",
                                                              "tokenizer", "pad_token", "max_length",
                                                              "max_prompt_length"))}


def test_every_online_field_is_used_by_every_algorithm_or_named_in_an_audit_rule():
    audited = {path for rule in online_rules() for path in rule.fields}
    for path in _leaf_fields(OnlineConfig):
        section = path.split(".")[0]
        if section in ("model", "tokenizer", "train", "checkpoint", "mesh", "metrics") and path not in audited:
            continue  # the shared sections: every algorithm builds, trains, checkpoints and logs with them
        assert path in audited or path in ONLINE_USED_BY_ALL, f"{path}: used by every algorithm, or audited?"


@pytest.mark.parametrize("algorithm, override, message", [
    ("grpo", "ppo.entropy_coef=0.1", "ppo.entropy_coef=0.1 has no effect in grpo: the ppo section configures "
                                     "algorithm ppo; set algorithm: ppo, or put these options in the grpo section"),
    ("grpo", "grpo.epochs=2", None),
    ("grpo", "grpo.surrogate=cispo", None),
    ("ppo", "grpo.importance_ratio=sequence", "grpo.importance_ratio='sequence' has no effect in ppo"),
    ("grpo", "reward.overlong_buffer=80", "reward.overlong_buffer=80 exceeds rollout.max_new_tokens=64"),
    ("rloo", "grpo.epochs=2", "grpo.epochs=2 has no effect in rloo"),
    ("rloo", "critic.path=x", "critic.path='x' has no effect in rloo"),
    ("reinforce", "train.critic_optimizer.learning_rate=1e-3",
     "train.critic_optimizer.learning_rate=0.001 has no effect in reinforce"),
    ("trpo", "train.optimizer.learning_rate=1e-3", "train.optimizer.learning_rate=0.001 has no effect in trpo: trpo "
                                                   "steps the policy by its own rule"),
    ("raft", "kl.beta=0.1", "kl.beta=0.1 has no effect in raft"),
    ("raft", "grpo.clip_eps=0.1", "grpo.clip_eps=0.1 has no effect in raft"),
    ("ppo", "ppo.loss_normalizer=64", "ppo.loss_normalizer=64.0 has no effect in ppo: ppo aggregates its loss "
                                      "by token_mean"),
    ("rloo", "rloo.loss_normalizer=64", None),  # RLOO's seq_sum divides by it
    ("ppo", "kl.horizon=100", "kl.horizon=100.0 has no effect in ppo: the horizon belongs to the adaptive"),
    ("grpo", "rollout.top_p=0.9", None),  # sampling at temperature 1: the filter acts
    ("grpo", "rollout.temperature=0", None),
    ("ppo", "reward.max_length=64", "reward.max_length=64 has no effect in ppo: there is no reward.model"),
    ("ppo", "reward.penalty=-2", "reward.penalty=-2.0 has no effect in ppo"),
    ("ppo", "data.pack=true", "data.pack=True has no effect in ppo: ppo reads prompts only"),
    ("grpo", "reward.process_model=runs/prm", "reward.process_model='runs/prm' has no effect in grpo: a step reward "
                                              "needs per-token credit"),
    ("ppo", "reward.process_weight=2", "reward.process_weight=2.0 has no effect in ppo: there is no "
                                       "reward.process_model"),
])
def test_an_unused_online_option_is_refused_naming_it_and_the_algorithm(algorithm, override, message):
    overrides = [*ONLINE, f"algorithm={algorithm}", "reward.function=builtin:letters", "rollout.samples=4", override]
    if override.endswith("temperature=0"):
        overrides.append("rollout.top_k=5")
        message = "rollout.top_k=5 has no effect in grpo: rollout.temperature: 0 decodes greedily"
    loaded = config.load(OnlineConfig, None, overrides)
    if message is None:
        check_config(loaded)
        return
    with pytest.raises(config.ConfigError, match=message):
        check_config(loaded)


@pytest.mark.parametrize("phase, overrides, message", [
    ("rm", ["data.format=preference", "train.samples=8"], "train.samples=8 has no effect in rm"),
    ("dpo", ["data.format=preference", "data.pack=true"], "data.pack=True has no effect in dpo"),
    ("sft", ["data.format=messages", "data.max_prompt_length=8"], "data.max_prompt_length=8 has no effect in sft"),
    ("dpo", ["data.format=preference", "mesh.sampler_rules={vocab: tensor, heads: tensor, kv: tensor, mlp: tensor}"],
     "mesh.sampler_rules={'vocab': 'tensor', 'heads': 'tensor', 'kv': 'tensor', 'mlp': 'tensor'} has no effect in dpo"),
    ("rm", ["data.format=preference", "rm.ranking_loss=plackett_luce"], "rm.ranking_loss='plackett_luce' has no "
                                                                         "effect in rm: the preference format"),
    ("dpo", ["data.format=prompt_completion"], "data.format='prompt_completion': dpo trains on preference or hh_rlhf"),
    ("sft", ["data.format=preference"], "data.format='preference': sft trains on prompt_completion or alpaca or "
                                        "messages"),
])
def test_an_unused_offline_option_or_a_wrong_format_is_refused(phase, overrides, message):
    loaded = config.load(phases.PHASES[phase].config_cls, None, ["data.source=d.jsonl", *overrides])
    with pytest.raises(config.ConfigError, match=message):
        audit_offline(loaded, phases.PHASES[phase])
    assert OFFLINE_RULES  # the table the audit reads


@pytest.mark.parametrize("overrides, message", [
    (["task=null", "judge.prompts=8"], "judge has no effect without a task"),
    (["phases=[rm]", "model.init.hidden_size=32"], r"model is the starting \(sft\) phase's model and there is no such phase"),
    (["grpo.kl.beta=0.1"], r"grpo: a section for a phase that is not in phases \['sft', 'rm', 'ppo'\]"),
    (["judge.samples=0"], "samples=0 is out of range"),
    (["raft.kl.beta=0.1", "phases=[sft, raft]"], "raft.kl.beta=0.1 has no effect in raft"),
])
def test_pipeline_options_act_or_are_refused(tmp_path, overrides, message):
    from rlhf_jax.pipeline import Pipeline, PipelineConfig

    with pytest.raises(config.ConfigError, match=message):
        loaded = config.load(PipelineConfig, None, [f"output_dir={tmp_path}", *overrides])
        Pipeline(loaded).phase_config(loaded.phases[-1], {"sft": tmp_path, "preferences": tmp_path,
                                                          "prompts": tmp_path})


@pytest.mark.parametrize("task", ["letters", "arithmetic"])
def test_every_training_command_is_a_pipeline_phase_that_its_own_checks_accept(tmp_path, task):
    """Each registered phase and algorithm after sft (and rm), with the settings the pipeline
    derives for it on a built-in task: the config its own run would accept (an online
    algorithm with no KL or no optimiser is not handed one), KTO on the pairs as unpaired
    examples, a process reward model handed on to PPO and not to GRPO."""
    from rlhf_jax.phases.commands import training_commands
    from rlhf_jax.pipeline import Pipeline, PipelineConfig
    from rlhf_jax.tasks import get

    data = get(task).write_data(tmp_path / "data", seed=0, write=False)
    for name, command in training_commands().items():
        if command.role != "policy":
            continue
        loaded = config.load(PipelineConfig, None, [f"task={task}", f"output_dir={tmp_path}", f"phases=[sft, rm, {name}]"])
        phase = Pipeline(loaded).phase_config(name, data)
        if name == "kto":
            assert phase.data.source == str(data["unpaired"]) and phase.data.format == "unpaired"
    steps = ["prm.data.source=steps.jsonl", "prm.data.format=steps"]
    for final, process_model in (("ppo", str(tmp_path / "prm" / "hf")), ("grpo", None)):  # GRPO has no critic
        loaded = config.load(PipelineConfig, None, [f"task={task}", f"output_dir={tmp_path}",
                                                    f"phases=[sft, rm, prm, {final}]", *steps])
        assert Pipeline(loaded).phase_config(final, data).reward.process_model == process_model
    with pytest.raises(config.ConfigError, match=f"prm.data: the {task} task writes no data prm trains on"):
        loaded = config.load(PipelineConfig, None, [f"task={task}", f"output_dir={tmp_path}", "phases=[sft, prm, ppo]"])
        Pipeline(loaded).phase_config("prm", data)


def test_remat_auto_turns_on_at_real_model_sizes():
    from rlhf_jax.phases.config import REMAT_AUTO_PARAMETERS, resolved_remat

    assert resolved_remat("auto", REMAT_AUTO_PARAMETERS - 1) == "none"
    assert resolved_remat("auto", REMAT_AUTO_PARAMETERS) == "block"
    assert resolved_remat(True, 10) == "block" and resolved_remat(False, 10**9) == "none"
    assert resolved_remat("save_dots", 10) == "save_dots"


def test_the_configs_algorithms_are_the_registrys_each_with_its_own_section():
    from rlhf_jax.phases.algorithms import ALGORITHMS

    loaded = config.load(OnlineConfig, None, [*ONLINE, "reward.function=builtin:letters", "rollout.samples=4"])
    for name, algorithm in ALGORITHMS.items():
        assert config.load(OnlineConfig, None, [*ONLINE, f"algorithm={name}"]).algorithm == name
        assert algorithm.section(loaded) is getattr(loaded, name)
    with pytest.raises(config.ConfigError, match=f"algorithm: 'ddpg' is not one of {', '.join(ALGORITHMS)}$"):
        config.load(OnlineConfig, None, [*ONLINE, "algorithm=ddpg"])
    assert ALGORITHMS["ppo"].needs_critic and not any(ALGORITHMS[n].needs_critic for n in ("grpo", "rloo", "raft"))
    assert ALGORITHMS["raft"].rows_per_iteration(loaded) == 8 and ALGORITHMS["grpo"].rows_per_iteration(loaded) == 32


def test_the_update_section_of_earlier_versions_names_where_its_options_went():
    with pytest.raises(config.ConfigError, match="unknown config key 'update'; its options moved to the section of "
                                                 "each algorithm"):
        config.load(OnlineConfig, None, [*ONLINE, "update.epochs=2"])
