"""Loading a config the way its command does, then the checks a run makes before it starts."""

from pathlib import Path

from rlhf_jax import config, phases, pipeline
from rlhf_jax.evaluation.compare import EvaluateConfig
from rlhf_jax.evaluation.judge_agreement import JudgeAgreementConfig
from rlhf_jax.phases.algorithms import ALGORITHMS
from rlhf_jax.phases.audit import audit_offline
from rlhf_jax.phases.iterative_dpo import IterativeDPOConfig
from rlhf_jax.phases.iterative_dpo import check_config as check_iterative_dpo
from rlhf_jax.phases.label import LabelRunConfig, check_label
from rlhf_jax.phases.online import check_config as check_online
from rlhf_jax.phases.online_config import OnlineConfig

CONFIG_CLASSES = ({"pipeline": pipeline.PipelineConfig, "evaluate": EvaluateConfig, "iterative_dpo": IterativeDPOConfig,
                   "label": LabelRunConfig, "judge": JudgeAgreementConfig}
                  | {name: OnlineConfig for name in ALGORITHMS}
                  | {name: phase.config_cls for name, phase in phases.PHASES.items()})
FILE_PREFIXES = {"eval": "evaluate"}  # configs/eval_*.yaml are evaluate's


def command_of(path: Path) -> str | None:
    """The command a shipped config is for, from its name ``<command>_<what>.yaml``."""
    names = [*CONFIG_CLASSES, *FILE_PREFIXES]
    prefix = max((name for name in names if path.stem.startswith(f"{name}_")), key=len, default=None)
    return FILE_PREFIXES.get(prefix, prefix)


def load_and_check(command: str, path: str | Path | None, overrides=()):
    """The config ``command`` would run with (``path`` plus ``overrides``), after the checks it
    makes before a run; paths to checkpoints and data are not required to exist yet (another
    recipe may write them)."""
    overrides = [*overrides, f"algorithm={command}"] if command in ALGORITHMS else list(overrides)
    loaded = config.load(CONFIG_CLASSES[command], path, overrides)
    if command in phases.PHASES:
        audit_offline(loaded, phases.PHASES[command], check_paths=False)
    elif command == "iterative_dpo":
        check_iterative_dpo(loaded, check_paths=False)
    elif command == "label":
        check_label(loaded, check_paths=False)
    elif command in ALGORITHMS:
        check_online(loaded, check_paths=False)
    return loaded
