"""The configs of the offline phases (SFT, RM, DPO): YAML -> frozen dataclasses.

Every phase config has the same sections -- ``model``, ``tokenizer``, ``data``, ``train``,
``checkpoint``, ``mesh``, ``metrics`` -- plus its own (``rm``, ``dpo``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from rlhf_jax.config import ConfigError, at_least, between, greater_than
from rlhf_jax.data import DataConfig
from rlhf_jax.data.formats import compares_responses
from rlhf_jax.losses.preference import DPOLossType
from rlhf_jax.models.decoder import attends_by_segments, remat_policy
from rlhf_jax.models.sharding import DEFAULT_RULES, check_rules
from rlhf_jax.metrics import MetricsConfig
from rlhf_jax.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        at_least(1, rank=self.rank)
        greater_than(0, alpha=self.alpha)
        if not self.targets:
            raise ValueError("targets is empty; name the projections to adapt, e.g. [q_proj, v_proj]")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Exactly one of ``path`` (a Hugging Face checkpoint directory) or ``init`` (the fields of
    a config.json, to train a fresh randomly initialised model; ``vocab_size`` defaults to the
    tokenizer's)."""

    path: str | None = None
    init: dict | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # per-block rematerialisation (models.decoder.REMAT_POLICIES): none, block (keep each block's input
    # only; = true), save_dots (keep the projections' outputs too), offload (those in host memory);
    # auto: block for models of REMAT_AUTO_PARAMETERS or more, where activations would dominate memory
    # (as TRL's gradient_checkpointing=True default), none below
    remat: bool | Literal["auto", "none", "block", "save_dots", "offload"] = "auto"
    # the attention kernel of training forwards (models.attention): auto = Pallas splash on a TPU,
    # cuDNN flash on a GPU, else the naive path up to 2048 keys and the blockwise (flash-style,
    # linear memory) one beyond
    attention: Literal["auto", "xla", "blockwise", "dot_product", "splash"] = "auto"
    # decoder blocks stored stacked and run by one lax.scan (models.decoder): one block compiled instead
    # of num_hidden_layers; auto: on from SCAN_LAYERS_AUTO (4) layers. Checkpoints keep the per-layer layout
    scan_layers: bool | Literal["auto"] = "auto"
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.init is not None:
            from rlhf_jax.models.families import check_init_fields

            check_init_fields(self.init)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    # a local tokenizer directory, a .gguf file, a cached hub name, or builtin:bytes; None: the model's own
    # (model.path's tokenizer files or GGUF metadata; builtin:bytes for a fresh model.init)
    name: str | None = None
    pad_token: str | None = None  # the fix for a tokenizer without one: "eos" or an existing token
    # token texts that also end a completion, beside every EOS id the checkpoint declares
    # (generation_config.json's eos_token_id list, a GGUF file's eos/eot ids) and the tokenizer's EOS
    stop_tokens: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global: sequences (SFT) or pairs (RM, DPO) per optimiser step
    micro_batches: int = 1  # gradient accumulation, exact (token-weighted)
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4)
    eval_every: int = 0  # 0: only at the end
    eval_batches: int | None = None  # cap on held-out batches per evaluation (None: all)
    log_every: int = 1
    # vocabulary slice for log-probs (models.sequence_logprobs): None: full logits; auto: 8192 when the
    # vocabulary is over 32768 tokens (a real model's: [B, T, V] logits would dominate memory), else None
    vocab_chunk: int | Literal["auto"] | None = "auto"
    samples: int = 4  # SFT/DPO: held-out prompts to sample completions for at the end
    sample_tokens: int = 48
    max_nonfinite: int = 10  # this many non-finite (skipped) updates in a row stop the run (exit 1)

    def __post_init__(self):
        at_least(1, steps=self.steps, batch_size=self.batch_size, micro_batches=self.micro_batches,
                 max_nonfinite=self.max_nonfinite,
                 log_every=self.log_every, eval_batches=self.eval_batches,
                 vocab_chunk=None if self.vocab_chunk == "auto" else self.vocab_chunk,
                 sample_tokens=self.sample_tokens)
        at_least(0, eval_every=self.eval_every, samples=self.samples)
        if self.batch_size % self.micro_batches:
            raise ValueError(f"micro_batches={self.micro_batches} does not divide batch_size={self.batch_size}")
        if self.optimizer.total_steps is None and self.optimizer.warmup_steps > self.steps:
            raise ValueError(f"optimizer.warmup_steps={self.optimizer.warmup_steps} exceeds steps={self.steps}; "
                             "lower the warm-up or train longer")


