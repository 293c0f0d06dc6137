"""Hugging Face checkpoints (config.json + safetensors) <-> nnx models.

Only safetensors are read: pickle-based ``.bin`` checkpoints can run arbitrary code when
loaded and are refused. Every tensor is checked by name and shape before it is used. With a
mesh, each parameter is assembled with ``jax.make_array_from_callback`` from the slices its
devices hold, read straight from the file (no full host copy per device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.models import gguf
from rlhf_jax.models.bert import BertModel, BertScoreModel
from rlhf_jax.models.config import EncoderConfig
from rlhf_jax.models.families import config_from_hf, family_of, tensor_names
from rlhf_jax.models.heads import CausalLM, ScoreModel
from rlhf_jax.models.hf_names import TensorName
from rlhf_jax.models.lora import merge_lora
from rlhf_jax.models.sharding import logical_to_sharding

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def build_model(config, head: str, *, num_labels: int = 1, rngs: nnx.Rngs, dtype=jnp.float32,
                param_dtype=jnp.float32, remat: bool | str = False, scan_layers: bool | None = None):
    """A freshly initialised model of ``config``'s family with the given head; ``remat`` and
    ``scan_layers`` as :class:`~rlhf_jax.models.decoder.Decoder` takes them (decoders only)."""
    tensor_names(config, head)  # validates the pair
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if isinstance(config, EncoderConfig):
        return BertModel(config, **kw) if head == "base" else BertScoreModel(config, num_labels, **kw)
    if head == "lm":
        return CausalLM(config, remat=remat, scan_layers=scan_layers, **kw)
    return ScoreModel(config, num_labels, remat=remat, scan_layers=scan_layers, **kw)


def _head_of(model) -> str:
    if isinstance(model, CausalLM):
        return "lm"
    if isinstance(model, (ScoreModel, BertScoreModel)):
        return "score"
    if isinstance(model, BertModel):
        return "base"
    raise TypeError(f"{type(model).__name__} is not a model of rlhf_jax.models")


def _default_head(hf: dict) -> str:
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        return "score"
    return family_of(hf.get("model_type")).heads[0]


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


def _slot(model: nnx.Module, attribute_path: tuple) -> tuple[nnx.Variable, int | None]:
    """The variable at ``attribute_path`` and, when the layers are stored stacked (a decoder's
    ``scan_layers``), the layer index that picks its row (else None)."""
    node, layer = model, None
    for part in attribute_path:
        if isinstance(part, int) and not isinstance(node, nnx.List):  # stacked blocks: the index is a row
            layer = part
            continue
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node, layer


def _layer_shape(variable: nnx.Variable, layer: int | None) -> tuple:
    shape = tuple(variable.get_value().shape)
    return shape if layer is None else shape[1:]


def _assign(variable: nnx.Variable, read, mesh: Mesh | None, rules, param_dtype, name: str) -> None:
    """Set ``variable`` (checkpoint tensor ``name``) from ``read(index) -> numpy`` (``index``
    None: the whole array), placed by ``rules`` on ``mesh`` when given, each device reading
    only its slice."""
    shape = tuple(variable.get_value().shape)
    if mesh is None:
        variable.set_value(jnp.asarray(np.ascontiguousarray(read(None)), dtype=param_dtype))
        return
    sharding = logical_to_sharding(variable.get_metadata().get("out_sharding"), shape, mesh, rules, what=name)
    variable.set_value(jax.make_array_from_callback(
        shape, sharding, lambda index: np.asarray(read(index)).astype(param_dtype)))


def _stacked_reader(readers: dict[int, object]):
    """``index -> numpy`` over the layers' readers, the layer axis leading."""
    def read(index):
        layers = range(len(readers)) if index is None else range(len(readers))[index[0]]
        return np.stack([readers[i](None if index is None else index[1:]) for i in layers])

    return read


def _is_head(entry: TensorName) -> bool:
    return entry.paths[0][0] in ("score", "classifier")


def _checkpoint_shape(entry: TensorName, shapes: list[tuple]) -> tuple:
    if len(shapes) > 1:  # fused: concatenated on the last flax axis
        return shapes[0][:-1] + (sum(s[-1] for s in shapes),)
    return shapes[0][::-1] if entry.transpose else shapes[0]


