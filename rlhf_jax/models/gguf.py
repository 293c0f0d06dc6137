"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints: the config and the
tokenizer (with its chat template) from the file's metadata through transformers' GGUF
support, the tensors dequantised with the ``gguf`` package and renamed to the Hugging Face
layout, llama.cpp's q/k row permutation undone.

llama.cpp's converter reorders the rows of ``q_proj`` and ``k_proj`` from the Hugging Face
rotary layout (first half / second half of each head) to interleaved pairs:

    gguf = W.reshape(H, 2, d/2, D).swapaxes(1, 2).reshape(H d, D)

with ``H`` the query (or key/value) heads and ``d`` the head size; :func:`unpermute` applies
the inverse, ``reshape(H, d/2, 2, D).swapaxes(1, 2)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from rlhf_jax.models.families import FAMILIES
from rlhf_jax.models.disk_cache import cached_directory, cached_json

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_LAYER = {  # GGUF block tensor -> Hugging Face name inside model.layers.{i}
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling: checked against the config's, then recomputed from it


T = TypeVar("T")


class GGUFError(ValueError):
    """A GGUF file this reader cannot serve; the message names the file and what is unsupported."""


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix)."""
    return Path(path).suffix.lower() == ".gguf"


def unpermute(weight_RD: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (module docstring); ``weight_RD`` is ``[heads * d, D]``."""
    rows = weight_RD.shape[0]
    return weight_RD.reshape(heads, rows // heads // 2, 2, *weight_RD.shape[1:]).swapaxes(1, 2).reshape(weight_RD.shape)


def dequantize(tensor) -> np.ndarray:
    """A ``gguf.ReaderTensor`` as float32 ``[rows, columns]`` (GGUF lists dimensions innermost
    first; numpy's order is the Hugging Face ``[out, in]``). Raises :class:`GGUFError` for a
    quantisation type outside :data:`SUPPORTED_TYPES`."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {tensor.name} is {kind}; supported: {', '.join(SUPPORTED_TYPES)}")
    values = gguf.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(values, np.float32).reshape(shape)


MAGIC = b"GGUF"
INSTALL_HINT = ("pip install -e \".[gguf]\" (torch's CPU build: transformers' GGUF reader, which reads the "
                "config and tokenizer, imports it)")


def through_transformers(path: Path, load: Callable[[Path], T], what: str) -> T:
    """``load(path)`` -- transformers' GGUF reader, for the config or the tokenizer (``what``)
    -- with its failures told apart, each a :class:`GGUFError` saying what to do: a file that
    is not GGUF (it does not start with ``b"GGUF"``), a missing torch (which that reader
    imports; said only of a file the ``gguf`` package reads whole), and a truncated or corrupt
    file."""
    check_magic(path)
    try:
        return load(path)
    except Exception as error:  # the reader raises many types for a damaged file
        parse(path)  # a cut or corrupt file is named as such, before torch or transformers are blamed
        if isinstance(error, ImportError):
            raise GGUFError(f"reading the {what} of {path} needs torch, which is not installed: "
                            f"{INSTALL_HINT}") from None
        raise GGUFError(f"cannot read the {what} of {path} ({type(error).__name__}: {error}); the GGUF file may be "
                        "truncated or corrupt -- copy it again") from None


def check_magic(path: Path) -> None:
    """Raises :class:`GGUFError` when the file at ``path`` does not start with ``b"GGUF"``."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); give a .gguf file "
                        "from llama.cpp's converter, or a Hugging Face checkpoint directory")


