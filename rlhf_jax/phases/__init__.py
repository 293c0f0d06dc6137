"""The offline phases -- SFT, reward model, DPO -- each a small object (loss, evaluation,
data check) run by one shared loop, :func:`run_phase`."""

import typing

from rlhf_jax.phases.config import (DPOConfig, KTOConfig, ORPOConfig, PhaseConfig, PRMConfig, RMConfig, SFTConfig,
                                   SimPOConfig)
from rlhf_jax.phases.dpo import DPOPhase
from rlhf_jax.phases.kto import KTOPhase
from rlhf_jax.phases.reference_free import ORPOPhase, SimPOPhase
from rlhf_jax.phases.prm import PRMPhase
from rlhf_jax.phases.protocol import Phase, Role
from rlhf_jax.phases.rm import RMPhase
from rlhf_jax.phases.runner import RunResult, run_phase
from rlhf_jax.phases.sft import SFTPhase

PHASES: dict[str, Phase] = {}  # the CLI sub-command -> its phase


def register_phase(phase: Phase) -> Phase:
    """Add an offline phase (``phases.protocol.Phase``: its loss, evaluation, data formats,
    config class and pipeline role) under its ``name``, which becomes a CLI command; returns
    it. Raises ``ValueError`` for a name already taken or a ``pipeline_role`` that is not a
    ``phases.protocol.Role``."""
    if phase.name in PHASES:
        raise ValueError(f"an offline phase named {phase.name!r} is already registered")
    roles = typing.get_args(Role)
    if getattr(phase, "pipeline_role", None) not in roles:
        raise ValueError(f"offline phase {phase.name!r}: pipeline_role should be one of {', '.join(roles)} (its "
                         f"place in the pipeline), got {getattr(phase, 'pipeline_role', None)!r}")
    PHASES[phase.name] = phase
    return phase


for _phase in (SFTPhase(), RMPhase(), DPOPhase(), SimPOPhase(), ORPOPhase(), KTOPhase(), PRMPhase()):
    register_phase(_phase)

__all__ = ["PHASES", "register_phase", "DPOConfig", "DPOPhase", "KTOConfig", "KTOPhase", "ORPOConfig", "ORPOPhase", "PhaseConfig", "PRMConfig", "PRMPhase",
           "RMConfig", "RMPhase",
           "RunResult", "SFTConfig", "SFTPhase", "SimPOConfig", "SimPOPhase", "run_phase"]