def _reader(handle, name: str, entry: TensorName, part: int, shapes: list[tuple]):
    """``index -> numpy`` for part ``part`` of the tensor, in flax layout; reads only the slice."""

    def read(index):
        if len(shapes) > 1:
            start = sum(s[-1] for s in shapes[:part])
            columns = (slice(None),) * (len(shapes[part]) - 1) + (slice(start, start + shapes[part][-1]),)
            full = handle.get_slice(name)[columns]
            return full if index is None else full[index]
        if index is None:
            array = handle.get_tensor(name)
        else:
            array = handle.get_slice(name)[tuple(index[::-1]) if entry.transpose else tuple(index)]
        return array.T if entry.transpose else array

    return read


class _Arrays:
    """``safe_open``'s reading interface over in-memory arrays (a dequantised GGUF file)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def get_tensor(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self.arrays[name])


class _Slice:
    def __init__(self, array: np.ndarray):
        self.array = array

    def get_shape(self) -> list[int]:
        return list(self.array.shape)

    def __getitem__(self, index) -> np.ndarray:
        return self.array[index]


def _config(path: Path, hf: dict):
    try:
        return config_from_hf(hf)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _open_checkpoint(path: Path):
    """``(config.json dict, its config, {tensor name: file}, open(file) -> safe_open-like
    context)`` of a checkpoint directory or a GGUF file (dequantised in memory, ``models.gguf``)."""
    if gguf.is_gguf(path):
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist")
        try:
            hf = gguf.read_config(path)
            arrays = gguf.read_tensors(path, hf)
        except gguf.GGUFError as error:
            raise CheckpointError(str(error)) from None
        except Exception as error:  # the gguf reader and transformers raise many types for a damaged file
            raise CheckpointError(f"{path} cannot be read as GGUF ({type(error).__name__}: {error}); it may be "
                                  "truncated or corrupt -- copy it again") from None
        return hf, _config(path, hf), dict.fromkeys(arrays, path), lambda file: contextlib.nullcontext(_Arrays(arrays))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a directory with config.json and "
                              "*.safetensors, or a .gguf file)" if not path.exists() else f"checkpoint {path} is a "
                              "file, not a directory with config.json and *.safetensors, nor a .gguf file")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON ({error}); restore it from the checkpoint's "
                              "source") from None
    config = _config(path, hf)  # the config's errors before the tensor index's
    return hf, config, _tensor_files(path), lambda file: safe_open(file, framework="numpy")


def _checkpoint_num_labels(config, head: str, files: dict[str, Path]) -> int:
    """The score head's output size as the checkpoint stores it; 1 when it has no score head."""
    score = [e.hf for e in tensor_names(config, head) if _is_head(e) and e.hf.endswith("weight")]
    if not score or score[0] not in files:
        return 1
    with safe_open(files[score[0]], framework="numpy") as f:
        return f.get_slice(score[0]).get_shape()[0]


