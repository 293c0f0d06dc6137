"""Shared-prompt rows (prefix sharing): a pair's or a ranking's prompt runs once, its responses
after it. The layout is checked by hand; every score, log-prob and gradient must equal the
one-row-per-response layout, on learned positions (GPT-2), rotary ones (Llama) and sliding
windows with soft-capping (Gemma 2); a DPO run trains to the same parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from phase_runs import QUIET, checkpoint_arrays, cli, leaves_with_paths
from rlhf_jax import data, models, train
from rlhf_jax.data.report import DataError
from rlhf_jax.models.token_logprobs import predecessors
from rlhf_jax.models.decoder import positions_from_visibility, visibility
from rlhf_jax.train.rm import ranking_loss_sums, ranking_scores

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

V = 61
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2),
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                sliding_window=4, attn_logit_softcapping=2.0,
                                                final_logit_softcapping=3.0),
}


def tiny(family, head, seed=0):
    return models.build_model(models.config_from_hf(CONFIGS[family]().to_dict()), head, rngs=nnx.Rngs(seed))


def sequence(prompt, response):
    ids = np.asarray([*prompt, *response], np.int32)
    return data.Encoded(ids, np.arange(len(ids)) >= len(prompt))


def pairs(seed=0, n=6):
    """Prompts of 0 to 7 tokens (an empty one included), responses of 1 to 6, half with margins."""
    rng = np.random.default_rng(seed)
    made = []
    for i in range(n):
        prompt = rng.integers(3, V, size=(0, 1, 3, 7)[i % 4]).tolist()
        chosen, rejected = (rng.integers(3, V, size=rng.integers(1, 7)).tolist() for _ in range(2))
        made.append(data.EncodedPair(sequence(prompt, chosen), sequence(prompt, rejected), 0.5 * i if i % 2 else None))
    return made


def batches(items):
    """``(one row per response, shared-prompt rows)`` of every item, as jax arrays."""
    made = []
    for shared in (False, True):
        tokenized = data.TokenizedData(items, pad_id=0, max_length=16, pad_multiple=4, shared_prompt=shared)
        indices = np.arange(len(items))
        made.append(jax.tree.map(jnp.asarray, tokenized.collate(indices, tokenized.padded_length(indices))))
    return made


def assert_trees_close(a, b, atol):
    for (path, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, err_msg=str(path))


def test_a_pair_becomes_its_prompt_then_both_responses():
    pair = data.EncodedPair(sequence([5, 6, 7], [8, 9, 2]), sequence([5, 6, 7], [10, 11, 2]), 1.5)
    tokenized = data.TokenizedData([pair, pair], pad_id=0, max_length=8, pad_multiple=4, shared_prompt=True)
    # 3 + 3 + 3 = 9 tokens: over max_length (each sequence alone is 6), padded up to 12.
    assert tokenized.padded_length(np.arange(2)) == 12
    batch = tokenized.collate(np.array([0]), 12)
    assert isinstance(batch, data.SharedPromptPairs) and batch.tokens() == 9
    np.testing.assert_array_equal(batch.input_ids_BT, [[5, 6, 7, 8, 9, 2, 10, 11, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch.segment_ids_BT, [[0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch.attention_mask_BT, [[1] * 9 + [0] * 3])
    np.testing.assert_array_equal(batch.margin_B, [1.5])
    np.testing.assert_array_equal(batch.response_mask_BTK()[0, :, 1], [0] * 6 + [1] * 3 + [0] * 3)
    np.testing.assert_array_equal(batch.sequence_mask_BTK()[0, :, 1], [1] * 3 + [0] * 3 + [1] * 3 + [0] * 3)
    np.testing.assert_array_equal(batch.length_gap_B(), [0])
    # Each response continues from the prompt's end; its first token is predicted from the prompt's last.
    mask, segments = jnp.asarray(batch.attention_mask_BT), jnp.asarray(batch.segment_ids_BT)
    np.testing.assert_array_equal(positions_from_visibility(visibility(mask, segments))[0, :9], [0, 1, 2, 3, 4, 5, 3, 4, 5])
    parents = predecessors(mask, segments)
    np.testing.assert_array_equal(parents[0, :9], [-1, 0, 1, 2, 3, 4, 2, 6, 7])


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])  # learned positions; rotary with a sliding window
def test_reward_scores_and_gradients_equal_one_row_per_response(family):
    model = tiny(family, "score")
    separate, shared = batches(pairs())
    scores = nnx.jit(train.pair_scores)  # compiled: eager dispatch of every op is the slower way here
    for a, b in zip(scores(model, separate), scores(model, shared), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    grad = nnx.jit(lambda m, batch: nnx.grad(lambda m: train.rm_loss_sums(m, batch)[0])(m))
    assert_trees_close(nnx.to_pure_dict(nnx.state(grad(model, separate))),
                       nnx.to_pure_dict(nnx.state(grad(model, shared))), 1e-5)


@pytest.mark.parametrize("family, vocab_chunk", [("gpt2", None), ("llama", 16), ("gemma2", None)])
def test_dpo_logps_and_gradients_equal_one_row_per_response(family, vocab_chunk):
    model = tiny(family, "lm")
    separate, shared = batches(pairs(seed=1))
    logps = nnx.jit(lambda m, batch: train.response_logps(m, batch, vocab_chunk=vocab_chunk))
    np.testing.assert_allclose(logps(model, separate), logps(model, shared), atol=2e-5)
    reference_BK = jnp.stack([jnp.linspace(-30.0, -10.0, 6), jnp.linspace(-12.0, -28.0, 6)], axis=1)

    @nnx.jit
    def grad(model, batch):
        batch = batch.replace(reference_logps_BK=reference_BK)
        return nnx.grad(lambda m: train.dpo_loss_sums(m, batch, vocab_chunk=vocab_chunk)[0])(model)

    assert_trees_close(nnx.to_pure_dict(nnx.state(grad(model, separate))),
                       nnx.to_pure_dict(nnx.state(grad(model, shared))), 1e-5)


def test_rankings_of_different_lengths_score_as_one_row_per_response():
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, V, size=n).tolist() for n in (4, 2, 5)]
    rankings = [data.EncodedRanking(tuple(sequence(p, rng.integers(3, V, size=rng.integers(1, 6)).tolist())
                                          for _ in range(k))) for p, k in zip(prompts, (3, 2, 3), strict=True)]
    model = tiny("llama", "score")
    separate, shared = batches(rankings)
    assert isinstance(shared, data.SharedPromptRankings) and isinstance(separate, data.Rankings)
    np.testing.assert_array_equal(shared.valid_BK, separate.valid_BK)
    valid = np.asarray(separate.valid_BK)
    np.testing.assert_allclose(np.asarray(ranking_scores(model, shared))[valid],
                               np.asarray(ranking_scores(model, separate))[valid], atol=1e-5)
    loss = lambda batch: ranking_loss_sums(model, batch, kind="plackett_luce")[0]  # noqa: E731
    np.testing.assert_allclose(loss(shared), loss(separate), atol=1e-5)


def test_shared_prompt_on_sft_data_is_an_error_naming_the_key():
    with pytest.raises(DataError, match="data.shared_prompt applies to preference pairs and rankings"):
        data.TokenizedData([sequence([1, 2], [3])], pad_id=0, max_length=8, shared_prompt=True)


@pytest.mark.slow
def test_a_dpo_run_with_shared_prompts_trains_as_one_row_per_response(tmp_path):
    short = ["train.steps=4", "checkpoint.every=100", "checkpoint.export_hf=false", *QUIET]
    runs = {shared: cli("dpo", "configs/dpo_tiny.yaml", f"output_dir={tmp_path / str(shared)}", *short,
                        f"data.shared_prompt={str(shared).lower()}") for shared in (False, True)}
    assert all(run.returncode == 0 for run in runs.values()), runs[True].stderr
    separate, shared = (checkpoint_arrays(tmp_path / str(shared), 4) for shared in runs)
    assert_trees_close(separate["params"], shared["params"], 1e-5)


def test_auto_shares_prompts_for_pairs_read_by_a_decoder_only():
    from rlhf_jax.config import ConfigError
    from rlhf_jax.models.bert import BertScoreModel
    from rlhf_jax.models.config import EncoderConfig
    from rlhf_jax.phases.config import resolved_shared_prompt

    decoder_lm, decoder_rm = tiny("llama", "lm"), tiny("llama", "score")
    encoder = EncoderConfig(model_type="bert", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, max_positions=16, type_vocab_size=2, norm_eps=1e-12)
    encoder_rm = nnx.eval_shape(lambda: BertScoreModel(encoder, rngs=nnx.Rngs(0)))
    assert resolved_shared_prompt("auto", "hh_rlhf", decoder_lm) and resolved_shared_prompt("auto", "ranking", decoder_rm)
    assert not resolved_shared_prompt("auto", "prompt_completion", decoder_lm)  # SFT rows: nothing to share
    assert not resolved_shared_prompt("auto", "preference", encoder_rm)  # both ways attention: responses would mix
    assert not resolved_shared_prompt(False, "preference", decoder_lm)
    with pytest.raises(ConfigError, match="data.shared_prompt: true needs a decoder"):
        resolved_shared_prompt(True, "preference", encoder_rm)


def test_the_length_gap_of_shared_rows_equals_that_of_separate_rows():
    from rlhf_jax.phases.rm import length_baseline_accuracy

    prompt = [5, 6, 7]
    pairs = [data.EncodedPair(sequence(prompt, [8, 9, 10]), sequence(prompt, [11]), None),
             data.EncodedPair(sequence(prompt, [12]), sequence(prompt, [13, 14]), None),
             data.EncodedPair(sequence(prompt, [15, 16]), sequence(prompt, [17, 18]), None)]
    gaps = [np.asarray(data.TokenizedData(pairs, pad_id=0, max_length=16, pad_multiple=4, shared_prompt=shared)
                       .collate(np.arange(3), 16).length_gap_B()) for shared in (False, True)]
    assert gaps[0].tolist() == gaps[1].tolist() == [2, -1, 0]
    # "longer wins" is right once, wrong once, half right on the tie: 0.5 either way
    assert length_baseline_accuracy(gaps[0]) == 0.5
    assert length_baseline_accuracy(np.array([3, -1, -2, -5])) == 0.75  # "shorter wins" is right 3 times in 4