def resolved_vocab_chunk(setting: int | str | None, vocab_size: int) -> int | None:
    """``train.vocab_chunk`` for a model of ``vocab_size`` tokens (``"auto"``: see the field)."""
    if setting == "auto":
        return 8192 if vocab_size > 32768 else None
    return setting


REMAT_AUTO_PARAMETERS = 100_000_000


def resolved_remat(setting: bool | str, parameters: int) -> str:
    """The ``models.decoder.REMAT_POLICIES`` name of ``model.remat`` for a model of
    ``parameters`` (``"auto"``: see the field)."""
    if setting == "auto":
        return "block" if parameters >= REMAT_AUTO_PARAMETERS else "none"
    return remat_policy(setting)


def resolved_shared_prompt(setting: bool | str, data_format: str, model) -> bool:
    """``data.shared_prompt`` for ``model`` reading ``data_format`` rows. ``"auto"``: on for pairs
    and rankings read by a decoder (prefix sharing, Wang et al., 2024: the prompt runs once,
    the same scores and log-probs), off otherwise. Raises ``ConfigError`` for ``true`` with a
    model that cannot read shared rows (a bidirectional encoder would let the responses see
    each other, the splash kernel cannot show the prompt to them all; ``"auto"`` is off there)."""
    reads_shared_rows = hasattr(model, "response_scores") or hasattr(model, "logits")
    by_segments = attends_by_segments(model)
    if setting == "auto":
        return compares_responses(data_format) and reads_shared_rows and not by_segments
    if setting and not reads_shared_rows:
        raise ConfigError(f"data.shared_prompt: true needs a decoder; {type(model).__name__} attends both ways, so "
                          "the responses would see each other. Set data.shared_prompt to false (or auto)")
    if setting and by_segments:
        raise ConfigError("data.shared_prompt: true cannot run on model.attention's splash kernel, whose segment ids "
                          "cannot show one prompt to every response. Set data.shared_prompt to false (or auto), or "
                          "model.attention to blockwise")
    return setting


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    async_save: bool = True
    export_hf: bool = True  # write <output_dir>/hf (safetensors + config + tokenizer) at the end

    def __post_init__(self):
        at_least(1, every=self.every, keep=self.keep)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``data x fsdp x tensor`` (``-1``: the remaining devices, for one axis at
    most). Batches split over ``data`` and ``fsdp``; parameters shard by ``rules`` (logical
    axis -> mesh axis or null; default: ``embed`` over ``fsdp``, ``vocab``, ``heads``, ``kv``
    and ``mlp`` over ``tensor``), activations by the same rules (``models.sharding``).
    ``frozen_rules``: the rules of the frozen models (reference, reward model, judge,
    baseline) when they should differ, e.g. every weight over ``fsdp``. ``sampler_rules``: the
    policy's layout while it samples, when it should differ from training's: a whole table
    like ``rules`` (a logical axis it leaves out is replicated) that may differ only in
    ``embed`` and ``layers`` (the activations keep ``rules``' layout) -- e.g. ``{heads: tensor,
    kv: tensor, mlp: tensor, vocab: tensor}``, no ``embed`` over ``fsdp``, so the FSDP shards
    are gathered once per sampling round rather than by every decode step; the phases that
    sample (online, iterative DPO, label, evaluate) place the policy so before each round and
    log the seconds and the bytes per device.

    ``preflight``: before it loads any weight a run plans its programs on its own devices
    (``rlhf_jax.plan.preflight``) and refuses a config that cannot fit ``device_memory_gb``
    per device (None: what the device reports; a CPU reports none, so there is no check)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, str | None] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    frozen_rules: dict[str, str | None] | None = None
    sampler_rules: dict[str, str | None] | None = None
    preflight: bool = True
    device_memory_gb: float | None = None

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, value in sizes.items():
            if value != -1 and value < 1:
                raise ValueError(f"{name}={value!r} is out of range; valid: >= 1, or -1 for the remaining devices")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"at most one axis may be -1 (the remaining devices); got {sizes}")
        greater_than(0, device_memory_gb=self.device_memory_gb)
        check_rules(self.rules, what="rules")
        for what in ("frozen_rules", "sampler_rules"):
            if getattr(self, what) is not None:
                check_rules(getattr(self, what), what=what)
        if self.sampler_rules is not None:  # the decoder's activations follow mesh.rules while it samples
            moved = sorted(axis for axis in ("vocab", "heads", "kv", "mlp")
                           if self.sampler_rules.get(axis) != self.rules.get(axis))
            if moved:
                as_in = ", ".join(f"{axis}: {self.rules.get(axis)}" for axis in moved)
                raise ConfigError(f"sampler_rules: {', '.join(moved)} must map as in rules ({as_in}; the activations keep "
                                  "that layout while sampling; a different one would be resharded at every decode "
                                  "step); only embed and layers may differ")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    data: DataConfig
    output_dir: str = "runs/phase"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    metrics: MetricsConfig = MetricsConfig()


