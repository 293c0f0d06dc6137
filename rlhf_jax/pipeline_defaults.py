"""The pipeline's settings of each phase for a built-in task: small and fast (minutes on 2
CPU cores), read from what a phase declares -- its role in the chain, the data formats it
trains on, an online algorithm's needs -- so a phase or algorithm a plugin registers gets
them too. A task's own settings (``Task.pipeline_defaults``) go over them, and a phase's
section in the pipeline config over both."""

from __future__ import annotations

from pathlib import Path

from rlhf_jax import config as config_lib
from rlhf_jax.phases.commands import TrainingCommand
from rlhf_jax.phases.protocol import trained_formats
from rlhf_jax.tasks import Task

# which of a task's files (tasks.files.task_paths) holds each data format
FORMAT_FILES = {"prompt_completion": "sft", "preference": "preferences", "unpaired": "unpaired", "prompt": "prompts"}
MAX_LENGTH = 32  # tokens of an offline phase's sequences (the built-in tasks' are short)
# an offline phase's training by its role: (train section, held-out rows); a process reward
# model trains as a reward model does
_REWARD_MODEL = ({"steps": 200, "batch_size": 32, "optimizer": {"learning_rate": 1e-3, "warmup_steps": 10}}, 128)
OFFLINE_TRAIN = {
    "start": ({"steps": 200, "batch_size": 32, "optimizer": {"learning_rate": 3e-3, "warmup_steps": 10}}, 64),
    "reward": _REWARD_MODEL,
    "process_reward": _REWARD_MODEL,
    "policy": ({"steps": 100, "batch_size": 32, "optimizer": {"learning_rate": 1e-4}}, 128),
}


def _prompts(data: dict[str, Path]) -> dict:
    # the built-in tasks are plain text, not chats: no template around their prompts
    return {"source": str(data["prompts"]), "format": "prompt", "max_length": 16, "eval_size": 64,
            "chat_template": "never"}


def offline_defaults(command: TrainingCommand, data: dict[str, Path]) -> dict:
    """An offline phase's settings: the first of its formats the task has a file of (none:
    the phase's section names its data), and its role's training."""
    train, eval_size = OFFLINE_TRAIN[command.role]
    settings = {"train": train, "checkpoint": {"every": 50}}
    fmt = next((f for f in trained_formats(command.record) if FORMAT_FILES.get(f) in data), None)
    if fmt is None:
        return settings
    return settings | {"data": {"source": str(data[FORMAT_FILES[fmt]]), "format": fmt, "max_length": MAX_LENGTH,
                                "eval_size": eval_size, "chat_template": "never"}}


def online_defaults(command: TrainingCommand, data: dict[str, Path]) -> dict:
    """An online algorithm's settings: a group of 4 samples for one that compares a prompt's
    samples, PPO's critic optimiser for one with a critic, one pass per rollout for the
    group methods and 4 x 2 minibatches for the others (TRPO's own step aside)."""
    algorithm = command.record
    settings = {"data": _prompts(data), "rollout": {"prompts": 32, "max_new_tokens": 16}, "kl": {"beta": 0.02},
                "reward": {"missing_eos_penalty": 0.2},
                "train": {"iterations": 40, "optimizer": {"learning_rate": 1e-3, "schedule": "constant"},
                          "eval_prompts": 32},
                "checkpoint": {"every": 10}}
    if algorithm.needs_critic:
        settings["train"]["critic_optimizer"] = {"learning_rate": 1e-3, "schedule": "constant"}
    if algorithm.compares_samples:
        settings["rollout"] = {"prompts": 8, "samples": 4, "max_new_tokens": 16}
        settings[algorithm.section_key] = {"epochs": 1}
    elif algorithm.uses_policy_optimizer:
        settings[algorithm.section_key] = {"epochs": 4, "minibatches": 2}
    return settings


def without_unused(command: TrainingCommand, settings: dict) -> dict:
    """``settings`` without what an online algorithm refuses as having no effect (a KL for
    one with no reference, a policy optimiser for one that steps by its own rule)."""
    algorithm = command.record
    if command.kind != "online":
        return settings
    if not algorithm.uses_reference:
        settings = {key: value for key, value in settings.items() if key != "kl"}
    if not algorithm.uses_policy_optimizer and "train" in settings:
        settings = settings | {"train": {k: v for k, v in settings["train"].items() if k != "optimizer"}}
    return settings


def iterative_defaults(data: dict[str, Path]) -> dict:
    """Iterative DPO's settings: 128 prompts x 4 samples a round, each round 40 DPO steps."""
    return {"data": _prompts(data), "rollout": {"prompts": 128, "samples": 4, "max_new_tokens": 16},
            "round": {"data": {"max_length": MAX_LENGTH}, "checkpoint": {"every": 20},
                      "train": {"steps": 40, "batch_size": 32, "optimizer": {"learning_rate": 1e-4}}}}


KIND_DEFAULTS = {"offline": offline_defaults, "online": online_defaults,
                 "iterative": lambda command, data: iterative_defaults(data)}


def task_defaults(command: TrainingCommand, task: Task, data: dict[str, Path]) -> dict:
    """The settings of ``command``'s phase for ``task`` whose files are ``data``: the generic
    ones, the task's own for this phase (or, for an online algorithm, for ``online``) over
    them, less what the algorithm refuses."""
    own = task.pipeline_defaults
    specific = own.get(command.name, own.get("online", {}) if command.kind == "online" else {})
    return without_unused(command, config_lib.merge(KIND_DEFAULTS[command.kind](command, data), specific))
