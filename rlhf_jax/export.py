"""Hugging Face checkpoints out: the model's safetensors and config.json, its tokenizer (chat
template included) and a generation_config.json with the tokenizer's special ids, so that
transformers' ``generate`` stops where this library's sampler stops. ``rlhf-jax convert``
turns any checkpoint this library reads (a GGUF file included) into one."""

from __future__ import annotations

from pathlib import Path

from rlhf_jax.data import has_tokenizer, load_tokenizer
from rlhf_jax.models import from_pretrained, save_pretrained
from rlhf_jax.models.lora import merge_lora


def write_hf(model, tokenizer, out: str | Path) -> Path:
    """Write ``model`` (LoRA merged), ``tokenizer`` and generation_config.json to ``out``."""
    from transformers import GenerationConfig

    out = Path(out)
    save_pretrained(merge_lora(model), out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    return out


def convert(source: str | Path, out: str | Path, *, tokenizer: str | None = None,
            pad_token: str | None = None) -> Path:
    """Read the checkpoint ``source`` (a Hugging Face directory or a GGUF file: dequantised,
    float32) with its own tokenizer (or ``tokenizer``; ``pad_token`` as in
    ``data.load_tokenizer``) and write it to ``out`` as a Hugging Face checkpoint. Raises
    ``ConfigError``, ``CheckpointError`` or ``DataError`` naming what cannot be read."""
    from rlhf_jax.checkpoint import CheckpointError
    from rlhf_jax.config import ConfigError

    if not Path(source).expanduser().exists():
        raise CheckpointError(f"checkpoint {source} does not exist; give a .gguf file or a Hugging Face checkpoint "
                              "directory")
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{out} exists and is {'a file' if not target.is_dir() else 'not empty'}; convert into a "
                          "new or empty directory")
    if tokenizer is None and not has_tokenizer(source):
        raise ConfigError(f"{source} carries no tokenizer; name one with --tokenizer")
    loaded = load_tokenizer(str(tokenizer or source), pad_token=pad_token)
    return write_hf(from_pretrained(source, pad_token_id=loaded.pad_token_id), loaded, out)
