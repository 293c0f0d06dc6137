"""The command line's multi-host options and the ``jax.distributed`` start they ask for (JAX is
imported only when a run joins several hosts, after the CLI has chosen its platforms)."""

from __future__ import annotations

import argparse


def add_distributed_options(command: argparse.ArgumentParser) -> None:
    """``--debug`` and the multi-host options of a command that trains."""
    command.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    group = command.add_argument_group("several hosts (jax.distributed)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-host run found from the environment (TPU pod slice, SLURM, Open MPI)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, for an explicit multi-host run")
    group.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: how many processes")
    group.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this process's index")


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` before any computation: from the environment with
    ``--distributed``, from ``--coordinator/--num-processes/--process-id`` when given."""
    if not hasattr(args, "coordinator"):  # a command that runs on one process (convert)
        return
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if all(value is None for value in explicit) and not args.distributed:
        return
    import jax

    if args.distributed:
        jax.distributed.initialize()
    elif any(value is None for value in explicit):
        raise SystemExit("rlhf-jax: --coordinator, --num-processes and --process-id go together")
    else:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
