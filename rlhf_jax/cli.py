"""Command-line entry point: ``rlhf-jax COMMAND``."""

from __future__ import annotations

import argparse
import math
import os
import sys

# transformers' notice that torch is absent (the library needs only its tokenizers and configs)
# would be a second stderr line on every run
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from rlhf_jax import __version__
from rlhf_jax.distributed import add_distributed_options, initialize_distributed
from rlhf_jax.platforms import use_platforms_present


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a user fault (a config, a file, a checkpoint, a reward
    function), each carrying a message that names the thing and the fix."""
    from rlhf_jax.checkpoint import CheckpointError
    from rlhf_jax.config import ConfigError
    from rlhf_jax.data import DataError
    from rlhf_jax.models import CheckpointError as ModelCheckpointError
    from rlhf_jax.rl.rewards import RewardError
    from rlhf_jax.train.guard import TrainingDiverged

    return ConfigError, DataError, CheckpointError, ModelCheckpointError, RewardError, TrainingDiverged


def _train(args: argparse.Namespace):
    from rlhf_jax.phases.commands import training_commands

    command = training_commands()[args.command]
    loaded = command.load(args.config, args.overrides)
    return command.run(loaded, resume=args.resume, stop_after=args.stop_after)


def _label(args: argparse.Namespace):
    from rlhf_jax import config
    from rlhf_jax.phases.label import LabelRunConfig, run_label

    return run_label(config.load(LabelRunConfig, args.config, list(args.overrides)))


def _judge(args: argparse.Namespace):
    from rlhf_jax import config
    from rlhf_jax.evaluation.judge_agreement import JudgeAgreementConfig, run_judge_agreement

    return run_judge_agreement(config.load(JudgeAgreementConfig, args.config, list(args.overrides)))


def _pipeline(args: argparse.Namespace):
    from rlhf_jax import config
    from rlhf_jax.pipeline import PipelineConfig, run_pipeline

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:  # `rlhf-jax pipeline key=value ...`: the built-in config
        path, overrides = None, [path, *overrides]
    if args.overoptimisation:
        overrides.append("overoptimisation=true")
    pipeline_config = config.load(PipelineConfig, path, overrides)
    return run_pipeline(pipeline_config, resume=args.resume, stop_after_phase=args.stop_after_phase)


def _convert(args: argparse.Namespace):
    from rlhf_jax.config import package_path
    from rlhf_jax.export import convert
    from rlhf_jax.phases.console import log
    from rlhf_jax.phases.runner import RunResult

    source = package_path(args.source, "source")  # pkg:MODULE/PATH names a file of an installed package
    out = convert(source, args.out, tokenizer=args.tokenizer, pad_token=args.pad_token)
    log(f"wrote {args.source} as a Hugging Face checkpoint (safetensors, tokenizer, generation_config) to {out}")
    return RunResult(0, None, {}, out)


def _plan(args: argparse.Namespace):
    import json
    from pathlib import Path

    if args.devices is not None:  # fake CPU devices: before JAX starts its backends
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    from rlhf_jax import config
    from rlhf_jax.phases.console import log
    from rlhf_jax.plan import cpu_target, describe, plan, tpu_target

    if (args.topology is None) == (args.devices is None):
        raise config.ConfigError("give --topology NAME (a Cloud TPU slice) or --devices N with "
                                 "--device-memory-gb G")
    if args.devices is not None and args.device_memory_gb is None:
        raise config.ConfigError("--devices needs --device-memory-gb (the memory of each device)")
    from rlhf_jax.phases.commands import training_commands

    plannable = {name: command for name, command in training_commands().items() if command.kind != "iterative"}
    if args.phase not in plannable:
        raise config.ConfigError(f"{args.phase!r} is no phase; plan one of {', '.join(plannable)}")
    command = plannable[args.phase]
    phase_config = command.load(args.config, args.overrides)
    command.check(phase_config, check_paths=False)  # what the run would refuse (no paths: a plan reads no weights)
    target = tpu_target(args.topology) if args.topology else cpu_target(args.devices, args.device_memory_gb)
    result = plan(args.phase, phase_config, target)
    for line in describe(result):
        log(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0 if result["fits"] else 1  # an exit code: 1 when a program does not fit


def _task(args: argparse.Namespace):
    from pathlib import Path

    from rlhf_jax import tasks
    from rlhf_jax.phases.console import log
    from rlhf_jax.phases.runner import RunResult

    out = Path(args.out)
    for name, path in tasks.get(args.name).write_data(out, seed=args.seed).items():
        with open(path) as f:
            log(f"wrote {path}: {sum(1 for _ in f)} rows ({name})")
    return RunResult(0, None, {}, out)


def _evaluate(args: argparse.Namespace):
    from rlhf_jax import config
    from rlhf_jax.evaluation.compare import EvaluateConfig, run_evaluate
    from rlhf_jax.phases.audit import refuse_missing_checkpoints

    seeds = [] if args.seeds is None else [f"seeds=[{args.seeds}]"]  # --seeds 0,1,2
    evaluate_config = config.load(EvaluateConfig, args.config, [*args.overrides, *seeds])
    refuse_missing_checkpoints(evaluate_config, ("policy.path", "baseline.path", "judge.model"))
    return run_evaluate(evaluate_config)


def _report(args: argparse.Namespace):
    from rlhf_jax.evaluation.report import write_report
    from rlhf_jax.phases.console import log
    from rlhf_jax.phases.runner import RunResult

    path = write_report(args.run_dir)
    log(f"wrote {path} (plots under {path.parent / 'report'})")
    return RunResult(0, None, {}, path.parent)


def _os_error_message(error: OSError) -> str:
    """An operating-system fault (disk full, a read-only or missing directory) as the file and
    the way out."""
    where = f"{error.filename}: " if error.filename else ""
    return (f"{where}{error.strerror or error}. Free disk space, or choose a directory you can write to, then run "
            "again (a training run resumes with --resume)")


def _quiet_background_errors() -> None:
    """Orbax's save threads and asyncio log each failed write with its traceback before the
    failure reaches the run, which reports it in one line; without ``--debug`` those logs are
    left out."""
    import logging
    import threading

    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    threading.excepthook = lambda hook_args: None
    sys.unraisablehook = _redeliver_interrupts(lambda unraisable: None)


def _redeliver_interrupts(hook):
    """``hook`` for unraisable exceptions, except that a Ctrl-C which landed in a callback that
    cannot raise (jax's garbage-collection callback) is delivered again, to the main thread,
    instead of being lost."""
    import _thread
    import threading

    def unraisable_hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            threading.Timer(0.05, _thread.interrupt_main).start()  # once the callback has returned
        else:
            hook(unraisable)

    return unraisable_hook


def _run(args: argparse.Namespace) -> int:
    """Run the command; a user fault or an operating-system fault (disk full, a read-only
    directory) is one line on stderr and exit code 2 (the traceback with ``--debug``), a run
    that diverged or ended with a non-finite evaluation exits 1, Ctrl-C outside the run's loop
    (which handles it: a checkpoint, then 130) exits 130 with one line."""
    if not args.debug:
        _quiet_background_errors()
    try:
        result = args.handler(args)
    except (*_user_errors(), OSError, KeyboardInterrupt) as error:
        if args.debug:
            raise
        if isinstance(error, KeyboardInterrupt):
            return _interrupted(f"rlhf-jax {args.command}")
        message = _os_error_message(error) if isinstance(error, OSError) else str(error)
        message = " ".join(message.split())  # one line, whatever the cause's formatting
        print(f"rlhf-jax {args.command}: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1 if type(error).__name__ == "TrainingDiverged" else 2
    return result if isinstance(result, int) else _exit_code(args.command, result)


def _exit_code(command: str, result) -> int:
    """0 when the run finished or stopped as asked; 128 + the signal number after SIGTERM/SIGINT;
    1 when the final evaluation holds a non-finite number (a run whose result is NaN failed)."""
    broken = sorted(k for k, v in (result.eval or {}).items() if isinstance(v, float) and not math.isfinite(v))
    if result.stopped_by is None and broken:
        print(f"rlhf-jax {command}: the final evaluation is not finite ({', '.join(f'{k}={result.eval[k]}' for k in broken)});"
              " the run failed. Lower the learning rate or check the data", file=sys.stderr)
        return 1
    return {"SIGTERM": 143, "SIGINT": 130}.get(result.stopped_by, 0)


def _add_run_options(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("config", help="YAML config (see configs/)")
    command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.optimizer.learning_rate=1e-4")
    command.add_argument("--resume", action="store_true",
                         help="continue from the latest checkpoint in output_dir (exact: same state, same data order)")
    command.add_argument("--stop-after", type=int, default=None, metavar=what.upper(),
                         help=f"stop once {what[:-1]} {what.upper()} is done, as if preempted (checkpoint saved; resume "
                              "with --resume); counted from the run's start, not from a resume")
    add_distributed_options(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rlhf_jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    pipeline = commands.add_parser(
        "pipeline", help="SFT -> RM -> PPO (or -> DPO, -> GRPO, ...) in order; default: the built-in letters task")
    pipeline.add_argument("config", nargs="?", default=None,
                          help="YAML config (default: built-in, = configs/pipeline_letters.yaml)")
    pipeline.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo.train.iterations=20 seed=3")
    pipeline.add_argument("--resume", action="store_true",
                          help="continue at the phase and step where an earlier run of this output_dir stopped")
    pipeline.add_argument("--stop-after-phase", "--stop-after-stage", dest="stop_after_phase", default=None,
                          metavar="PHASE", help="stop once this phase has finished (resume the rest with --resume; "
                                                "--stop-after-stage is its earlier name)")
    pipeline.add_argument("--overoptimisation", action="store_true",
                          help="train the final online phase with no KL penalty for 100 iterations and plot the "
                               "task's gold reward and the reward model's proxy against the KL (Gao et al., 2022)")
    add_distributed_options(pipeline)
    pipeline.set_defaults(handler=_pipeline)
    from rlhf_jax.phases.commands import training_commands  # the registries name the training commands

    for name, training in training_commands().items():
        command = commands.add_parser(name, help=training.summary)
        _add_run_options(command, training.unit)
        command.set_defaults(handler=_train)
    for name, handler, summary, configs, example in (
            ("label", _label, "preference pairs from prompts: a policy samples, an AI judge compares under a principle",
             "label_*", "rollout.samples=4"),
            ("judge", _judge, "how often an AI judge agrees with labelled pairs, and its position bias", "judge_*",
             "data.limit=200"),
            ("evaluate", _evaluate, "the trained policy against the starting one on held-out prompts, judged by a "
                                    "reward model training never saw", "eval_*", "prompts=64")):
        command = commands.add_parser(name, help=summary)
        command.add_argument("config", help=f"YAML config (see configs/{configs}.yaml)")
        command.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
        command.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if name == "evaluate":
            command.add_argument("--seeds", default=None, help="sampling seeds, e.g. 0,1,2: every prompt answered "
                                                               "once per seed, the spread of the win rate reported")
        command.set_defaults(handler=handler)
    plan = commands.add_parser("plan", help="does a run fit its devices? compile its programs for a TPU slice (or N "
                                            "CPU devices) with abstract weights and report the memory per device")
    plan.add_argument("phase", help="the command the config is for (sft, rm, dpo, simpo, orpo, grpo, ppo, ...)")
    plan.add_argument("config", help="YAML config")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mesh.fsdp=8")
    plan.add_argument("--topology", default=None, help="a Cloud TPU slice: v4-8, v5e-4, v5e-16, v5p-8, v6e-8, ...")
    plan.add_argument("--devices", type=int, default=None, help="plan for N CPU devices instead")
    plan.add_argument("--device-memory-gb", type=float, default=None, help="with --devices: the memory of each")
    plan.add_argument("--json", default=None, help="also write the plan to this JSON file")
    plan.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    plan.set_defaults(handler=_plan)
    from rlhf_jax.tasks import TASKS

    task = commands.add_parser("task", help="write a built-in task's data: prompts, demonstrations, preference pairs "
                                            "(and held-out problems where the task has them)")
    task.add_argument("name", choices=list(TASKS), help="the built-in task")
    task.add_argument("out", help="the directory to write")
    task.add_argument("--seed", type=int, default=0, help="which problems and which split (default 0)")
    task.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    task.set_defaults(handler=_task)
    report = commands.add_parser("report", help="RUN_DIR/report.md: metric curves (PNG), final evaluation, samples")
    report.add_argument("run_dir", help="a run's output_dir")
    report.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    report.set_defaults(handler=_report)
    convert = commands.add_parser("convert", help="a checkpoint (a GGUF file too) -> Hugging Face safetensors + "
                                                   "tokenizer")
    convert.add_argument("source", help="a .gguf file or a Hugging Face checkpoint directory")
    convert.add_argument("out", help="the directory to write")
    convert.add_argument("--tokenizer", default=None, help="the tokenizer (default: the source's own)")
    convert.add_argument("--pad-token", default=None, help="for a tokenizer without a pad token: eos or a token text")
    convert.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    convert.set_defaults(handler=_convert)
    return parser


INTERRUPTED = ("interrupted (Ctrl-C) outside the run's loop, which stops cleanly on it; the checkpoints written "
               "so far are kept")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; its exit code (see :func:`_run`)."""
    sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while the command's modules load, before _run can catch it
        return _interrupted("rlhf-jax")


def _interrupted(who: str) -> int:
    """Say so in one line and exit 130; a second Ctrl-C (or one delivered again late) during
    the exit is ignored instead of ending it in a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"{who}: {INTERRUPTED}", file=sys.stderr)
    return 130


def _main(argv: list[str] | None) -> int:
    use_platforms_present(sys.argv[1:] if argv is None else argv)  # before JAX starts
    from rlhf_jax.config import ConfigError
    from rlhf_jax.plugins import load_plugins

    try:
        load_plugins()  # before the parser: their phases are commands
    except ConfigError as error:
        print(f"rlhf-jax: {error}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # flags may come before the overrides too
    misplaced = [arg for arg in extra if arg.startswith("-") or "=" not in arg or not hasattr(args, "overrides")]
    if misplaced:
        parser.error(f"unrecognized arguments: {' '.join(misplaced)} (overrides look like key=value)")
    if extra:
        args.overrides = [*args.overrides, *extra]
    initialize_distributed(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
