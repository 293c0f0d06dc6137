"""Every option acts or is refused: a config field that the chosen phase or algorithm does
not use is an error naming the field and the reason, never silently ignored.

The rules are data: each :class:`Unused` names dotted fields, when they go unused, and why.
A field is refused when it is set to anything but its default while its rule applies, so a
config that leaves it alone (or states its default) passes. Fields not named in any rule are
used by every phase and algorithm of their config type; ``tests/test_config_validation.py`` checks
that each field of the online config is in one of the two groups."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

from rlhf_jax.config import ConfigError
from rlhf_jax.data.formats import FORMATS, Conversation, Ranking
from rlhf_jax.phases.algorithms import ALGORITHMS
from rlhf_jax.phases.config import RMConfig, SFTConfig
from rlhf_jax.phases.online_config import OnlineConfig
from rlhf_jax.phases.protocol import trained_formats
from rlhf_jax.rl import ESTIMATORS


@dataclasses.dataclass(frozen=True)
class Unused:
    fields: tuple[str, ...]  # dotted paths from the config's top level
    applies: Callable[[object], bool]  # config -> whether these fields go unused
    reason: Callable[[object], str]  # config -> why, e.g. "grpo has no critic"
    off: tuple = ()  # values that switch the option off, accepted anywhere (train.samples: 0)


def _section_fields(name: str) -> tuple[str, ...]:
    """The dotted fields of the online config's section ``name``."""
    section = typing.get_type_hints(OnlineConfig)[name]
    return tuple(f"{name}.{field.name}" for field in dataclasses.fields(section))


def _algorithm_rules() -> tuple[Unused, ...]:
    """Per section of the registry's algorithms: it goes unused under an algorithm that reads
    another, and its ``loss_normalizer`` unless the loss aggregation is ``seq_sum``."""
    readers: dict[str, list] = {}
    for algorithm in ALGORITHMS.values():
        readers.setdefault(algorithm.section_key, []).append(algorithm)
    rules = []
    for key, users in readers.items():
        names = [algorithm.name for algorithm in users]
        fields = _section_fields(key)
        rules.append(Unused(fields, lambda c, names=names: c.algorithm not in names,
                            lambda c, key=key, names=names: f"the {key} section configures algorithm "
                            f"{' or '.join(names)}; set algorithm: {names[0]}, or put these options in the "
                            f"{ALGORITHMS[c.algorithm].section_key} section"))
        if f"{key}.loss_normalizer" in fields:
            rules.append(Unused((f"{key}.loss_normalizer",), lambda c, names=names: (
                                    c.algorithm in names and ALGORITHMS[c.algorithm].section(c).loss_aggregation
                                    != "seq_sum"),
                                lambda c: f"{c.algorithm} aggregates its loss by "
                                f"{ALGORITHMS[c.algorithm].section(c).loss_aggregation}; the normaliser is the "
                                f"constant of {ALGORITHMS[c.algorithm].section_key}.loss_aggregation: seq_sum"))
        for option in _estimator_options(fields):
            rules.append(Unused((option,), lambda c, names=names, option=option: (
                                    c.algorithm in names and not _estimator_reads(ALGORITHMS[c.algorithm], option)),
                                lambda c, option=option: f"{c.algorithm}'s advantage estimator "
                                f"({ALGORITHMS[c.algorithm].advantage_estimator.name}) does not read "
                                f"{option.split('.')[-1]}; the estimators that do: " + ", ".join(
                                    e.name for e in ESTIMATORS.values() if option.split(".")[-1] in e.reads)))
    return tuple(rules)


def _estimator_options(fields: tuple[str, ...]) -> tuple[str, ...]:
    """The fields among ``fields`` that only an advantage estimator reads (``rl.ESTIMATORS``)."""
    read = {option for estimator in ESTIMATORS.values() for option in estimator.reads}
    return tuple(field for field in fields if field.split(".")[-1] in read)


def _estimator_reads(algorithm, option: str) -> bool:
    """Whether ``algorithm``'s advantage estimator reads ``option`` (a dotted field)."""
    estimator = getattr(algorithm, "advantage_estimator", None)
    return estimator is not None and option.split(".")[-1] in estimator.reads


def _rows_are(config, example: type) -> bool:
    """Whether ``config.data``'s rows become ``example``s (``data.formats.FORMATS``)."""
    return FORMATS[config.data.format].example is example


def _reward_functions(config) -> bool:
    """Whether the reward section calls a Python function (``reward.function``, a source's, or the
    online ``reward.monitor``)."""
    r = config.reward
    return r.function is not None or r.monitor is not None or any(s.function is not None for s in r.sources)


def _takes_policy_lag(algorithm) -> bool:
    """Whether ``algorithm`` trains on an older policy's samples (a plugin that does not say: no)."""
    return getattr(algorithm, "takes_policy_lag", False)