def from_pretrained(
    path: str | Path,
    *,
    head: str | None = None,
    num_labels: int | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=None,
    remat: bool | str = False,
    scan_layers: bool | None = None,
    seed: int = 0,
    pad_token_id: int | None = None,
):
    """Load a Hugging Face checkpoint directory; the family comes from ``model_type``.

    ``head``: ``"lm"`` (:class:`CausalLM`), ``"score"`` (:class:`ScoreModel`, or
    :class:`BertScoreModel`) or ``"base"`` (:class:`BertModel`); by default the checkpoint's
    ``architectures`` decide. A ``"score"`` head absent from the checkpoint (a reward model
    or critic started from a causal LM) is drawn from ``N(0, initializer_range^2)`` with
    ``seed``, and logged. With ``mesh``, parameters are placed by ``rules`` as they are read.
    ``pad_token_id``: the pad id of the tokenizer in use, which the score head skips when it
    reads a sequence's last token; it replaces config.json's (only a fallback). ``remat`` and
    ``scan_layers``: see :class:`~rlhf_jax.models.decoder.Decoder` (per-layer tensors are
    stacked as they are read). Raises ``CheckpointError`` for a missing directory, config.json or tensor, or a shape mismatch.
    """
    path = Path(path)
    hf, config, files, open_file = _open_checkpoint(path)
    if pad_token_id is not None:
        config = dataclasses.replace(config, pad_token_id=pad_token_id)
    head = head or _default_head(hf)
    num_labels = num_labels or _checkpoint_num_labels(config, head, files)
    model = nnx.eval_shape(lambda: build_model(config, head, num_labels=num_labels, rngs=nnx.Rngs(seed),
                                               dtype=dtype, param_dtype=param_dtype, remat=remat,
                                               scan_layers=scan_layers))
    used: set[str] = set()
    fresh_key = jax.random.key(seed)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}
        stacked: dict[int, tuple[nnx.Variable, dict[int, object]]] = {}  # id -> (variable, {layer: reader})
        for entry in tensor_names(config, head):
            slots = [_slot(model, p) for p in entry.paths]
            shapes = [_layer_shape(v, layer) for v, layer in slots]
            name = entry.hf if entry.hf in files else entry.hf.removeprefix(entry.prefix)
            if name not in files:
                if not _is_head(entry):
                    raise CheckpointError(f"{path}: tensor {entry.hf!r} is missing")
                log.info("%s: %s is not in the checkpoint; initialised from N(0, %g^2) / zeros",
                         path, entry.hf, config.initializer_range)
                fresh_key, key = jax.random.split(fresh_key)
                init = nnx.initializers.normal(config.initializer_range) if entry.hf.endswith("weight") \
                    else nnx.initializers.zeros_init()
                slots[0][0].set_value(init(key, shapes[0], param_dtype))
                continue
            if files[name] not in handles:
                handles[files[name]] = stack.enter_context(open_file(files[name]))
            handle = handles[files[name]]
            found = tuple(handle.get_slice(name).get_shape())
            wanted = _checkpoint_shape(entry, shapes)
            if found != wanted:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {found} in the checkpoint but config.json implies {wanted}"
                )
            used.add(name)
            for part, (variable, layer) in enumerate(slots):
                read = _reader(handle, name, entry, part, shapes)
                if layer is None:
                    _assign(variable, read, mesh, rules, param_dtype, name)
                else:
                    stacked.setdefault(id(variable), (variable, {}, name))[1][layer] = read
        for variable, readers, name in stacked.values():
            _assign(variable, _stacked_reader(readers), mesh, rules, param_dtype, f"{name} (every layer)")
    unused = sorted(set(files) - used)
    if unused:
        log.info("%s: %d checkpoint tensors not used by a %s model (e.g. %s)", path, len(unused), head,
                 ", ".join(unused[:3]))
    return model


def has_score_head(path: str | Path) -> bool:
    """Whether checkpoint ``path`` holds the tensors of a trained score head (a reward model's
    or critic's ``score`` / ``classifier``), rather than being a language model whose score
    head :func:`from_pretrained` would draw at random. A GGUF file (a language model) has
    none. Raises ``CheckpointError`` as :func:`from_pretrained` does for an unreadable path."""
    path = Path(path)
    if gguf.is_gguf(path):
        return False
    _, config, files, _ = _open_checkpoint(path)
    heads = [entry for entry in tensor_names(config, "score") if _is_head(entry)]
    return all(entry.hf in files or entry.hf.removeprefix(entry.prefix) in files for entry in heads)


def save_pretrained(model, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` + safetensors that transformers loads with the same outputs.

    LoRA adapters are merged into their base weights first. Checkpoints above
    ``max_shard_bytes`` are split into shards with a ``model.safetensors.index.json``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = merge_lora(model)
    head, config = _head_of(model), model.config
    tensors: dict[str, np.ndarray] = {}
    for entry in tensor_names(config, head):
        parts = []
        for variable, layer in (_slot(model, p) for p in entry.paths):
            value = variable.get_value()
            parts.append(np.asarray(jax.device_get(value if layer is None else value[layer])))
        array = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        tensors[entry.hf] = np.ascontiguousarray(array.T if entry.transpose else array)
    hf = config.hf_config | {"architectures": [family_of(config.model_type).architecture(config.model_type, head)], "model_type": config.model_type}
    hf["dtype"] = str(next(iter(tensors.values())).dtype)
    if head == "score":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    _write_tensors(tensors, path, max_shard_bytes)


def _write_tensors(tensors: dict[str, np.ndarray], path: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, path / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