def parse(path: Path):
    """The ``gguf.GGUFReader`` of the file at ``path`` (its whole layout parsed: seconds for a
    large vocabulary, so each caller keeps what it needs in the metadata cache). Raises
    :class:`GGUFError` for a file that is not GGUF, or is truncated or corrupt."""
    import gguf

    check_magic(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises many types for a damaged file
        raise GGUFError(f"{path} cannot be read as GGUF ({type(error).__name__}: {error}); the file may be truncated "
                        "or corrupt -- copy it again") from None


def read_config(path: Path) -> dict:
    """The Hugging Face config dict of the GGUF file at ``path`` (transformers' GGUF mapping,
    kept in the metadata cache, :mod:`rlhf_jax.models.disk_cache`). Raises
    :class:`GGUFError` as :func:`through_transformers` does, and for an architecture this
    reader does not map."""
    from transformers import AutoConfig

    config = cached_json(path, "config.json", lambda: through_transformers(
        path, lambda p: AutoConfig.from_pretrained(p.parent, gguf_file=p.name), "config").to_dict())
    readable = sorted(t for t, family in FAMILIES.items() if family.gguf)
    if config.get("model_type") not in readable:
        raise GGUFError(f"{path}: architecture {config.get('model_type')!r} is not supported from GGUF; supported: "
                        f"{', '.join(readable)} (convert the model to safetensors with transformers instead)")
    return config


def tokenizer_directory(path: Path) -> Path:
    """A directory with the tokenizer files (and chat template) of the GGUF file at ``path``,
    from transformers' GGUF tokenizer reader, kept in the metadata cache. Raises
    :class:`GGUFError` as :func:`through_transformers` does."""
    from transformers import AutoTokenizer

    def write(directory: Path) -> None:
        through_transformers(path, lambda p: AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name),
                             "tokenizer").save_pretrained(directory)

    return cached_directory(path, "tokenizer", write)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor of a GGUF file as :func:`dequantize` reads it (the fields of
    ``gguf.ReaderTensor`` it uses), its bytes mapped from the file."""
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]  # GGUF's order, innermost first


def file_index(path: Path) -> dict:
    """What a run reads from the GGUF file at ``path`` besides its config and tokenizer, from
    one parse kept in the metadata cache: ``{"tensors": [each tensor's name, type, shape, and
    the dtype, shape and offset of its bytes], "stop_ids": [the end-of-sequence, end-of-turn
    and end-of-message ids its metadata declares, in that order]}``. Raises
    :class:`GGUFError` as :func:`parse` does."""
    def build() -> dict:
        reader = parse(path)
        return {"tensors": [{"name": t.name, "type": int(t.tensor_type), "shape": [int(n) for n in t.shape],
                             "data_dtype": t.data.dtype.str, "data_shape": list(t.data.shape),
                             "offset": int(t.data_offset)} for t in reader.tensors],
                "stop_ids": [int(reader.fields[key].contents()) for key in STOP_KEYS if key in reader.fields]}

    return cached_json(path, "index.json", build)


def stored_tensors(path: Path) -> list[StoredTensor]:
    """The tensors of the GGUF file at ``path``, located by :func:`file_index` (a GGUF parse
    on the first read only) and mapped from the file, not yet dequantised."""
    import gguf

    return [StoredTensor(entry["name"], gguf.GGMLQuantizationType(entry["type"]),
                         np.memmap(path, dtype=np.dtype(entry["data_dtype"]), mode="r", offset=entry["offset"],
                                   shape=tuple(entry["data_shape"])), tuple(entry["shape"]))
            for entry in file_index(path)["tensors"]]


def read_tensors(path: Path, config: dict) -> dict[str, np.ndarray]:
    """``{Hugging Face name: float32 array}`` of every tensor in the file, dequantised,
    renamed, q/k rows unpermuted."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    arrays = {}
    for tensor in stored_tensors(path):
        if tensor.name == ROPE_FREQS:
            check_rope_factors(dequantize(tensor).reshape(-1), config, path)
            continue
        name = _hf_name(path, tensor.name)
        array = dequantize(tensor)
        if name.endswith("q_proj.weight"):
            array = unpermute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = unpermute(array, kv_heads)
        arrays[name] = array
    return arrays


def check_rope_factors(factors_F: np.ndarray, config: dict, path: Path) -> None:
    """The file's own rotary scaling wins: llama.cpp stores the per-frequency divisors it
    applies (``rope_freqs``: unscaled / scaled inverse frequency, Llama 3.1's rule), and the
    model is built from the config's ``rope_scaling``; a :class:`GGUFError` when the two
    disagree (beyond 1e-3 relative), instead of running with frequencies the file does not
    declare."""
    from rlhf_jax.models.families import config_from_hf
    from rlhf_jax.models.decoder import rope_inverse_frequencies

    decoder = config_from_hf(config)
    plain = rope_inverse_frequencies(dataclasses.replace(decoder, rope_scaling=None))
    expected_F = np.asarray(plain / rope_inverse_frequencies(decoder))
    if factors_F.shape != expected_F.shape or not np.allclose(factors_F, expected_F, rtol=1e-3):
        raise GGUFError(f"{path}: the rotary scaling factors in {ROPE_FREQS} differ from those of the config's "
                        f"rope_scaling ({config.get('rope_scaling')}); this reader cannot build that model")


def _hf_name(path: Path, name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match is None or match.group(2) not in _LAYER:
        raise GGUFError(f"{path}: tensor {name!r} has no Hugging Face counterpart in this reader")
    return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}.{match.group(3)}"

