"""The offline phases -- SFT, reward model, DPO -- each a small object (loss, evaluation,
data check) run by one shared loop, :func:`run_phase`."""

from rlhf_jax.phases.config import (DPOConfig, KTOConfig, ORPOConfig, PhaseConfig, PRMConfig, RMConfig, SFTConfig,
                                   SimPOConfig)
from rlhf_jax.phases.dpo import DPOPhase
from rlhf_jax.phases.kto import KTOPhase
from rlhf_jax.phases.reference_free import ORPOPhase, SimPOPhase
from rlhf_jax.phases.prm import PRMPhase
from rlhf_jax.phases.rm import RMPhase
from rlhf_jax.phases.runner import RunResult, run_phase
from rlhf_jax.phases.sft import SFTPhase

PHASES = {"sft": SFTPhase(), "rm": RMPhase(), "dpo": DPOPhase(), "simpo": SimPOPhase(), "orpo": ORPOPhase(),
          "kto": KTOPhase(), "prm": PRMPhase()}

__all__ = ["PHASES", "DPOConfig", "DPOPhase", "KTOConfig", "KTOPhase", "ORPOConfig", "ORPOPhase", "PhaseConfig", "PRMConfig", "PRMPhase",
           "RMConfig", "RMPhase",
           "RunResult", "SFTConfig", "SFTPhase", "SimPOConfig", "SimPOPhase", "run_phase"]
