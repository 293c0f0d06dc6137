"""Every command that trains a model, as one record: the offline phases of
:data:`rlhf_jax.phases.PHASES`, the online algorithms of
:data:`rlhf_jax.phases.algorithms.ALGORITHMS` and iterative DPO. The CLI, ``rlhf-jax plan``
and the pipeline read a command's config type, its checks and its run from here, and the
pipeline its role in the chain SFT -> reward model -> policy; nothing else tells the kinds
apart by name."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

from rlhf_jax import config as config_lib
from rlhf_jax.phases.protocol import Role
from rlhf_jax.phases.runner import RunResult



@dataclasses.dataclass(frozen=True)
class TrainingCommand:
    """One training command: ``load`` builds its config from a YAML file and overrides,
    ``check`` refuses a config the run would refuse (raises ``ConfigError``; with
    ``check_paths=False`` checkpoints need not exist yet), ``run(config, *, resume,
    stop_after)`` trains."""

    name: str
    summary: str  # the CLI's one-line help
    kind: Literal["offline", "online", "iterative"]
    role: Role
    config_cls: type
    unit: Literal["steps", "iterations"]  # what --stop-after counts
    check: Callable[..., None]  # (config, *, check_paths) -> None
    run: Callable[..., RunResult]  # (config, *, resume, stop_after) -> RunResult
    record: Any  # the registered phase or algorithm (None for iterative DPO)

    def load(self, path: str | None, overrides: Sequence[str] = ()) -> Any:
        """The config of a run of this command: ``path`` (None: defaults) with ``overrides``;
        an online config says its algorithm, this command (a different one is a ConfigError)."""
        if self.kind != "online":
            return config_lib.load(self.config_cls, path, list(overrides))
        declared = config_lib.load_mapping(path, list(overrides)).get("algorithm", self.name)
        if declared != self.name:
            raise config_lib.ConfigError(f"algorithm: the config says {declared!r} but the command is {self.name!r}; "
                                         f"run `rlhf-jax {declared}` or change algorithm")
        return config_lib.load(self.config_cls, path, [*overrides, f"algorithm={self.name}"])


def training_commands() -> dict[str, TrainingCommand]:
    """The training commands by name, in the order offline phases, online algorithms,
    iterative DPO -- read from the registries each call, so a phase or algorithm registered
    by a plugin is one."""
    from rlhf_jax.phases import PHASES, run_phase
    from rlhf_jax.phases.algorithms import ALGORITHMS
    from rlhf_jax.phases.audit import audit_offline
    from rlhf_jax.phases.iterative_dpo import IterativeDPOConfig, check_config as check_iterative, run_iterative_dpo
    from rlhf_jax.phases.online import check_config as check_online, run_online
    from rlhf_jax.phases.online_config import OnlineConfig

    commands = [TrainingCommand(name, phase.summary, "offline", phase.pipeline_role, phase.config_cls, "steps",
                                functools.partial(audit_offline, phase=phase), functools.partial(run_phase, phase),
                                phase)
                for name, phase in PHASES.items()]
    commands += [TrainingCommand(name, algorithm.summary, "online", "policy", OnlineConfig, "iterations",
                                 check_online, run_online, algorithm)
                 for name, algorithm in ALGORITHMS.items()]
    commands.append(TrainingCommand(
        "iterative_dpo", "rounds of sample -> label (reward model or function) -> DPO from the current policy",
        "iterative", "policy", IterativeDPOConfig, "steps", check_iterative, run_iterative_dpo, None))
    return {command.name: command for command in commands}
