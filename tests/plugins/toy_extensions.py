"""A plugin as a user outside the package writes one (``RLHF_JAX_PLUGINS``): a toy model
family, a toy data format, a toy offline loss and a toy online algorithm (with its advantage
estimator), each one definition and one registration."""

import dataclasses

import jax.numpy as jnp

from rlhf_jax.data import DataFormat, MalformedRow, PromptCompletion, register_format
from rlhf_jax.models import Family, register_family
from rlhf_jax.models.families import llama
from rlhf_jax.models.hf_names import TensorName
from rlhf_jax.phases import register_phase
from rlhf_jax.phases.algorithms import CriticFree, register_algorithm
from rlhf_jax.phases.sft import SFTPhase
from rlhf_jax.rl import AdvantageEstimator, register_estimator
from rlhf_jax.train.sft import token_nll_rows


def _toy_tensor_names(config, head: str) -> list[TensorName]:
    """Llama's layout, its tensors under ``toy.`` instead of ``model.``."""
    return [dataclasses.replace(name, hf="toy." + name.hf.removeprefix(name.prefix), prefix="toy.")
            if name.prefix == "model." else name for name in llama.tensor_names(config, head)]


register_family(Family("toy", {"toy": "Toy"}, lambda hf: llama.config_from_hf(hf | {"model_type": "toy"}),
                       _toy_tensor_names))


def question_answer(row, columns):
    """A row ``{"question": ..., "answer": ...}`` as a demonstration."""
    question, answer = (row.get(columns.get(field, field)) for field in ("question", "answer"))
    if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
        raise MalformedRow("question and answer should be strings, the answer not empty")
    return PromptCompletion(question, answer)


register_format(DataFormat("toy_qa", question_answer, ("question", "answer"), PromptCompletion))


class SequenceMeanSFT(SFTPhase):
    """SFT whose loss averages each row's mean token NLL over rows (every example weighs the
    same, whatever its length) instead of averaging over tokens."""

    name = "toy_sft"
    summary = "SFT with a per-sequence mean loss (a plugin's toy phase)"

    def loss_fn(self, config, reference):
        def loss_sums(model, batch):
            nll_B, tokens_B = token_nll_rows(model, batch, vocab_chunk=config.train.vocab_chunk)
            rows_B = (tokens_B > 0).astype(jnp.float32)
            return jnp.sum(nll_B / jnp.maximum(tokens_B, 1.0)), jnp.sum(rows_B), {}
        return loss_sums


register_phase(SequenceMeanSFT())


def median_baseline(rewards_BG, config):
    """Each completion's reward less the median of its prompt's group (``[B, G]``)."""
    return rewards_BG - jnp.median(rewards_BG, axis=1, keepdims=True), {}


register_estimator(AdvantageEstimator("median", median_baseline))
register_algorithm(CriticFree("toy_median", "REINFORCE with a group-median baseline (a plugin's toy)",
                              compares_samples=True, estimator="median", options="rloo"))
