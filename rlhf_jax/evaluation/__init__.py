"""Did training help? Head-to-head comparison of two policies judged by a reward model the
training never saw (:mod:`.compare`), its statistics (:mod:`.stats`), and the run report
(:mod:`.report`)."""

from rlhf_jax.evaluation.stats import WinRate, kl_estimate, matched_length_win_rate, win_rate, wilson_interval

__all__ = ["WinRate", "kl_estimate", "matched_length_win_rate", "win_rate", "wilson_interval"]
