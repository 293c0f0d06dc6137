"""The reward sources of a config, built and placed on the mesh: a reward model (with its own
tokenizer, its trained score head checked), a Python function, their weighted sums, a process
reward model's step rewards, and the monitored function that is logged but never optimised
(``rl.rewards``, ``rl.process_rewards``). Every online algorithm, iterative DPO and
``rlhf-jax evaluate`` (its judge) build theirs here."""

from __future__ import annotations

from rlhf_jax.config import ConfigError
from rlhf_jax.data import has_tokenizer, load_tokenizer
from rlhf_jax.models.hf import has_score_head
from rlhf_jax.models.sharding import place, rules_of, rows_sharding
from rlhf_jax.phases.config import ModelConfig
from rlhf_jax.phases.online_config import RewardConfig, RewardSource
from rlhf_jax.phases.setup import BATCH_AXES, build_model
from rlhf_jax.rl.process_rewards import ProcessReward
from rlhf_jax.phases.console import log
from rlhf_jax.rl.rewards import FunctionReward, ModelReward, SumReward, load_function
from rlhf_jax.rl.scorer_prompts import PROMPT_FORMAT_FILE, PromptTable, read_prompt_format


def refuse_untrained_head(path: str, what: str) -> None:
    """``ConfigError`` naming the config key ``what`` when checkpoint ``path``, which is to
    score (a reward model, a process reward model, a judge), has no trained score head: a
    language model's would be drawn at random, and its scores would be noise."""
    if not has_score_head(path):
        raise ConfigError(f"{what}={path} has no trained score head (it is a language model, whose score head would "
                          "be random); give a reward model's checkpoint, e.g. the rm (or prm) phase's <output_dir>/hf")


def build_model_reward(c: RewardConfig | RewardSource, policy_tokenizer, mesh, *, seed: int,
                       prompts: PromptTable, what: str = "reward.model", name: str | None = None):
    """A :class:`ModelReward` on checkpoint ``c.model`` with its own tokenizer (``c.tokenizer``,
    else the checkpoint's, else the policy's), placed on ``mesh``, scoring its batches split
    over the batch axes, each prompt rendered as the checkpoint records its training rendered
    them (``rl.scorer_prompts``; ``prompts`` leads a prompt text to its data row). Raises
    ``ConfigError`` for an unreadable record."""
    if c.tokenizer is not None or has_tokenizer(c.model):
        tokenizer = load_tokenizer(c.tokenizer or c.model, pad_token=c.pad_token, needs_eos=False)
    else:
        tokenizer = policy_tokenizer
    refuse_untrained_head(c.model, what)
    try:
        prompt_format = read_prompt_format(c.model)
    except ValueError as error:
        raise ConfigError(f"{what}={c.model}: {error}") from None
    scored = {"chat_template": "prompts rendered with its own chat template, as its training did",
              "text": "the data's prompt text as written, as its training did",
              None: f"the policy's prompt text: it records no prompt format ({PROMPT_FORMAT_FILE})"}[prompt_format]
    log(f"{what}={c.model} scores {scored}")
    model = place(build_model(ModelConfig(path=c.model), "score", tokenizer=tokenizer, seed=seed, what=what), mesh,
                  rules_of(mesh, frozen=True))
    return ModelReward(model, tokenizer, max_length=c.max_length, name=name or c.model,
                       max_prompt_length=c.max_prompt_length, prompt_format=prompt_format, prompts=prompts,
                       rows_sharding=lambda rows: rows_sharding(mesh, rows, BATCH_AXES))


def build_reward(c: RewardConfig, policy_tokenizer, mesh, *, seed: int, prompts: PromptTable,
                 what: str = "reward.model"):
    """The reward source of ``c`` (see :mod:`rlhf_jax.rl.rewards`): a model, a function, their
    weighted sum, or the weighted sum of the named ``c.sources``; a reward model is placed on
    ``mesh``, scores its batches split over the batch axes and reads each prompt in its own
    training format (:func:`build_model_reward`; ``prompts`` holds the rows the scored
    prompts were rendered from)."""
    section = what.split(".")[0]

    def function(spec: str, name: str) -> FunctionReward:
        return FunctionReward(load_function(spec), name, on_error=c.on_error, penalty=c.penalty, section=section)

    if c.sources:
        return SumReward([(s.weight, build_model_reward(s, policy_tokenizer, mesh, seed=seed, prompts=prompts, name=s.name,
                                                        what=f"{section}.sources.{s.name}.model")
                           if s.model is not None else function(s.function, s.name), s.whiten) for s in c.sources])
    parts = []
    if c.model is not None:
        parts.append((c.model_weight, build_model_reward(c, policy_tokenizer, mesh, seed=seed, prompts=prompts,
                                                        what=what)))
    if c.function is not None:
        parts.append((c.function_weight, function(c.function, c.function)))
    return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else SumReward(parts)


def build_process_reward(c: RewardConfig, policy_tokenizer, mesh, *, seed: int) -> ProcessReward | None:
    """The step rewards of ``c.process_model`` (``rl.process_rewards``), placed on ``mesh``;
    None without one. Raises ``ConfigError`` when its checkpoint carries a tokenizer other than
    the policy's: it reads the policy's token ids."""
    if c.process_model is None:
        return None
    if has_tokenizer(c.process_model) and load_tokenizer(c.process_model).get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(f"reward.process_model={c.process_model} has a tokenizer other than the policy's; a process "
                          "reward model reads the policy's tokens: train it from the policy's checkpoint (rlhf-jax prm "
                          "with model.path: the SFT model)")
    refuse_untrained_head(c.process_model, "reward.process_model")
    prm = place(build_model(ModelConfig(path=c.process_model), "score", tokenizer=policy_tokenizer, seed=seed,
                            what="reward.process_model"), mesh, rules_of(mesh, frozen=True))
    return ProcessReward(prm, policy_tokenizer, c.process_weight)


def build_monitor(c: RewardConfig) -> FunctionReward | None:
    """``c.monitor``, a function scored on every batch and logged but never optimised (a task's
    gold reward beside the reward model the policy trains on), failing as ``c.on_error`` says;
    None without one."""
    if c.monitor is None:
        return None
    return FunctionReward(load_function(c.monitor, "reward.monitor"), c.monitor, on_error=c.on_error,
                          penalty=c.penalty, role="reward.monitor")