REWARD_RULES = (  # a reward section's options that act only beside another
    Unused(("reward.tokenizer", "reward.pad_token", "reward.model_weight", "reward.max_length",
            "reward.max_prompt_length"),
           lambda c: c.reward.model is None, lambda c: "there is no reward.model"),
    Unused(("reward.function_weight",), lambda c: c.reward.function is None, lambda c: "there is no reward.function"),
    Unused(("reward.on_error",), lambda c: not _reward_functions(c), lambda c: "there is no reward function"),
    Unused(("reward.penalty",), lambda c: not _reward_functions(c) or c.reward.on_error != "penalty",
           lambda c: "reward.penalty is the score of a failing reward function with reward.on_error: penalty"),
)

ONLINE_RULES = (  # and online_rules(): these and each registered algorithm's section rules
    Unused(("critic", "train.critic_optimizer"), lambda c: not ALGORITHMS[c.algorithm].needs_critic,
           lambda c: f"{c.algorithm} has no critic (PPO only)"),
    Unused(("kl.beta", "kl.kind", "kl.in_loss", "kl.target", "kl.horizon"),
           lambda c: not ALGORITHMS[c.algorithm].uses_reference,
           lambda c: f"{c.algorithm} has no KL to a reference (it fine-tunes on its best samples)"),
    Unused(("train.optimizer",), lambda c: not ALGORITHMS[c.algorithm].uses_policy_optimizer,
           lambda c: f"{c.algorithm} steps the policy by its own rule, not an optimiser"),
    Unused(("ppo.penalty_beta", "ppo.penalty_target"), lambda c: c.ppo.surrogate == "clip",
           lambda c: "the penalty coefficient belongs to ppo.surrogate: kl_penalty"),
    Unused(("ppo.clip_eps",), lambda c: c.ppo.surrogate == "kl_penalty",
           lambda c: "ppo.surrogate: kl_penalty replaces the ratio clip by the adaptive KL penalty"),
    Unused(("kl.horizon",), lambda c: c.kl.target is None,
           lambda c: "the horizon belongs to the adaptive KL controller, which kl.target turns on"),
    Unused(("rollout.dynamic_sampling", "rollout.max_sampling_rounds"),
           lambda c: not ALGORITHMS[c.algorithm].compares_samples,
           lambda c: f"{c.algorithm} scores each completion alone; dynamic sampling drops groups of a prompt's "
                     "samples whose scores are all equal (grpo, rloo, raft)"),
    Unused(("rollout.max_turns",), lambda c: c.rollout.environment is None,
           lambda c: "the turn limit bounds the episodes of rollout.environment"),
    Unused(("reward.overlong_buffer",), lambda c: c.rollout.environment is not None,
           lambda c: "an episode of several turns has no single length limit to ramp the overlong penalty to"),
    Unused(("rollout.max_sampling_rounds",), lambda c: not c.rollout.dynamic_sampling,
           lambda c: "the sampling rounds bound rollout.dynamic_sampling: true"),
    Unused(("rollout.slots", "rollout.page_size", "rollout.cache_pages", "rollout.paged_attention"),
           lambda c: c.rollout.engine == "static",
           lambda c: "this run's rollout.engine is static and the setting is the continuous engine's "
                     "(rollout.engine=continuous uses it)"),
    Unused(("rollout.max_policy_lag",), lambda c: not _takes_policy_lag(ALGORITHMS[c.algorithm]),
           lambda c: f"{c.algorithm} trains only on the policy's own samples (no importance correction); "
                     "algorithms that take a lag: " + ", ".join(n for n, a in ALGORITHMS.items()
                                                                if _takes_policy_lag(a))),
    Unused(("rollout.top_k", "rollout.top_p", "rollout.min_p"), lambda c: c.rollout.temperature == 0,
           lambda c: "rollout.temperature: 0 decodes greedily; the filters act only when sampling"),
    *REWARD_RULES,
    Unused(("reward.process_model", "reward.process_weight"), lambda c: not ALGORITHMS[c.algorithm].needs_critic,
           lambda c: "a step reward needs per-token credit, a critic and GAE over the step ends ("
                     + ", ".join(name for name, a in ALGORITHMS.items() if a.needs_critic) + ")"),
    Unused(("reward.process_weight",), lambda c: c.reward.process_model is None,
           lambda c: "there is no reward.process_model"),
    Unused(("data.truncation", "data.append_eos", "data.pack", "data.shared_prompt", "data.pad_multiple"),
           lambda c: True,
           lambda c: f"{c.algorithm} reads prompts only: an over-long prompt keeps its last max_prompt_length "
                     "tokens (counted), responses are sampled"),
)

