"""Building what a phase needs from its config: the mesh, the model (from a checkpoint or a
fresh init), and batches placed on the mesh."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax import models
from rlhf_jax.hosts import to_global, to_host
from rlhf_jax.config import ConfigError
from rlhf_jax.models.declared import declared_eos_ids
from rlhf_jax.models.decoder import set_attention
from rlhf_jax.models.lora import apply_lora
from rlhf_jax.models.sharding import BATCH_AXES, MESH_AXES, register_rules, use_for_activations
from rlhf_jax.data import BUILTIN_BYTES, Batch, has_tokenizer, load_tokenizer
from rlhf_jax.phases.config import MeshConfig, ModelConfig, TokenizerConfig, resolved_remat


def make_mesh(config: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """The mesh ``data x fsdp x tensor`` of ``config`` over every device (one axis of ``-1``
    takes the rest; ``devices``: these instead, e.g. a TPU topology's for ``rlhf-jax plan``),
    its ``rules`` (and ``frozen_rules``) registered as the default of every
    placement on it (``models.sharding.register_rules``), and the mesh of the activations in
    an open ``activation_sharding`` scope. Raises ``ConfigError`` when the sizes do not cover
    the devices."""
    chips = jax.devices() if devices is None else list(devices)
    devices = len(chips)
    sizes = {"data": config.data, "fsdp": config.fsdp, "tensor": config.tensor}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    for name, size in sizes.items():
        if size == -1:
            if devices % fixed:
                raise ConfigError(f"mesh: {' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} does not "
                                  f"divide the {devices} devices, so mesh.{name}=-1 cannot take the rest")
            sizes[name] = devices // fixed
    if math.prod(sizes.values()) != devices:
        raise ConfigError(f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} does not "
                          f"cover the {devices} devices; make the product {devices} (or one axis -1)")
    mesh = jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=chips)
    register_rules(mesh, config.rules, config.frozen_rules)
    use_for_activations(mesh)
    return mesh


def phase_tokenizer(config: TokenizerConfig, model: ModelConfig, *, needs_eos: bool = True):
    """The tokenizer of ``config``; by default the model's own -- model.path's tokenizer files or
    GGUF metadata -- and the built-in byte tokenizer for a fresh ``model.init``. ``needs_eos``
    False (a reward model) accepts an encoder tokenizer whose [SEP] ends a response. Raises
    ``ConfigError`` when model.path carries no tokenizer and none is named."""
    name = config.name
    if name is None and model.path is not None:
        if not has_tokenizer(model.path):
            raise ConfigError(f"model.path {model.path} carries no tokenizer files; name one with tokenizer.name (the "
                              "tokenizer the model was trained with)")
        name = model.path
    return load_tokenizer(name or BUILTIN_BYTES, pad_token=config.pad_token, needs_eos=needs_eos)


def stop_token_ids(tokenizer, config: TokenizerConfig, *checkpoints: str | None) -> tuple[int, ...]:
    """The ids that end a sampled completion: every EOS id that ``checkpoints`` declare
    (:func:`rlhf_jax.models.declared.declared_eos_ids`: generation_config.json's list, a GGUF
    file's eos/eot ids), the tokenizer's own EOS, and the tokens ``config.stop_tokens`` names --
    in that order, without repeats. Raises ``ConfigError`` naming a stop token that is not one
    token of the tokenizer's vocabulary."""
    ids = [i for path in checkpoints for i in declared_eos_ids(path)]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for text in config.stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(text)
        if token_id is None or (token_id == tokenizer.unk_token_id and text != tokenizer.unk_token):
            raise ConfigError(f"tokenizer.stop_tokens: {text!r} is not a token of the tokenizer "
                              f"{getattr(tokenizer, 'name_or_path', '')!r}; give a token's text as the vocabulary "
                              "spells it (e.g. '<|im_end|>')")
        ids.append(token_id)
    return tuple(dict.fromkeys(ids))


def build_model(config: ModelConfig, head: str, *, tokenizer, seed: int, path: str | None = None,
                what: str = "model") -> nnx.Module:
    """The model of ``config`` (or of checkpoint ``path`` when given) with head ``lm`` or ``score``,
    LoRA adapters applied when configured, reading the tokens of ``tokenizer``: a fresh init gets
    its vocabulary size, and the score head its pad id (config.json's pad id is only the
    fallback). A fresh init draws from ``seed``. Raises ``ConfigError`` when the model's
    vocabulary cannot hold the tokenizer's ids (``what`` names the model in the message)."""
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    path = path or config.path
    scan_layers = None if config.scan_layers == "auto" else config.scan_layers
    if (path is None) == (config.init is None):
        raise ConfigError("model: give exactly one of model.path (a checkpoint) and model.init (config.json fields)")
    if path is not None:
        model = models.from_pretrained(path, head=head, dtype=dtype, param_dtype=param_dtype, seed=seed,
                                       pad_token_id=tokenizer.pad_token_id, scan_layers=scan_layers)
    else:
        hf = {"vocab_size": len(tokenizer), **config.init, "pad_token_id": tokenizer.pad_token_id}
        model = models.build_model(models.config_from_hf(hf), head, rngs=nnx.Rngs(seed), dtype=dtype,
                                   param_dtype=param_dtype, scan_layers=scan_layers)
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"the {what} ({path or 'model.init'}) has a vocabulary of {model.config.vocab_size} tokens "
                          f"but its tokenizer {getattr(tokenizer, 'name_or_path', '') or ''!r} has {len(tokenizer)}: "
                          "ids beyond the vocabulary cannot be embedded. Use the model's own tokenizer "
                          "(tokenizer.name: the checkpoint directory)")
    decoder = getattr(model, "model", None)
    if hasattr(decoder, "remat"):  # a decoder; a BERT encoder has no per-block remat
        try:
            set_attention(model, config.attention)
        except ValueError as error:  # a kernel that cannot run this model here
            raise ConfigError(str(error)) from None
        parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        decoder.remat = resolved_remat(config.remat, parameters)
    if config.lora is not None:
        try:
            apply_lora(model, config.lora.targets, rank=config.lora.rank, alpha=config.lora.alpha,
                       rngs=nnx.Rngs(seed + 1))
        except ValueError as error:  # targets that name no linear layer of this model
            raise ConfigError(f"model.lora.targets: {error}") from None
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch leaves are ``[micro_batches, rows, ...]``: rows split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def put_batch(batch: Batch, mesh: Mesh) -> Batch:
    """This process's rows (every leaf ``[M, rows, ...]``) -> global arrays on the mesh."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), batch)


def put_shared_rows(batch: Batch, mesh: Mesh) -> Batch:
    """Rows that every process holds alike (``[rows, ...]``: an evaluation chunk) -> global
    arrays split over data x fsdp, each device taking its rows by global index."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return jax.tree.map(lambda v: to_global(v, sharding), batch)


def host_model(model: nnx.Module) -> nnx.Module:
    """``model`` with every parameter gathered to this host (numpy), for work one process does
    alone (samples, the Hugging Face export). Gathering is collective: every process calls it."""
    if jax.process_count() == 1:
        return model
    graph, state = nnx.split(model)
    return nnx.merge(graph, to_host(state))
