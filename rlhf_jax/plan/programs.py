"""The programs a config will run, built with abstract parameters (``nnx.eval_shape``: an 8B
or 70B model costs no memory) and abstract batches of the config's shapes (no data read,
no weights loaded), placed on the target's mesh by the config's rules."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import models
from rlhf_jax.config import ConfigError
from rlhf_jax.data import Pairs, Sequences
from rlhf_jax.data.batches import SharedPromptPairs
from rlhf_jax.models.gguf import is_gguf, read_config
from rlhf_jax.models.lora import apply_lora
from rlhf_jax.models.sharding import BATCH_AXES, rules_of, shardings_of
from rlhf_jax.phases.config import ModelConfig, TokenizerConfig, resolved_remat, resolved_shared_prompt, resolved_vocab_chunk
from rlhf_jax.phases.setup import phase_tokenizer
from rlhf_jax.train import TrainState, make_optimizer, make_train_step
from rlhf_jax.train.step import train_step_program

PAIR_PHASES = ("rm", "dpo", "simpo", "orpo")  # phases whose batches are chosen / rejected pairs


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program of a run: ``fn`` jitted, lowered with ``arguments`` (abstract,
    each with its sharding); ``parameters`` / ``optimizer`` name the bytes of the model's
    weights and of the optimiser state among them (per device, for the report)."""

    name: str
    fn: Callable
    arguments: tuple
    parameter_bytes: int
    optimizer_bytes: int


def hf_fields(config: ModelConfig, tokenizer: TokenizerConfig = TokenizerConfig()) -> dict:
    """The Hugging Face config fields of ``config``'s model, read without its weights:
    ``model.init`` (its ``vocab_size`` honoured, else the tokenizer's length), or the
    checkpoint's ``config.json`` / GGUF metadata. Raises ``ConfigError`` when there is none."""
    if config.init is not None:
        if "vocab_size" in config.init:
            return dict(config.init)
        return {"vocab_size": len(phase_tokenizer(tokenizer, config)), **config.init}
    path = Path(config.path)
    if is_gguf(path):
        return read_config(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={config.path} has no config.json to plan from")
    return json.loads((path / "config.json").read_text())


def model_builder(config: ModelConfig, head: str, *, tokenizer: TokenizerConfig = TokenizerConfig(),
                  lora: bool = True) -> Callable[[], nnx.Module]:
    """A function building ``config``'s model (random weights) with its LoRA adapters when
    configured and ``lora``; under ``nnx.eval_shape`` its parameters stay abstract (shapes,
    dtypes, logical axes; no values)."""
    decoder = models.config_from_hf(hf_fields(config, tokenizer))
    scan_layers = None if config.scan_layers == "auto" else config.scan_layers

    def build():
        model = models.build_model(decoder, head, rngs=nnx.Rngs(0), dtype=jnp.dtype(config.dtype),
                                   param_dtype=jnp.dtype(config.param_dtype), scan_layers=scan_layers)
        if hasattr(model.model, "remat"):
            parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
            model.model.remat = resolved_remat(config.remat, parameters)
        if lora and config.lora is not None:
            apply_lora(model, config.lora.targets, rank=config.lora.rank, alpha=config.lora.alpha, rngs=nnx.Rngs(1))
        return model

    return build


def with_shardings(tree, mesh, rules=None):
    """Abstract ``tree`` with every leaf a ``ShapeDtypeStruct`` carrying its sharding by the rules."""
    shardings = shardings_of(tree, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _nbytes_per_device(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(jnp.dtype(leaf.dtype).itemsize * max(1, int(jnp.prod(jnp.asarray(shard)))))
    return total


def abstract_batch(phase: str, config, mesh, shared_prompt: bool) -> Sequences | Pairs | SharedPromptPairs:
    """The ``[micro_batches, rows, length]`` batch of ``phase`` at ``config``'s sizes, rows split
    over the batch axes: SFT sequences of ``data.max_length``, pairs of two such sequences, or
    (``shared_prompt``) rows holding the prompt once and both responses, at most twice
    ``data.max_length``. Raises ``ConfigError`` for a batch the mesh cannot split."""
    t = config.train
    rows, length = t.batch_size // t.micro_batches, config.data.max_length
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ConfigError(f"train.batch_size / train.micro_batches = {rows} rows per micro-batch do not split over the "
                          f"{shards} devices of the batch axes (data x fsdp); make them a multiple of {shards}")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, BATCH_AXES))

    def array(dtype, *tail):
        return jax.ShapeDtypeStruct((t.micro_batches, rows, *tail), dtype, sharding=sharding)

    def sequences():
        return Sequences(array(jnp.int32, length), array(jnp.int32, length), array(jnp.float32, length))

    if phase == "sft":
        return sequences()
    reference = array(jnp.float32, 2) if phase == "dpo" and config.dpo.reference_logps == "precompute" else None
    if shared_prompt:
        return SharedPromptPairs(array(jnp.int32, 2 * length), array(jnp.int32, 2 * length),
                                 array(jnp.int32, 2 * length), reference_logps_BK=reference)
    return Pairs(sequences(), sequences(), reference_logps_BK=reference)


def offline_programs(phase_name: str, phase, config, mesh) -> list[Program]:
    """The train step of an offline phase (SFT, RM, DPO, SimPO, ORPO), with DPO's reference
    forward fused in as the run fuses it. Raises ``ConfigError`` for another phase."""
    if phase_name not in ("sft", *PAIR_PHASES):
        raise ConfigError(f"the {phase_name} phase is not planned yet; plan sft, "
                          f"{', '.join(PAIR_PHASES)} or grpo / ppo / rloo configs")
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, vocab_chunk=resolved_vocab_chunk(config.train.vocab_chunk,
                                                hf_fields(config.model, config.tokenizer)["vocab_size"])))
    optimizer = config.train.optimizer
    tx = make_optimizer(dataclasses.replace(optimizer, total_steps=optimizer.total_steps or config.train.steps))
    build = model_builder(config.model, phase.head, tokenizer=config.tokenizer)
    model = nnx.eval_shape(build)
    state = nnx.eval_shape(lambda: TrainState.create(build(), tx, jax.random.key(0)))
    state = with_shardings(state, mesh)
    shared = phase_name != "sft" and resolved_shared_prompt(config.data.shared_prompt, config.data.format, model)
    batch = abstract_batch(phase_name, config, mesh, shared)
    reference_on_the_fly = phase_name == "dpo" and config.dpo.reference_logps != "precompute"
    step = make_train_step(phase.loss_fn(config, None), tx)
    if not reference_on_the_fly:
        fn, arguments = train_step_program(step), (state, batch)
    elif config.model.lora is not None and config.dpo.reference is None:  # the base under the adapters
        fn = train_step_program(step, prepare=functools.partial(phase.prepare, config), reference_is_base=True)
        arguments = (state, batch)
    else:
        reference = nnx.eval_shape(model_builder(
            dataclasses.replace(config.model, path=config.dpo.reference or config.model.path), "lm",
            tokenizer=config.tokenizer, lora=False))
        graph, params = nnx.split(reference)
        params = with_shardings(params, mesh, rules_of(mesh, frozen=True))
        fn = train_step_program(step, reference_graph=graph, prepare=functools.partial(phase.prepare, config))
        arguments = (state, params, batch)
    return [Program(f"{phase_name} step", fn, arguments, _nbytes_per_device(state.params) + _nbytes_per_device(
        state.frozen) + (_nbytes_per_device(arguments[1]) if len(arguments) == 3 else 0),
                    _nbytes_per_device(state.opt_state))]
