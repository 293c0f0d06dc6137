"""The config of the online phases (PPO, GRPO, RLOO, REINFORCE, RAFT): YAML -> frozen
dataclasses, with the offline phases' ``model``, ``tokenizer``, ``data`` (prompts),
``checkpoint``, ``mesh`` and ``metrics`` sections plus ``reward``, ``kl``, ``rollout``,
``train`` and one section per algorithm (``ppo``, ``grpo``, ``rloo``, ``reinforce``, ``raft``,
``trpo``),
of which the run reads the chosen algorithm's."""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal

from rlhf_jax.config import OneOf, at_least, between, greater_than
from rlhf_jax.data import DataConfig
from rlhf_jax.kl import KLKind
from rlhf_jax.metrics import MetricsConfig
from rlhf_jax.phases.config import CheckpointConfig, MeshConfig, ModelConfig, TokenizerConfig
from rlhf_jax.rl import CriticFreeConfig, GRPOConfig, PPOConfig, TRPOConfig
from rlhf_jax.train.optim import OptimizerConfig


def _algorithm_names() -> list[str]:
    from rlhf_jax.phases.algorithms import ALGORITHMS  # the registry (which imports this module)

    return list(ALGORITHMS)


Algorithm = Annotated[str, OneOf(_algorithm_names)]  # a name of phases.algorithms.ALGORITHMS, plugins included


@dataclasses.dataclass(frozen=True)
class RewardSource:
    """One named objective of a multi-objective reward (``reward.sources``): a reward model or a
    Python function, its weight, and whether its scores are whitened over the batch before
    weighting (so objectives of different scales weigh as their weights say)."""

    name: str  # logged as reward_<name>: the mean of its raw scores
    model: str | None = None  # reward-model checkpoint (as reward.model)
    function: str | None = None  # or a function (as reward.function)
    weight: float = 1.0
    whiten: bool = False
    tokenizer: str | None = None  # the model's tokenizer, as reward.tokenizer
    pad_token: str | None = None
    max_length: int = 512
    max_prompt_length: int | None = None

    def __post_init__(self):
        if (self.model is None) == (self.function is None):
            raise ValueError(f"reward source {self.name!r}: give exactly one of model or function")
        model_only = [f.name for f in dataclasses.fields(self) if f.name in ("tokenizer", "pad_token", "max_length",
                                                                              "max_prompt_length")
                      and getattr(self, f.name) != f.default]
        if self.function is not None and model_only:
            raise ValueError(f"reward source {self.name!r}: {model_only[0]} has no effect on a function source (it "
                             "reads text); remove it")
        at_least(2, max_length=self.max_length)
        at_least(1, max_prompt_length=self.max_prompt_length)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """One or both of a reward model and a Python function (with both, the weighted sum); or
    any number of named ``sources`` (multi-objective: each weighted, optionally whitened, and
    logged on its own)."""

    model: str | None = None  # reward-model checkpoint (score head), e.g. the rm phase's <output_dir>/hf
    tokenizer: str | None = None  # its tokenizer; None: the checkpoint directory's own, else the policy's
    pad_token: str | None = None  # the fix when that tokenizer has no pad token: "eos" or a token text
    function: str | None = None  # "package.module:function" of (prompt, completion) -> float, or builtin:NAME
    model_weight: float = 1.0
    function_weight: float = 1.0
    max_length: int = 512  # reward-model input length (prompt + completion under its tokenizer)
    max_prompt_length: int | None = None  # cap on the prompt's tokens there (cut from the left; counted)
    on_error: Literal["error", "penalty"] = "error"  # a function that raises / returns NaN for a sample
    penalty: float = -1.0  # the score such a sample gets with on_error: penalty (counted)
    missing_eos_penalty: float | None = None  # subtracted when a completion hits max_new_tokens
    # DAPO's soft overlong punishment: 0 up to rollout.max_new_tokens - overlong_buffer tokens, then
    # falling linearly to -1 at max_new_tokens (Yu et al., 2025, eq. 13); None: off
    overlong_buffer: int | None = None
    whiten: bool = False  # whiten scores over the batch
    clip: float | None = None  # clip scores to [-clip, clip]
    sources: tuple[RewardSource, ...] = ()  # named objectives instead of model / function
    # a process reward model (rlhf-jax prm's <output_dir>/hf) on the policy's tokenizer: at each
    # reasoning step's end (a newline; the last token) process_weight * (sigmoid(z) - 1/2) more
    # reward, credited by GAE (rl.process_rewards; ppo, trpo)
    process_model: str | None = None
    process_weight: float = 1.0
    # a function scored on every training and held-out batch and logged (monitor_score_mean), never
    # optimised: e.g. a task's gold reward beside the reward model it trains on (Gao et al., 2022)
    monitor: str | None = None

    def __post_init__(self):
        if self.sources and (self.model is not None or self.function is not None):
            raise ValueError("give reward.model / reward.function or reward.sources, not both (a source can be "
                             "either)")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"reward.sources: names must differ, got {names}")
        at_least(2, max_length=self.max_length)
        at_least(1, max_prompt_length=self.max_prompt_length, overlong_buffer=self.overlong_buffer)
        greater_than(0, clip=self.clip)


@dataclasses.dataclass(frozen=True)
class AIJudgeConfig:
    """An AI judge (``rl.judge``): a causal LM comparing two completions under a principle."""

    model: str  # a causal-LM checkpoint directory or .gguf file
    principle: str  # a text file: the principle (constitution) the judge compares by
    tokenizer: str | None = None  # None: the checkpoint's own
    pad_token: str | None = None  # the fix when that tokenizer has no pad token: "eos" or a token text
    max_length: int = 1024  # tokens of a judge input (principle, prompt, both responses)
    batch_size: int = 16

    def __post_init__(self):
        at_least(16, max_length=self.max_length)
        at_least(1, batch_size=self.batch_size)


