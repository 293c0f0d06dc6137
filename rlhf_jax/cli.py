"""Command-line entry point: ``rlhf-jax COMMAND``."""

from __future__ import annotations

import argparse
import json
import sys

from rlhf_jax import __version__


def _demo(args: argparse.Namespace) -> int:
    from rlhf_jax import config, demo

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:  # `rlhf-jax demo key=value ...`: no config file
        path, overrides = None, [path, *overrides]
    try:
        demo_config = config.load(demo.DemoConfig, path, overrides)
    except config.ConfigError as error:
        print(f"rlhf-jax demo: {error}", file=sys.stderr)
        return 2
    summary = demo.run(demo_config)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _phase(args: argparse.Namespace) -> int:
    from rlhf_jax import config
    from rlhf_jax.checkpoint import CheckpointError
    from rlhf_jax.data import DataError
    from rlhf_jax.phases import PHASES, run_phase

    phase = PHASES[args.command]
    try:
        phase_config = config.load(phase.config_cls, args.config, list(args.overrides))
        result = run_phase(phase, phase_config, resume=args.resume, stop_after=args.stop_after)
    except (config.ConfigError, DataError, CheckpointError) as error:
        print(f"rlhf-jax {args.command}: {error}", file=sys.stderr)
        return 2
    if result.stopped_by in ("SIGTERM", "SIGINT"):
        return 128 + {"SIGTERM": 15, "SIGINT": 2}[result.stopped_by]
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rlhf_jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="offline SFT -> RM -> PPO on a bigram LM with a known gold reward (no download)",
    )
    demo.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in, = configs/demo.yaml)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo_iterations=20 seed=3")
    demo.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    demo.set_defaults(handler=_demo)
    for name, text in (("sft", "supervised fine-tuning on demonstrations"),
                       ("rm", "a Bradley-Terry reward model on comparisons"),
                       ("dpo", "direct preference optimisation (and IPO / hinge / robust)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("config", help="YAML config (see configs/)")
        command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=20 train.optimizer.learning_rate=1e-4")
        command.add_argument("--resume", action="store_true",
                             help="continue from the latest checkpoint in output_dir (exact: same state, same data order)")
        command.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                             help="stop after this many steps as if preempted (checkpoint saved; resume with --resume)")
        command.set_defaults(handler=_phase)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
