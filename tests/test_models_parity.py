"""Every decoder family against transformers (torch, CPU, fp32): logits on left- and
right-padded batches, sequence-classification scores, completion log-probs, cached decode,
and the save -> transformers round trip -- with the blocks in a Python loop and stored
stacked under one ``lax.scan`` (``scan_layers``)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import FAMILIES, padded_batch, save_tiny, torch, torch_forward, transformers

from rlhf_jax import models

pytestmark = [pytest.mark.parametrize("family", sorted(FAMILIES)),
              pytest.mark.fast_compile]  # compile-bound: tests/conftest.py


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers(tmp_path, family, padding_side, scan_layers):
    reference = save_tiny(tmp_path, family)
    model = models.from_pretrained(tmp_path, scan_layers=scan_layers)
    ids, mask = padded_batch(padding_side)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], torch_forward(reference, ids, mask)[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sequence_classification_score_matches(tmp_path, family, padding_side):
    reference = save_tiny(tmp_path, family, auto=transformers.AutoModelForSequenceClassification, num_labels=2)
    model = models.from_pretrained(tmp_path)
    assert isinstance(model, models.ScoreModel) and model.num_labels == 2
    ids, mask = padded_batch(padding_side)
    scores = np.asarray(model.sequence_scores(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(scores, torch_forward(reference, ids, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vocab_chunk,start", [(None, 1), (10, 1), (None, 3), (10, 3)])
def test_completion_logprobs_match(tmp_path, family, vocab_chunk, start):
    reference = save_tiny(tmp_path, family)
    model = models.from_pretrained(tmp_path)
    ids, mask = padded_batch("right")
    logp = np.asarray(models.sequence_logprobs(model, jnp.asarray(ids), jnp.asarray(mask), vocab_chunk=vocab_chunk,
                                               start=start))
    logits = torch_forward(reference, ids, mask)
    expected = torch.log_softmax(torch.as_tensor(logits), -1).numpy()
    expected = np.take_along_axis(expected[:, :-1], ids[:, 1:, None], -1)[..., 0]
    real = mask[:, start:].astype(bool)
    np.testing.assert_allclose(logp[:, start:][real], expected[:, start - 1:][real], atol=1e-4)
    assert np.all(logp[:, :start] == 0)  # before start: no context, or not asked for
    next_logits = np.asarray(models.next_token_logits(model, jnp.asarray(ids), jnp.asarray(mask), start=start))
    np.testing.assert_allclose(next_logits[real], logits[:, start - 1:-1][real], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="first token has no context"):
        models.sequence_logprobs(model, jnp.asarray(ids), jnp.asarray(mask), start=0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decode_matches_full_forward(tmp_path, family, scan_layers):
    save_tiny(tmp_path, family)
    model = models.from_pretrained(tmp_path, scan_layers=scan_layers)
    prompt, prompt_mask = padded_batch("left", lengths=(6, 3, 1, 5))
    steps = 5  # longer than the sliding windows (4), so they bind in the cache too
    generated = np.random.default_rng(2).integers(1, 97, size=(4, steps))
    logits, cache = model.prefill(jnp.asarray(prompt), jnp.asarray(prompt_mask), max_length=prompt.shape[1] + steps)
    cached = [logits]
    for t in range(steps - 1):
        logits, cache = model.decode(jnp.asarray(generated[:, t]), cache)
        cached.append(logits)
    full_ids = np.concatenate([prompt, generated], 1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(generated)], 1)
    full = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))
    T = prompt.shape[1]
    np.testing.assert_allclose(np.stack(cached, 1), full[:, T - 1 : T - 1 + steps], atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_through_transformers(tmp_path, family, scan_layers):
    save_tiny(tmp_path / "in", family)
    model = models.from_pretrained(tmp_path / "in", scan_layers=scan_layers)
    models.save_pretrained(model, tmp_path / "out")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = padded_batch("left")
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        torch_forward(reloaded.eval(), ids, mask)[valid], np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[valid],
        atol=1e-5,
    )