@dataclasses.dataclass(frozen=True)
class KLConfig:
    beta: float = 0.05  # KL coefficient (initial value with a target)
    kind: KLKind = "k1"  # per-token estimator in the reward (the loss term is always k3)
    in_loss: bool | None = None  # KL as a beta-weighted k3 loss term instead of a reward penalty; None: GRPO only
    target: float | None = None  # nats per completion: the adaptive controller (Ziegler et al., 2019)
    horizon: float = 10000.0  # the adaptive controller's horizon, in samples

    def __post_init__(self):
        at_least(0, beta=self.beta)
        greater_than(0, target=self.target, horizon=self.horizon)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts: int = 8  # prompts per iteration
    samples: int = 1  # completions per prompt: the group of GRPO / RLOO, the N of RAFT's best-of-N
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    completion_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    # DAPO's dynamic sampling (rl.dynamic_sampling): drop groups whose scores are all equal and
    # sample more prompts until the batch is full, at most max_sampling_rounds draws an iteration
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    # multi-turn episodes (rl.multi_turn): a text environment -- builtin:calculator or
    # package.module:Factory -- answers the policy's tool calls; max_new_tokens bounds each turn
    environment: str | None = None
    max_turns: int = 4
    # the generation engine (rollout.engine): static decodes each batch to its longest row;
    # continuous keeps `slots` rows decoding over a pool of `cache_pages` KV pages of
    # `page_size` tokens (0: enough for every slot's longest request), a finished row's slot
    # taking the next request -- the same completions, less idle decoding; the decode attention
    # over the pages: gather (XLA, any platform), pallas (the TPU kernel), auto (pallas on a TPU)
    engine: Literal["static", "continuous"] = "static"
    slots: int = 16
    page_size: int = 16
    cache_pages: int = 0
    paged_attention: Literal["auto", "gather", "pallas"] = "auto"
    # asynchronous rollouts: iteration i trains on a batch the policy of iteration i - k sampled
    # (k = min(i, max_policy_lag)), so the next batch is drawn before this update is awaited;
    # 0 samples with the policy being trained (on-policy)
    max_policy_lag: int = 0

    def __post_init__(self):
        at_least(1, prompts=self.prompts, samples=self.samples, max_new_tokens=self.max_new_tokens,
                 max_sampling_rounds=self.max_sampling_rounds, max_turns=self.max_turns, slots=self.slots,
                 page_size=self.page_size)
        at_least(0, temperature=self.temperature, top_k=self.top_k, cache_pages=self.cache_pages,
                 max_policy_lag=self.max_policy_lag)
        between(0, 1, min_p=self.min_p, open_high=True)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is out of range; valid: (0, 1]")
        if not self.completion_buckets or min(self.completion_buckets) < 1:
            raise ValueError(f"completion_buckets={list(self.completion_buckets)} must be lengths >= 1")


@dataclasses.dataclass(frozen=True)
class RAFTSection:
    """RAFT (Dong et al., 2023): the SFT loss on the best of each prompt's samples."""

    epochs: int = 4
    minibatches: int = 1

    def __post_init__(self):
        at_least(1, epochs=self.epochs, minibatches=self.minibatches)


@dataclasses.dataclass(frozen=True)
class OnlineTrainConfig:
    iterations: int = 100
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)  # policy
    critic_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)  # PPO's critic
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    eval_prompts: int = 64  # held-out prompts scored at each evaluation (data.eval_size / eval_source)
    eval_samples: int = 4  # best-of-N at evaluation: the best of this many samples is also reported
    max_nonfinite: int = 10  # this many non-finite (skipped) updates in a row stop the run (exit 1)

    def __post_init__(self):
        at_least(1, iterations=self.iterations, log_every=self.log_every, eval_prompts=self.eval_prompts,
                 eval_samples=self.eval_samples, max_nonfinite=self.max_nonfinite)
        at_least(0, eval_every=self.eval_every)


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    data: DataConfig  # the prompts: format prompt, or any format with a prompt field
    algorithm: Algorithm = "ppo"
    output_dir: str = "runs/ppo"
    seed: int = 0
    model: ModelConfig = ModelConfig()  # the policy, and the frozen reference (same weights, no LoRA)
    critic: ModelConfig | None = None  # PPO; None: initialised from reward.model, else from the policy
    tokenizer: TokenizerConfig = TokenizerConfig()
    reward: RewardConfig = RewardConfig()
    kl: KLConfig = KLConfig()
    rollout: RolloutConfig = RolloutConfig()
    # one section per algorithm (phases.algorithms): only the chosen algorithm's is read
    # each algorithm's own config (rlhf_jax.rl), the section its update reads
    ppo: PPOConfig = PPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    rloo: CriticFreeConfig = CriticFreeConfig()  # RLOO (Ahmadian et al., 2024): the leave-one-out baseline
    reinforce: CriticFreeConfig = CriticFreeConfig()  # REINFORCE with the batch-mean baseline
    raft: RAFTSection = RAFTSection()
    trpo: TRPOConfig = TRPOConfig()
    train: OnlineTrainConfig = OnlineTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    metrics: MetricsConfig = MetricsConfig()

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "update": "its options moved to the section of each algorithm (ppo:, grpo:, rloo:, reinforce:, raft:); "
                  "rename update: to the algorithm you run"}
