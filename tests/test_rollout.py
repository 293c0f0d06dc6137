"""The rollout engine against transformers' greedy generate, its log-prob convention, stop
handling, buckets, sharding, and errors."""

import jax
import numpy as np
import pytest
from hf_tiny import padded_batch, save_tiny, torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from rlhf_jax import models, rollout
from rlhf_jax.rollout.engine import _generate

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``{family: (torch model, our model)}`` for GPT-2 and Llama."""
    out = {}
    for family in ("gpt2", "llama"):
        path = tmp_path_factory.mktemp(family)
        out[family] = (save_tiny(path, family), models.from_pretrained(path))
    return out


def greedy(max_new_tokens=8, stop=(), pad=0, **kw):
    return rollout.GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stop, pad_token_id=pad,
                                    sampling=rollout.SamplingConfig(temperature=0.0), **kw)


def hf_greedy(reference, ids, mask, max_new_tokens, eos=None):
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=0, eos_token_id=eos)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(tiny, family):
    reference, model = tiny[family]
    ids, mask = padded_batch("left", lengths=(7, 3, 1, 5))
    result = rollout.generate(model, ids, mask, jax.random.key(0), greedy(8))
    np.testing.assert_array_equal(np.asarray(result.completion_ids_BN), hf_greedy(reference, ids, mask, 8))
    assert np.asarray(result.completion_mask_BN).all() and not np.asarray(result.stopped_B).any()


@pytest.mark.parametrize("pad", [0, "eos"])
def test_rows_stop_independently_at_eos(tiny, pad):
    reference, model = tiny["llama"]
    ids, mask = padded_batch("left", lengths=(7, 3, 1, 5))
    free = hf_greedy(reference, ids, mask, 8)
    eos = int(free[0, 2])  # row 0 emits it at step 2; other rows whenever they do
    pad_id = eos if pad == "eos" else 0
    result = rollout.generate(model, ids, mask, jax.random.key(0), greedy(8, stop=(eos,), pad=pad_id))
    tokens, keep = np.asarray(result.completion_ids_BN), np.asarray(result.completion_mask_BN)
    for b in range(4):
        hits = np.flatnonzero(free[b] == eos)
        length = hits[0] + 1 if hits.size else 8
        assert keep[b].sum() == length and keep[b, :length].all()
        np.testing.assert_array_equal(tokens[b, :length], free[b, :length])
        assert (tokens[b, length:] == pad_id).all()
        assert bool(result.stopped_B[b]) == bool(hits.size)
    assert np.asarray(result.logprobs_BN)[~keep].sum() == 0
    expected = hf_greedy(reference, ids, mask, 8, eos=eos)
    np.testing.assert_array_equal(np.where(keep, tokens, 0)[:, : expected.shape[1]], expected)  # HF pads with 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_temperature_one_logprobs_equal_the_training_forward(tiny, family):
    _, model = tiny[family]
    ids, mask = padded_batch("left", lengths=(7, 3, 1, 5))
    config = rollout.GenerationConfig(max_new_tokens=6, stop_token_ids=(5,), pad_token_id=0)
    result = rollout.generate(model, ids, mask, jax.random.key(1), config)
    seq_ids, seq_mask = result.sequences()
    logp = models.sequence_logprobs(model, seq_ids, seq_mask)[:, result.prompt_ids_BP.shape[1]:]
    keep = np.asarray(result.completion_mask_BN)
    np.testing.assert_allclose(np.asarray(result.logprobs_BN)[keep], np.asarray(logp)[keep], atol=1e-5)


def test_tempered_and_filtered_logprobs_follow_the_convention(tiny):
    _, model = tiny["llama"]
    ids, mask = padded_batch("left", lengths=(7, 3, 1, 5))
    sampling = rollout.SamplingConfig(temperature=0.7, top_k=20)
    config = rollout.GenerationConfig(max_new_tokens=6, stop_token_ids=(), pad_token_id=0, sampling=sampling)
    result = rollout.generate(model, ids, mask, jax.random.key(2), config)
    seq_ids, seq_mask = result.sequences()
    P = result.prompt_ids_BP.shape[1]
    logits = model(seq_ids, seq_mask)[:, P - 1 : -1]  # the logits each completion token was drawn from
    z = np.asarray(logits, np.float64) / 0.7
    kth = np.sort(z, -1)[..., -20][..., None]
    z = np.where(z >= kth, z, -np.inf)
    expected_all = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    expected = np.take_along_axis(expected_all, np.asarray(result.completion_ids_BN)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(result.logprobs_BN), expected, atol=1e-5)


def test_num_samples_repeats_each_prompt(tiny):
    _, model = tiny["gpt2"]
    ids, mask = padded_batch("left", lengths=(4, 2))
    config = rollout.GenerationConfig(max_new_tokens=6, stop_token_ids=(), pad_token_id=0, num_samples=3)
    result = rollout.generate(model, ids, mask, jax.random.key(3), config)
    prompts = np.asarray(result.prompt_ids_BP)
    assert prompts.shape[0] == 6 and (prompts[:3] == prompts[0]).all() and (prompts[3:] == prompts[3]).all()
    completions = np.asarray(result.completion_ids_BN)
    assert len({tuple(c) for c in completions[:3]}) > 1  # independent draws
    same = rollout.generate(model, ids, mask, jax.random.key(3), greedy(6, num_samples=3))
    assert (np.asarray(same.completion_ids_BN)[:3] == np.asarray(same.completion_ids_BN)[0]).all()


def test_prompt_buckets_share_one_program(tiny):
    _, model = tiny["gpt2"]
    config = greedy(4, prompt_buckets=(16, 32))
    before = _generate._cache_size()
    for lengths in [(7, 3, 1, 5), (9, 2, 4, 4), (16, 1, 1, 1)]:
        ids, mask = padded_batch("left", lengths=lengths)
        rollout.generate(model, ids, mask, jax.random.key(0), config)
    assert _generate._cache_size() - before == 1
    ids, mask = padded_batch("left", lengths=(17, 1, 1, 1))
    rollout.generate(model, ids, mask, jax.random.key(0), config)
    assert _generate._cache_size() - before == 2


def test_trim_completions_cuts_to_a_bucket(tiny):
    _, model = tiny["llama"]
    ids, mask = padded_batch("left", lengths=(7, 3, 1, 5))
    free = rollout.generate(model, ids, mask, jax.random.key(0), greedy(12))
    eos = int(np.asarray(free.completion_ids_BN)[0, 2])
    result = rollout.generate(model, ids, mask, jax.random.key(0), greedy(12, stop=(eos,)))
    longest = int(np.asarray(result.completion_mask_BN).sum(1).max())
    trimmed = rollout.trim_completions(result, (4, 8, 12))
    assert trimmed.completion_ids_BN.shape[1] == min(b for b in (4, 8, 12) if b >= longest)
    np.testing.assert_array_equal(np.asarray(trimmed.completion_mask_BN).sum(1),
                                  np.asarray(result.completion_mask_BN).sum(1))


def test_sharded_generation_equals_single_device(tiny):
    _, model = tiny["llama"]
    ids, mask = padded_batch("left", lengths=(7, 3, 1, 5, 2, 6, 4, 7))
    expected = rollout.generate(model, ids, mask, jax.random.key(0), greedy(6))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    data = NamedSharding(mesh, PartitionSpec("data"))
    got = rollout.generate(model, jax.device_put(ids, data), jax.device_put(mask, data), jax.random.key(0), greedy(6))
    assert got.completion_ids_BN.sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(got.completion_ids_BN), np.asarray(expected.completion_ids_BN))
    np.testing.assert_allclose(np.asarray(got.logprobs_BN), np.asarray(expected.logprobs_BN), atol=1e-5)


def test_bad_prompts_get_clear_errors(tiny):
    _, model = tiny["gpt2"]  # context: 64 positions
    ids, mask = padded_batch("left", lengths=(7, 3))
    empty = mask.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        rollout.generate(model, ids, empty, jax.random.key(0), greedy(4))
    right_ids, right_mask = padded_batch("right", lengths=(7, 3))
    with pytest.raises(ValueError, match=r"prompts \[1\] are not left-padded"):
        rollout.generate(model, right_ids, right_mask, jax.random.key(0), greedy(4))
    with pytest.raises(ValueError, match="7 tokens \\+ max_new_tokens=60 exceeds the model's context of 64"):
        rollout.generate(model, ids, mask, jax.random.key(0), greedy(60))
    long_ids, long_mask = padded_batch("left", lengths=(70, 3))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        rollout.generate(model, long_ids, long_mask, jax.random.key(0), greedy(1))
    with pytest.raises(ValueError, match="prompt length 40 exceeds the largest bucket 32"):
        rollout.generate(model, *padded_batch("left", lengths=(40, 3)), jax.random.key(0),
                         greedy(4, prompt_buckets=(16, 32)))
    with pytest.raises(ValueError, match="top_p must be in"):
        rollout.SamplingConfig(top_p=0.0)
