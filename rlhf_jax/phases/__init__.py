"""The offline phases -- SFT, reward model, DPO -- each a small object (loss, evaluation,
data check) run by one shared loop, :func:`run_phase`."""

from rlhf_jax.phases.config import DPOConfig, PhaseConfig, RMConfig, SFTConfig
from rlhf_jax.phases.dpo import DPOPhase
from rlhf_jax.phases.rm import RMPhase
from rlhf_jax.phases.runner import RunResult, run_phase
from rlhf_jax.phases.sft import SFTPhase

PHASES = {"sft": SFTPhase(), "rm": RMPhase(), "dpo": DPOPhase()}

__all__ = ["PHASES", "DPOConfig", "DPOPhase", "PhaseConfig", "RMConfig", "RMPhase", "RunResult", "SFTConfig",
           "SFTPhase", "run_phase"]
