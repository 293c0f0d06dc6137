"""The programs a config will run, built with abstract parameters (``nnx.eval_shape``: an 8B
or 70B model costs no memory) and abstract batches of the config's shapes (no data read,
no weights loaded), placed on the target's mesh by the config's rules."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import models
from rlhf_jax.config import ConfigError
from rlhf_jax.data import Pairs, Sequences
from rlhf_jax.data.batches import SharedPromptPairs
from rlhf_jax.data.formats import FORMATS, Conversation, Preference, PromptCompletion, formats_of
from rlhf_jax.models.decoder import set_attention
from rlhf_jax.models.gguf import is_gguf, read_config
from rlhf_jax.models.lora import apply_lora
from rlhf_jax.models.sharding import BATCH_AXES, rules_of, shardings_of
from rlhf_jax.plan.flops import model_flops
from rlhf_jax.phases.config import ModelConfig, TokenizerConfig, resolved_remat, resolved_shared_prompt, resolved_vocab_chunk
from rlhf_jax.phases.protocol import ReferencePhase
from rlhf_jax.phases.setup import phase_tokenizer
from rlhf_jax.train import TrainState, make_optimizer, make_train_step
from rlhf_jax.train.step import train_step_program

SEQUENCE_EXAMPLES = (PromptCompletion, Conversation)  # one sequence per row
PAIR_EXAMPLES = (Preference,)  # a chosen and a rejected sequence per row


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a run: ``lower()`` lowers it (a jitted function applied to abstract
    arguments, each with its sharding); ``parameter_bytes`` / ``optimizer_bytes`` are the
    model weights' and the optimiser state's share of its arguments, per device;
    ``resident_bytes`` what the run holds beside its arguments while it runs (the train state
    while the sampler runs), per device; ``model_flops`` the FLOPs per step its models'
    passes need and their attention's share (:func:`~rlhf_jax.plan.flops.model_flops`, all
    devices together; None where not counted: the sampler, a critic's update)."""

    name: str
    lower: Callable[[], jax.stages.Lowered]
    parameter_bytes: int
    optimizer_bytes: int
    resident_bytes: int = 0
    model_flops: tuple[float, float] | None = None


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
            try:
                set_attention(model, config.attention)
            except ValueError as error:  # a kernel that cannot run this model here
                raise ConfigError(str(error)) from None
        if lora and config.lora is not None:
            apply_lora(model, config.lora.targets, rank=config.lora.rank, alpha=config.lora.alpha, rngs=nnx.Rngs(1))
        return model

    return build


LOOKUP_TABLES = {"embed_tokens", "embed_positions", "word_embeddings", "position_embeddings", "token_type_embeddings"}


def matmul_parameters(model: nnx.Module) -> tuple[int, int]:
    """``(body, head)``: the parameters of ``model`` that multiply activations, in its decoder
    (or encoder) and in its output head (the LM head, the tied token table, or a score head);
    the embedding tables (``LOOKUP_TABLES``) are looked up, not multiplied."""
    tied = getattr(model, "lm_head", 0) is None  # a causal LM whose head is the token table
    body = head = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        names = {getattr(key, "key", None) for key in path}
        if names & {"lm_head", "score"} or tied and "embed_tokens" in names:
            head += leaf.size
        elif not names & LOOKUP_TABLES:
            body += leaf.size
    return body, head


def _model_flops(model: nnx.Module, tokens: int, length: int, passes: int,
                 head_tokens: int | None = None) -> tuple[float, float] | None:
    """PaLM's count for ``model``; None with LoRA adapters (the frozen base takes no weight
    gradient: a count of full-parameter training would not be the program's)."""
    if any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(
            x, nnx.Variable))):
        return None
    config = model.config
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_heads)
    return model_flops(*matmul_parameters(model), config.num_layers, config.num_heads, head_dim, tokens,
                       length, passes=passes, head_tokens=head_tokens)


