"""Hugging Face checkpoints out: the model's safetensors and config.json, its tokenizer (chat
template included) and a generation_config.json -- the source checkpoint's own, its sampling
defaults kept, with every id the sampler stopped at as ``eos_token_id`` -- so that
transformers' ``generate`` stops where this library's sampler stops. ``rlhf-jax convert``
turns any checkpoint this library reads (a GGUF file included) into one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rlhf_jax.data import has_tokenizer, load_tokenizer
from rlhf_jax.models import from_pretrained, save_pretrained
from rlhf_jax.models.declared import GENERATION_CONFIG, declared_eos_ids, declared_generation_config
from rlhf_jax.models.lora import merge_lora


def write_hf(model, tokenizer, out: str | Path, *, stop_ids: Sequence[int] = (), source: str | Path | None = None
             ) -> Path:
    """Write ``model`` (LoRA merged), ``tokenizer`` and generation_config.json to ``out``.

    The generation config is ``source``'s own ``generation_config.json`` where it has one
    (temperature, top_p ... kept), else a new one; its ``eos_token_id`` is ``stop_ids`` (a
    list when several, an id when one; the tokenizer's EOS when empty), its ``pad_token_id``
    the exported tokenizer's (the one it pads with), and the tokenizer's BOS fills a
    ``bos_token_id`` the source leaves unset."""
    out = Path(out)
    save_pretrained(merge_lora(model), out)
    tokenizer.save_pretrained(out)
    fields = (declared_generation_config(source) if source is not None else None) or {}
    stop_ids = list(stop_ids) or [tokenizer.eos_token_id]
    fields["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    fields["pad_token_id"] = tokenizer.pad_token_id
    if fields.get("bos_token_id") is None:
        fields["bos_token_id"] = tokenizer.bos_token_id
    # written as declared: transformers' GenerationConfig.save_pretrained would refuse (or rewrite) a
    # published config whose sampling defaults it judges inconsistent
    (out / GENERATION_CONFIG).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
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
    own_eos = () if loaded.eos_token_id is None else (loaded.eos_token_id,)
    stop_ids = list(dict.fromkeys((*declared_eos_ids(source), *own_eos)))  # as the phases' samplers stop
    return write_hf(from_pretrained(source, pad_token_id=loaded.pad_token_id), loaded, out, stop_ids=stop_ids,
                    source=source)