@dataclasses.dataclass(frozen=True)
class SFTConfig(PhaseConfig):
    pass


@dataclasses.dataclass(frozen=True)
class PRMConfig(PhaseConfig):
    """A process reward model (``rlhf-jax prm``): the common sections only."""


@dataclasses.dataclass(frozen=True)
class RMOptions:
    center_coef: float = 0.0  # auxiliary (r_c + r_r)^2 term that keeps rewards centred
    ranking_loss: Literal["all_pairs", "plackett_luce"] = "all_pairs"  # for the ranking format

    def __post_init__(self):
        at_least(0, center_coef=self.center_coef)


@dataclasses.dataclass(frozen=True)
class RMConfig(PhaseConfig):
    rm: RMOptions = RMOptions()


@dataclasses.dataclass(frozen=True)
class DPOOptions:
    beta: float = 0.1
    loss_type: DPOLossType = "sigmoid"
    label_smoothing: float = 0.0
    reference: str | None = None  # reference checkpoint; None: the starting policy itself
    # on_the_fly: the reference's log-probs in each step's program; precompute: one pass over the
    # training and held-out pairs before step 0, cached in <output_dir>/reference_logps.npz (reused
    # on --resume), after which the reference model leaves memory
    reference_logps: Literal["on_the_fly", "precompute"] = "on_the_fly"
    # true: each response's log-prob divided by its tokens (policy and reference alike) -- IPO as
    # TRL and OpenRLHF compute it; false: the summed sequence log-probs of the papers
    average_logps: bool = False

    def __post_init__(self):
        greater_than(0, beta=self.beta)
        between(0, 0.5, label_smoothing=self.label_smoothing, open_high=True)


@dataclasses.dataclass(frozen=True)
class DPOConfig(PhaseConfig):
    dpo: DPOOptions = DPOOptions()


@dataclasses.dataclass(frozen=True)
class KTOOptions:
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D; the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3]
    undesirable_weight: float = 1.0  # lambda_U
    reference: str | None = None  # reference checkpoint; None: the starting policy itself
    reference_logps: Literal["on_the_fly", "precompute"] = "on_the_fly"  # as dpo.reference_logps

    def __post_init__(self):
        greater_than(0, beta=self.beta, desirable_weight=self.desirable_weight,
                     undesirable_weight=self.undesirable_weight)


@dataclasses.dataclass(frozen=True)
class KTOConfig(PhaseConfig):
    kto: KTOOptions = KTOOptions()


@dataclasses.dataclass(frozen=True)
class SimPOOptions:
    beta: float = 2.0  # scale of the length-normalised log-prob (the implicit reward)
    gamma: float = 1.0  # the target reward margin (TRL's gamma_beta_ratio times beta)
    label_smoothing: float = 0.0

    def __post_init__(self):
        greater_than(0, beta=self.beta)
        at_least(0, gamma=self.gamma)
        between(0, 0.5, label_smoothing=self.label_smoothing, open_high=True)


@dataclasses.dataclass(frozen=True)
class SimPOConfig(PhaseConfig):
    simpo: SimPOOptions = SimPOOptions()


@dataclasses.dataclass(frozen=True)
class ORPOOptions:
    lam: float = 0.1  # weight of the odds-ratio term beside the chosen responses' NLL

    def __post_init__(self):
        at_least(0, lam=self.lam)


@dataclasses.dataclass(frozen=True)
class ORPOConfig(PhaseConfig):
    orpo: ORPOOptions = ORPOOptions()