def with_shardings(tree, mesh, rules=None):
    """Abstract ``tree`` with every leaf a ``ShapeDtypeStruct`` carrying its sharding by the rules."""
    shardings = shardings_of(tree, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _nbytes_per_device(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        # a random key (the train state's): its key data, two uint32 words for the default threefry
        itemsize = 8 if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else jnp.dtype(leaf.dtype).itemsize
        total += itemsize * max(1, math.prod(shard))
    return total


def abstract_batch(config, mesh, *, shared_prompt: bool, reference_logps: bool) -> Sequences | Pairs | SharedPromptPairs:
    """The ``[micro_batches, rows, length]`` batch of ``config``'s data format at its sizes, rows
    split over the batch axes: sequences of ``data.max_length``, pairs of two such sequences,
    or (``shared_prompt``) rows holding the prompt once and both responses, at most twice
    ``data.max_length``; a pair carries its precomputed reference log-probs ``[.., 2]`` when
    ``reference_logps``. Raises ``ConfigError`` for a batch the mesh cannot split."""
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

    if FORMATS[config.data.format].example in SEQUENCE_EXAMPLES:
        return sequences()
    reference = array(jnp.float32, 2) if reference_logps else None
    if shared_prompt:
        return SharedPromptPairs(array(jnp.int32, 2 * length), array(jnp.int32, 2 * length),
                                 array(jnp.int32, 2 * length), reference_logps_BK=reference)
    return Pairs(sequences(), sequences(), reference_logps_BK=reference)


def offline_programs(phase, config, mesh) -> list[Program]:
    """The train step of an offline phase (``phases.PHASES``) on sequences or pairs, with a
    reference phase's forward fused in as the run fuses it (or its log-probs precomputed, as
    data). Raises ``ConfigError`` for a data format not planned yet (rankings, unpaired rows,
    steps)."""
    planned = formats_of(*SEQUENCE_EXAMPLES, *PAIR_EXAMPLES)
    if config.data.format not in planned:
        raise ConfigError(f"the {phase.name} phase on data.format={config.data.format} is not planned yet; plan a "
                          f"phase on {', '.join(planned)} data or a grpo / ppo / rloo config")
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, vocab_chunk=resolved_vocab_chunk(config.train.vocab_chunk,
                                                hf_fields(config.model, config.tokenizer)["vocab_size"])))
    optimizer = config.train.optimizer
    tx = make_optimizer(dataclasses.replace(optimizer, total_steps=optimizer.total_steps or config.train.steps))
    build = model_builder(config.model, phase.head, tokenizer=config.tokenizer)
    model = nnx.eval_shape(build)
    state = nnx.eval_shape(lambda: TrainState.create(build(), tx, jax.random.key(0)))
    state = with_shardings(state, mesh)
    with_reference = isinstance(phase, ReferencePhase)
    precomputed = with_reference and phase.precomputes_reference(config)
    shared = FORMATS[config.data.format].example in PAIR_EXAMPLES and resolved_shared_prompt(
        config.data.shared_prompt, config.data.format, model)
    batch = abstract_batch(config, mesh, shared_prompt=shared, reference_logps=precomputed)
    step = make_train_step(phase.loss_fn(config, None), tx)
    if not with_reference or precomputed:
        fn, arguments = train_step_program(step), (state, batch)
    elif config.model.lora is not None and phase.reference_path(config) is None:  # the base under the adapters
        fn = train_step_program(step, prepare=functools.partial(phase.prepare, config), reference_is_base=True)
        arguments = (state, batch)
    else:
        reference = nnx.eval_shape(model_builder(
            dataclasses.replace(config.model, path=phase.reference_path(config) or config.model.path), "lm",
            tokenizer=config.tokenizer, lora=False))
        graph, params = nnx.split(reference)
        params = with_shardings(params, mesh, rules_of(mesh, frozen=True))
        fn = train_step_program(step, reference_graph=graph, prepare=functools.partial(phase.prepare, config))
        arguments = (state, params, batch)
    sequences = [x for x in jax.tree.leaves(batch) if x.dtype == jnp.int32 and x.ndim == 3][:2 if shared else None]
    length = sequences[0].shape[-1]  # a pair's two sequences, or a shared-prompt row's ids and segments
    tokens = sequences[0].size * (1 if shared or FORMATS[config.data.format].example in SEQUENCE_EXAMPLES else 2)
    reference_passes = 1 if with_reference and not precomputed else 0
    return [Program(f"{phase.name} step", lambda: fn.lower(*arguments), _nbytes_per_device(state.params)
                    + _nbytes_per_device(state.frozen) + (_nbytes_per_device(arguments[1]) if len(arguments) == 3 else 0),
                    _nbytes_per_device(state.opt_state),
                    model_flops=_model_flops(model, tokens, length, passes=3 + reference_passes,
                                              head_tokens=tokens - tokens // length))]  # no logits after the last


def online_programs(config, mesh) -> list[Program]:
    """An online iteration's programs: the sampler (prefill and decode of ``rollout.prompts x
    rollout.samples`` rows at the longest prompt and completion buckets), a reward model's
    forward when the reward is one, and the update (reference and policy log-probs, advantages,
    the clipped-surrogate steps). Raises ``ConfigError`` for an algorithm not planned yet."""
    from rlhf_jax import kl
    from rlhf_jax.phases.algorithms import ALGORITHMS, RolloutBatch, PolicyGradient
    from rlhf_jax.rl.critic_free import update_is_on_policy
    from rlhf_jax.rollout.buckets import bucket_length
    from rlhf_jax.rollout.continuous import compiled_program, program_plan
    from rlhf_jax.rollout.engine import ContinuousBatching, GenerationConfig, _generate
    from rlhf_jax.phases.algorithms import sampling_config

    algorithm = ALGORITHMS[config.algorithm]
    if not isinstance(algorithm, PolicyGradient) or algorithm.needs_critic and config.critic is not None:
        raise ConfigError(f"rlhf-jax plan: {config.algorithm} is not planned yet; plan grpo, rloo, reinforce, dapo "
                          "or ppo (its critic from the policy or the reward model)")
    r, t = config.rollout, config.train
    rows = r.prompts * r.samples
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if r.prompts % shards:
        raise ConfigError(f"rollout.prompts={r.prompts} does not split over the {shards} devices of the batch axes "
                          f"(data x fsdp); make it a multiple of {shards}")
    prompt = bucket_length(config.data.max_prompt_length or config.data.max_length,
                           GenerationConfig.prompt_buckets, "prompt length")
    completion = bucket_length(r.max_new_tokens, r.completion_buckets, "completion length")
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))

    def rows_of(count: int, *tail, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((count, *tail), dtype, sharding=batch)

    build = model_builder(config.model, "lm", tokenizer=config.tokenizer)
    section = algorithm.section(config)
    updates = t.iterations * section.epochs * section.minibatches
    policy_tx, critic_tx = (make_optimizer(dataclasses.replace(c, total_steps=c.total_steps or updates))
                            for c in (t.optimizer, t.critic_optimizer))
    controller = (kl.fixed_kl_controller(config.kl.beta) if config.kl.target is None else
                  kl.adaptive_kl_controller(config.kl.beta, config.kl.target, config.kl.horizon))

    def initial_state():
        policy = build()
        critic = None
        if algorithm.needs_critic:  # the policy's decoder with a value head, or the reward model's shape
            shape = ModelConfig(path=config.reward.model) if config.reward.model else config.model
            critic = TrainState.create(model_builder(shape, "score", tokenizer=config.tokenizer, lora=False)(),
                                       critic_tx, jax.random.key(1))
        return algorithm.init(config, TrainState.create(policy, policy_tx, jax.random.key(0)), critic,
                              controller.init()).lagged(r.max_policy_lag)

    state = with_shardings(nnx.eval_shape(initial_state), mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.sharding.NamedSharding(mesh,
                                                                                          jax.sharding.PartitionSpec()))
    abstract_policy = nnx.eval_shape(build)
    graph, params = nnx.split(abstract_policy)
    params = with_shardings(params, mesh, config.mesh.sampler_rules)  # the policy's layout while sampling
    generation = GenerationConfig(max_new_tokens=completion, stop_token_ids=(0,), pad_token_id=0,
                                  sampling=sampling_config(config), num_samples=r.samples,
                                  continuous=None if r.engine == "static" else ContinuousBatching(
                                      r.slots, r.page_size, r.cache_pages, r.paged_attention))
    sampler_inputs = (rows_of(r.prompts, prompt), rows_of(r.prompts, prompt), key,
                      rows_of(r.prompts, dtype=jnp.uint32), rows_of(r.prompts * r.samples))
    reference = None
    if config.model.lora is None and algorithm.uses_reference:
        reference = with_shardings(nnx.eval_shape(model_builder(config.model, "lm", tokenizer=config.tokenizer,
                                                                lora=False)), mesh, rules_of(mesh, frozen=True))
    # held while the sampler runs: the train state and the reference, less the policy's weights when the
    # sampler reads them where they are (no mesh.sampler_rules: they are its arguments)
    resident = _nbytes_per_device(state) + (0 if reference is None else _nbytes_per_device(nnx.state(reference))) - (
        0 if config.mesh.sampler_rules is not None else _nbytes_per_device((state.policy.params, state.policy.frozen)))
    if generation.continuous is None:
        sampler = Program("sampler: prefill + decode", lambda: _generate.lower(
            graph, params, *sampler_inputs, generation), _nbytes_per_device(params), 0, resident)
    else:  # the pool and the prompts replicated, the parameters as placed (rollout.continuous)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        sampler_inputs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in sampler_inputs)
        pages = program_plan(generation, prompt, abstract_policy.config,  # the target platform's kernel
                             abstract_policy.model.dtype or jnp.float32)
        sampler = Program("sampler: continuous batching", lambda: compiled_program.lower(
            graph, params, *sampler_inputs, generation, pages), _nbytes_per_device(params), 0, resident)
    program = algorithm.make_iteration(config, policy_tx, critic_tx, controller)
    width = prompt + completion
    scored = RolloutBatch(rows_of(rows, width), rows_of(rows, width), rows_of(rows, width),
                          rows_of(rows, width, dtype=jnp.float32), rows_of(rows, dtype=jnp.float32), prompt_width=prompt)
    passes = None  # the policy's: a forward and backward per epoch, the reference's and the old policy's forwards
    if not algorithm.needs_critic:
        passes = 3 * section.epochs + algorithm.uses_reference + (not update_is_on_policy(section, algorithm.context(config)))
    update = Program("update: reference + policy log-probs, advantages, clipped steps", lambda: program.lower(
        state, reference, scored, key),
                     _nbytes_per_device((state.policy.params, state.policy.frozen)) + (
                         0 if reference is None else _nbytes_per_device(nnx.state(reference))),
                     _nbytes_per_device(state.policy.opt_state),
                     model_flops=None if passes is None else _model_flops(nnx.eval_shape(build), rows * width, width,
                                                                          passes, head_tokens=rows * completion))
    return [sampler, update]
