"""Multi-turn episodes with a text environment (``rl.multi_turn``, ``rl.environments``): the
calculator by hand, an episode's rows assembled from scripted turns -- the replies attended to
but masked out of the actions with log-prob 0, so they carry no loss -- and the turn limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.data import byte_tokenizer
from rlhf_jax.rl import multi_turn
from rlhf_jax.rl.environments import Calculator, evaluate_expression, load_environment
from rlhf_jax.rl.rewards import RewardError
from rlhf_jax.rollout import GenerationConfig, Rollout

TOKENIZER = byte_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id


@pytest.mark.parametrize("expression, value", [("2+3", 5), (" 12 - 3*2 ", 6), ("4*5*2-1", 39), ("7", 7),
                                               ("2+", None), ("2/3", None), ("__import__('os')", None),
                                               ("\x1d3+1", None), ("٣+1", None)])
def test_calculator_expressions(expression, value):
    assert evaluate_expression(expression) == value


def test_calculator_replies_to_a_call_and_ends_on_an_answer():
    calculator = load_environment("builtin:calculator")
    assert isinstance(calculator, Calculator)
    assert calculator.step(None, "let me see calc(12+7)")[1] == "=19\n"
    assert calculator.step(None, "calc(1/0)")[1] == "=error\n"
    assert calculator.step(None, "19")[1] is None and calculator.step(None, "calc(2+3) then 5")[1] is None
    with pytest.raises(RewardError, match="unknown built-in environment 'abacus'"):
        load_environment("builtin:abacus")


def scripted_generate(turns):
    """A stand-in for the sampler: call t returns, for row r, the tokens of turns[r][t] (text,
    the last turn ending in EOS), each with log-prob -(t + 1)."""
    calls = []

    def generate(model, ids, mask, key, config):
        t = len(calls)
        calls.append(np.asarray(ids))
        rows = len(turns)
        width = config.max_new_tokens
        tokens = np.full((rows, width), PAD, np.int32)
        keep = np.zeros((rows, width), bool)
        for r, script in enumerate(turns):
            text = script[t] if t < len(script) else ""
            piece = TOKENIZER.encode(text, add_special_tokens=False) + ([EOS] if t == len(script) - 1 else [])
            tokens[r, :len(piece)], keep[r, :len(piece)] = piece, True
        stopped = np.asarray([t < len(s) for s in turns])
        return Rollout(np.asarray(ids), np.asarray(mask), tokens, keep, -(t + 1.0) * keep, stopped)

    return generate, calls


def run_episodes(monkeypatch, turns, max_turns=3):
    generate, calls = scripted_generate(turns)
    monkeypatch.setattr(multi_turn, "generate", generate)
    prompt = TOKENIZER.encode("2+3=", add_special_tokens=False)
    ids = np.asarray([prompt] * len(turns), np.int32)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=(EOS,), pad_token_id=PAD)
    episodes = multi_turn.multi_turn_rollout(None, ids, np.ones_like(ids), jax.random.key(0), config, TOKENIZER,
                                             Calculator(), ["2+3="] * len(turns), max_turns=max_turns,
                                             buckets=(16, 32))
    return episodes, calls


def test_an_episode_is_one_row_with_the_replies_masked_out_of_the_actions(monkeypatch):
    episodes, calls = run_episodes(monkeypatch, [["calc(2+3)", "5"], ["6"]])
    assert episodes.final_turns == ["5", "6"]
    assert episodes.transcripts == ["calc(2+3)=5\n5", "6"]
    np.testing.assert_array_equal(episodes.turns_B, [2, 1])
    np.testing.assert_array_equal(episodes.tool_calls_B, [1, 0])
    r = episodes.rollout
    turn1, reply = TOKENIZER.encode("calc(2+3)", add_special_tokens=False), TOKENIZER.encode("=5\n", add_special_tokens=False)
    row0 = turn1 + reply + TOKENIZER.encode("5", add_special_tokens=False) + [EOS]
    assert r.completion_ids_BN.shape == (2, 16)
    np.testing.assert_array_equal(r.completion_ids_BN[0, :len(row0)], row0)
    np.testing.assert_array_equal(r.completion_mask_BN[0], [1] * len(row0) + [0] * (16 - len(row0)))
    expected_actions = [1] * len(turn1) + [0] * len(reply) + [1, 1] + [0] * (16 - len(row0))
    np.testing.assert_array_equal(r.action_mask_BN[0], expected_actions)
    np.testing.assert_array_equal(r.logprobs_BN[0, :len(row0)], [-1.0] * len(turn1) + [0.0] * len(reply) + [-2.0] * 2)
    assert list(r.stopped_B) == [True, True]
    # the second turn re-read the whole episode so far: prompt + turn 1 + the reply
    np.testing.assert_array_equal(calls[1][0][-len(turn1 + reply):], turn1 + reply)


def test_a_call_in_the_last_allowed_turn_gets_no_reply_and_the_episode_is_not_stopped(monkeypatch):
    episodes, _ = run_episodes(monkeypatch, [["calc(2+3)", "calc(1+1)", "2"]], max_turns=2)
    assert episodes.transcripts == ["calc(2+3)=5\ncalc(1+1)"] and list(episodes.turns_B) == [2]
    assert list(episodes.tool_calls_B) == [1] and not episodes.rollout.stopped_B[0]


def test_reply_tokens_carry_no_loss(monkeypatch):
    """GRPO's loss and its gradient ignore whatever log-probs the policy gives the replies."""
    episodes, _ = run_episodes(monkeypatch, [["calc(2+3)", "5"], ["calc(9+9)", "18"]])
    actions_BT = jnp.asarray(episodes.rollout.action_mask(), jnp.float32)
    completion_BT = jnp.concatenate([jnp.zeros_like(episodes.rollout.prompt_mask_BP),
                                     jnp.asarray(episodes.rollout.completion_mask_BN)], 1).astype(jnp.float32)
    replies_BT = completion_BT - actions_BT
    assert float(replies_BT.sum()) == len("=5\n") + len("=18\n")  # the replies, one byte a token
    old_BT = -jnp.ones_like(actions_BT)

    def loss(logp_BT):
        return losses.grpo_loss(logp_BT, old_BT, old_BT, jnp.asarray([1.0, -1.0]), actions_BT, beta=0.1,
                                clip_eps=0.2)[0]

    logp_BT = -0.9 * jnp.ones_like(actions_BT)
    elsewhere_BT = logp_BT + 5.0 * replies_BT  # only the replies' log-probs change
    assert float(loss(logp_BT)) == float(loss(elsewhere_BT))
    gradient_BT = jax.grad(loss)(logp_BT)
    assert float(jnp.abs(gradient_BT * replies_BT).sum()) == 0.0 and float(jnp.abs(gradient_BT).sum()) > 0


class Broken(Calculator):
    name = "broken"

    def step(self, state, turn):
        raise KeyError("no such tool")


def test_an_environment_that_raises_is_named(monkeypatch):
    generate, _ = scripted_generate([["calc(2+3)", "5"]])
    monkeypatch.setattr(multi_turn, "generate", generate)
    ids = np.asarray([TOKENIZER.encode("2+3=", add_special_tokens=False)], np.int32)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=(EOS,), pad_token_id=PAD)
    with pytest.raises(RewardError, match=r"environment broken raised KeyError: 'no such tool' on turn 1 'calc\(2\+3\)'"):
        multi_turn.multi_turn_rollout(None, ids, np.ones_like(ids), jax.random.key(0), config, TOKENIZER, Broken(),
                                      ["2+3="], max_turns=2, buckets=(16,))
