"""Loading a config the way its command does, then the checks a run makes before it starts."""

from pathlib import Path

from rlhf_jax import config, pipeline
from rlhf_jax.evaluation.compare import EvaluateConfig
from rlhf_jax.evaluation.judge_agreement import JudgeAgreementConfig
from rlhf_jax.phases.commands import training_commands
from rlhf_jax.phases.label import LabelRunConfig, check_label

CONFIG_CLASSES = ({"pipeline": pipeline.PipelineConfig, "evaluate": EvaluateConfig, "label": LabelRunConfig,
                   "judge": JudgeAgreementConfig}
                  | {name: command.config_cls for name, command in training_commands().items()})
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
    training = training_commands().get(command)
    if training is not None:
        loaded = training.load(path, overrides)
        training.check(loaded, check_paths=False)
        return loaded
    loaded = config.load(CONFIG_CLASSES[command], path, list(overrides))
    if command == "label":
        check_label(loaded, check_paths=False)
    return loaded
