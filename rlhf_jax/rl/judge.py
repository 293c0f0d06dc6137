"""An AI judge (RLAIF; Bai et al., 2022, "Constitutional AI", sec. 4; Lee et al., 2023, "RLAIF"):
a causal LM compares two completions of a prompt under a written principle and its
preference is read from the log-probs of the verdict tokens -- no text is generated.

The judge reads ``template`` filled with the principle, the prompt and the two responses
(rendered through the judge tokenizer's chat template as one user message when it has one),
and its next-token distribution is restricted to the two verdict tokens: ``P(first) =
softmax(logit_A, logit_B)[0]``. The pair is asked in both orders and the two answers averaged,
``p = (P_AB(A) + P_BA(B)) / 2``, which cancels a judge's bias for a position (Zheng et al.,
2023, "Judging LLM-as-a-Judge", sec. 3.3).

:func:`group_scores` turns a prompt's ``K`` samples into scores for the pair rules of
:mod:`rlhf_jax.rl.pair_labels`: each sample's mean probability of beating the others (a Borda
count)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.tokenizer import encode_prompt
from rlhf_jax.models.pure_jit import pure_jit
from rlhf_jax.rl.rewards import RewardError

TEMPLATE = ("{principle}\n\nPrompt: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
            "Which response follows the principle better? Answer with one letter, A or B.\nAnswer:")


def verdict_probability(logits_BV: jax.Array, a_id: int, b_id: int) -> jax.Array:
    """``[B]``: the probability of verdict A when only the tokens ``a_id`` and ``b_id`` may follow
    (a softmax over their two logits)."""
    pair_B2 = jnp.stack([logits_BV[:, a_id], logits_BV[:, b_id]], axis=-1).astype(jnp.float32)
    return jax.nn.softmax(pair_B2, axis=-1)[:, 0]


class PairwiseJudge:
    """A causal LM ``model`` with its ``tokenizer`` judging pairs under ``principle`` (module
    docstring). ``max_length`` bounds a judge input in tokens (an over-long pair is an error
    naming it, ``RewardError``); ``batch_size`` inputs are read at once."""

    def __init__(self, model, tokenizer, principle: str, *, template: str = TEMPLATE, max_length: int = 1024,
                 batch_size: int = 16, name: str = "judge"):
        if not principle.strip():
            raise RewardError("the judge's principle is empty; write the principle the judge compares by")
        self.model, self.tokenizer, self.principle, self.template = model, tokenizer, principle, template
        self.max_length, self.batch_size, self.name = max_length, batch_size, name
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        verdicts = ("A", "B") if self.chat else (" A", " B")  # the letter that starts the answer
        a_ids, b_ids = (tokenizer.encode(v, add_special_tokens=False) for v in verdicts)
        shared = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), None)
        if shared is None:
            raise RewardError(f"the judge's tokenizer encodes the verdicts {verdicts} alike")
        # tokens both verdicts start with (a byte tokenizer's space) are part of the input
        self.verdict_prefix, self.a_id, self.b_id = list(a_ids[:shared]), a_ids[shared], b_ids[shared]
        self._last_logits = pure_jit(lambda model, ids, mask: model.prefill(ids, mask, max_length=ids.shape[1])[0])

    def _encode(self, prompt: str, first: str, second: str) -> list[int]:
        text = self.template.format(principle=self.principle, prompt=prompt, first=first, second=second)
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return encode_prompt(self.tokenizer, text, templated=self.chat) + self.verdict_prefix

    def _probability_first(self, prompts, firsts, seconds) -> np.ndarray:
        inputs = [self._encode(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
        longest = max(map(len, inputs))
        if longest > self.max_length:
            raise RewardError(f"a judge input has {longest} tokens, more than the judge's max_length="
                              f"{self.max_length}; raise it (within the judge model's context) or shorten the "
                              "prompts and completions")
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))  # one compiled shape per width
            width = -(-max(map(len, chunk)) // 32) * 32
            ids = np.full((len(chunk), width), self.tokenizer.pad_token_id or 0, np.int32)
            mask = np.zeros_like(ids)
            for row, sequence in enumerate(chunk):
                ids[row, width - len(sequence):], mask[row, width - len(sequence):] = sequence, 1
            logits_BV = self._last_logits(self.model, jnp.asarray(ids), jnp.asarray(mask))
            out.append(np.asarray(verdict_probability(logits_BV, self.a_id, self.b_id)))
        return np.concatenate(out)[:len(inputs)]

    def both_orders(self, prompts: Sequence[str], firsts: Sequence[str],
                    seconds: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(forward_B, backward_B)``: the verdict probability of position A with ``firsts[i]``
        shown as response A, and with ``seconds[i]`` shown as response A -- each order alone,
        position bias included. Raises ``RewardError`` for an input over ``max_length``."""
        return self._probability_first(prompts, firsts, seconds), self._probability_first(prompts, seconds, firsts)

    def prefer_first(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> np.ndarray:
        """``[B]``: the probability that ``firsts[i]`` is the better response to ``prompts[i]``,
        asked in both orders and averaged: ``(forward + 1 - backward) / 2``."""
        forward, backward = self.both_orders(prompts, firsts, seconds)
        return (forward + (1.0 - backward)) / 2.0


def group_scores(judge: PairwiseJudge, prompts: Sequence[str], completions: Sequence[str],
                 group_size: int) -> np.ndarray:
    """``[B]``: each completion's mean probability of beating the other ``group_size - 1``
    completions of its prompt (rows sample-major within a prompt, as the sampler writes them).
    Raises ``ValueError`` when ``group_size`` does not divide the rows or is below 2."""
    if group_size < 2 or len(completions) % group_size:
        raise ValueError(f"{len(completions)} completions do not form groups of {group_size} >= 2")
    pairs = [(g * group_size + i, g * group_size + j) for g in range(len(completions) // group_size)
             for i in range(group_size) for j in range(i + 1, group_size)]
    p = judge.prefer_first([prompts[i] for i, _ in pairs], [completions[i] for i, _ in pairs],
                           [completions[j] for _, j in pairs])
    wins = np.zeros(len(completions))
    for (i, j), p_ij in zip(pairs, p):
        wins[i] += p_ij
        wins[j] += 1.0 - p_ij
    return (wins / (group_size - 1)).astype(np.float32)