OFFLINE_RULES = (
    Unused(("mesh.sampler_rules",), lambda c: True,
           lambda c: "the policy's layout while sampling is for the phases that sample with it (the online ones, "
                     "iterative_dpo, label, evaluate); a phase's samples (train.samples) use the training layout"),
    Unused(("train.samples", "train.sample_tokens"), lambda c: isinstance(c, RMConfig),
           lambda c: "the reward model does not generate; samples are written by sft and dpo", off=(0,)),
    Unused(("train.vocab_chunk",), lambda c: isinstance(c, RMConfig),
           lambda c: "the reward model has a score head, no vocabulary-sized output"),
    Unused(("data.pack",), lambda c: not isinstance(c, SFTConfig),
           lambda c: "packing joins single sequences (SFT); pairs and rankings use data.shared_prompt"),
    Unused(("data.max_prompt_length",), lambda c: _rows_are(c, Conversation),
           lambda c: f"a {c.data.format} row has no separate prompt: a conversation keeps its first max_length "
                     "tokens"),
    Unused(("rm.ranking_loss",), lambda c: isinstance(c, RMConfig) and not _rows_are(c, Ranking),
           lambda c: f"the {c.data.format} format gives pairs; the ranking loss is for the ranking format"),
    Unused(("rm.center_coef",), lambda c: isinstance(c, RMConfig) and _rows_are(c, Ranking),
           lambda c: f"the centring term is for pairs; the {c.data.format} format trains a K-wise loss"),
)


def _default(parent, name: str):
    """The field's default value; ``dataclasses.MISSING`` for a required field."""
    field = {f.name: f for f in dataclasses.fields(parent)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return dataclasses.MISSING if field.default_factory is dataclasses.MISSING else field.default_factory()


def _lookup(config, path: str):
    """``(value, default)`` of the dotted ``path``, or ``None`` when a section on the way is unset."""
    *sections, name = path.split(".")
    node = config
    for section in sections:
        node = getattr(node, section)
        if node is None:
            return None
    return getattr(node, name), _default(node, name)


def _set_leaf(path: str, value, default) -> tuple[str, object]:
    """For a section set as a whole (``train.optimizer``, ``critic``), its first field that
    differs from the default -- what the user wrote -- as ``(dotted path, value)``."""
    if dataclasses.is_dataclass(value) and default is None:
        try:
            default = type(value)()
        except TypeError:  # a section with required fields: name it whole
            return path, value
    if dataclasses.is_dataclass(value) and type(default) is type(value):
        for field in dataclasses.fields(value):
            if getattr(value, field.name) != getattr(default, field.name):
                return _set_leaf(f"{path}.{field.name}", getattr(value, field.name), getattr(default, field.name))
    return path, value


def refuse_unused(config, rules: tuple[Unused, ...], what: str) -> None:
    """:class:`ConfigError` for the first field of ``rules`` that is set while unused."""
    for rule in rules:
        if not rule.applies(config):
            continue
        for path in rule.fields:
            found = _lookup(config, path)
            if found is not None and found[0] != found[1] and found[0] not in rule.off:
                leaf, value = _set_leaf(path, *found)
                raise ConfigError(f"{leaf}={value!r} has no effect in {what}: {rule.reason(config)}. Remove it "
                                  "from the config")


def refuse_missing_checkpoints(config, paths: tuple[str, ...]) -> None:
    """:class:`ConfigError` for the first of the dotted ``paths`` that names a checkpoint
    directory that is not there, or a directory without a config.json -- found before any
    data is read."""
    for path in paths:
        found = _lookup(config, path)
        if found is None or found[0] is None:
            continue
        checkpoint = Path(found[0]).expanduser()
        if (checkpoint / "config.json").is_file() or (checkpoint.suffix == ".gguf" and checkpoint.is_file()):
            continue
        what = ("has no config.json (a directory, not a checkpoint)" if checkpoint.is_dir() else
                "is a file (not .gguf)" if checkpoint.exists() else "does not exist")
        raise ConfigError(f"{path}={found[0]} {what}; give a checkpoint directory (config.json + *.safetensors, "
                          "e.g. a phase's <output_dir>/hf) or a .gguf file")


def online_rules() -> tuple[Unused, ...]:
    """Every online rule: the sections of the algorithms registered now (plugins' included),
    then :data:`ONLINE_RULES`."""
    return (*_algorithm_rules(), *ONLINE_RULES)


def audit_online(config, *, check_paths: bool = True) -> None:
    """:func:`online_rules` for ``config.algorithm``, and (``check_paths``; not for a pipeline's
    later phases, whose checkpoints earlier phases write) the checkpoints it names exist."""
    refuse_unused(config, online_rules(), config.algorithm)
    if check_paths:
        refuse_missing_checkpoints(config, ("model.path", "critic.path", "reward.model", "reward.process_model"))


def audit_offline(config, phase, *, check_paths: bool = True) -> None:
    """The phase's data format, :data:`OFFLINE_RULES`, and (``check_paths``) the checkpoints
    it names exist; ``phase`` has ``name``, ``formats`` and ``checkpoint_fields``."""
    formats = trained_formats(phase)
    if config.data.format not in formats:
        raise ConfigError(f"data.format={config.data.format!r}: {phase.name} trains on {' or '.join(formats)} "
                          "data; give such a file, or run the phase that reads this format")
    refuse_unused(config, OFFLINE_RULES, phase.name)
    if check_paths:
        refuse_missing_checkpoints(config, phase.checkpoint_fields)
