"""The rollout engine: jitted sampling with a KV cache (prefill + ``lax.while_loop`` decode),
per-row stop tokens, temperature / top-k / top-p / min-p, n samples per prompt, and the
sampling distribution's log-probs of every generated token."""

from rlhf_jax.rollout.buckets import bucket_length, left_pad_to
from rlhf_jax.rollout.engine import GenerationConfig, Rollout, check_prompts, concatenate_rollouts, trim_completions
from rlhf_jax.rollout.dispatch import generate, generate_with_stats
from rlhf_jax.rollout.sampling import SamplingConfig, sample_token, sampled_token_logprobs, sampling_logprobs
from rlhf_jax.rollout.text import decode_completions, retokenize

__all__ = [
    "GenerationConfig",
    "Rollout",
    "SamplingConfig",
    "bucket_length",
    "check_prompts",
    "concatenate_rollouts",
    "decode_completions",
    "generate",
    "generate_with_stats",
    "left_pad_to",
    "retokenize",
    "sample_token",
    "sampled_token_logprobs",
    "sampling_logprobs",
    "trim_completions",
]
