"""Tiny random transformers (torch) models of every supported family, saved for parity tests."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the `parity` extra (CPU torch)")
transformers = pytest.importorskip("transformers")

VOCAB = 97
PAD = 0
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=PAD,
)
FAMILIES = {
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    ),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3_scaled_tied": lambda: transformers.LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "mistral_window": lambda: transformers.MistralConfig(**COMMON, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
}


def save_tiny(path, family, auto=None, **overrides):
    """Build, save (safetensors) and return a tiny random torch model of ``family``."""
    torch.manual_seed(0)
    config = FAMILIES[family]()
    if "num_hidden_layers" in overrides:  # rebuilt, so per-layer fields (Gemma 2's layer_types) follow
        fields = config.to_dict() | {"num_hidden_layers": overrides.pop("num_hidden_layers")}
        fields.pop("layer_types", None)
        config = type(config).from_dict(fields)
    for key, value in overrides.items():
        setattr(config, key, value)
    auto = auto or transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random norm weights and biases, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def padded_batch(padding_side, lengths=(9, 5, 1, 7), seed=1):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.full((len(lengths), T), PAD, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        span = slice(T - n, T) if padding_side == "left" else slice(0, n)
        ids[b, span] = rng.integers(1, VOCAB, size=n)
        mask[b, span] = 1
    return ids, mask


def torch_forward(model, ids, mask):
    """The reference forward with position ids from the mask, as ``generate`` passes them."""
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions),
        ).logits.numpy()
