"""Hugging Face checkpoints (config.json + safetensors) <-> nnx models.

Only safetensors are read: pickle-based ``.bin`` checkpoints can run arbitrary code when
loaded and are refused. Every tensor is checked by name and shape before it is used.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from rlhf_jax.models.config import DecoderConfig, decoder_config_from_hf
from rlhf_jax.models.llama import LlamaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def hf_parameter_names(config: DecoderConfig) -> dict[str, tuple[tuple, bool]]:
    """``{hf tensor name: (attribute path in the model, transpose?)}`` for a decoder.

    Linear kernels are stored ``[out, in]`` by torch and ``[in, out]`` by flax.
    """
    names: dict[str, tuple[tuple, bool]] = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
        "model.norm.weight": (("norm", "scale"), False),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{prefix}{norm}.weight"] = (("layers", i, norm, "scale"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{prefix}self_attn.{proj}.weight"] = (("layers", i, "self_attn", proj, "kernel"), True)
            if config.attention_bias and proj != "o_proj":
                names[f"{prefix}self_attn.{proj}.bias"] = (("layers", i, "self_attn", proj, "bias"), False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{prefix}mlp.{proj}.weight"] = (("layers", i, "mlp", proj, "kernel"), True)
    return names


def _tensor_files(path: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` from a single file or a sharded index."""
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    if (path / SINGLE_FILE).exists():
        with safe_open(path / SINGLE_FILE, framework="numpy") as f:
            return {name: path / SINGLE_FILE for name in f.keys()}
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); they can execute code when "
            "loaded and are refused. Convert them to safetensors (transformers: "
            "model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _variable(model: nnx.Module, attribute_path: tuple) -> nnx.Variable:
    node = model
    for part in attribute_path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def from_pretrained(path: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32) -> LlamaForCausalLM:
    """Load a Hugging Face decoder checkpoint directory; the family comes from ``model_type``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    config = decoder_config_from_hf(json.loads(config_file.read_text()))
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    files = _tensor_files(path)
    expected = hf_parameter_names(config)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    with contextlib.ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(file, framework="numpy"))
            for file in {files[name] for name in expected}
        }
        for name, (attribute_path, transpose) in expected.items():
            array = handles[files[name]].get_tensor(name)
            variable = _variable(model, attribute_path)
            wanted = tuple(variable.get_value().shape)
            wanted = wanted[::-1] if transpose else wanted  # in the checkpoint's [out, in] layout
            if tuple(array.shape) != wanted:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {tuple(array.shape)} in the checkpoint but "
                    f"config.json implies {wanted}"
                )
            array = array.T if transpose else array
            variable.set_value(jnp.asarray(np.ascontiguousarray(array), dtype=param_dtype))
    return model
