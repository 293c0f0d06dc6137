"""The online algorithms as data: each one's config section, whether it trains a critic or
compares the samples of a prompt, the rows it trains on per iteration, and one compiled
iteration (experience + update + KL controller) -- behind one protocol,
:class:`OnlineAlgorithm`, and one registry, :data:`ALGORITHMS`, which the config check, the
CLI and the pipeline read. No other module compares algorithm names."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import kl, rl
from rlhf_jax.hosts import to_host
from rlhf_jax.models import without_lora
from rlhf_jax.models.pure_jit import pure_jit
from rlhf_jax.phases.online_config import OnlineConfig, RAFTSection
from rlhf_jax.rl.best_of_n import best_in_groups, raft_update
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.train import TrainState


@flax.struct.dataclass
class OnlineState:
    """What the online loop threads and checkpoints whole: the iteration, the policy's and
    (PPO) the critic's train states, the KL controller's state and, when the sampler trails
    the trainer (``rollout.max_policy_lag: k > 0``), the policy's trained parameters at the
    start of each of the last ``k`` iterations, oldest first -- the ones the batches still to
    be trained on were (or, after a resume, are again) sampled with."""

    iteration: jax.Array
    policy: TrainState
    critic: TrainState | None  # PPO only
    kl_controller: kl.KLControllerState  # the KL coefficient (fixed or adaptive) and its state
    policy_penalty: kl.KLControllerState | None = None  # PPO's KL-penalty form: its adaptive coefficient
    sampler_params: tuple[nnx.State, ...] | None = None  # iterations i-k .. i-1 (iteration 0's before the start)

    def lagged(self, lag: int) -> OnlineState:
        """The state of a run whose batches are sampled ``lag`` iterations behind the policy
        they train: ``lag`` copies of the starting parameters (``self`` when ``lag`` is 0)."""
        if lag == 0:
            return self
        return self.replace(sampler_params=tuple(jax.tree.map(jnp.copy, self.policy.params) for _ in range(lag)))

    def advanced(self, **changes) -> OnlineState:
        """The state after one iteration's update (inside the compiled iteration): ``changes``
        applied, the iteration counted and, with a lag, the parameters this update started
        from appended to ``sampler_params`` and the oldest dropped."""
        ring = None if self.sampler_params is None else (*self.sampler_params[1:], self.policy.params)
        return self.replace(iteration=self.iteration + 1, sampler_params=ring, **changes)


@flax.struct.dataclass
class RolloutBatch:
    """A scored rollout as an iteration's update reads it: prompt + completion ids and mask
    ``[B, T]`` (``T = P + N``), the actions (generated tokens, not an environment's replies) and
    the sampler's log-probs on them ``[B, T]``, the shaped scores ``[B]``, the process rewards
    at step ends ``[B, T]`` (None without a process reward model; ppo and trpo only, as
    ``phases.audit`` allows), and the prompt width ``P`` -- a static field, so one compiled
    iteration per prompt bucket."""

    ids_BT: jax.Array
    mask_BT: jax.Array
    action_mask_BT: jax.Array
    sampler_logp_BT: jax.Array
    scores_B: jax.Array
    step_rewards_BT: jax.Array | None = None
    prompt_width: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def of(cls, rollout, scores_B: jax.Array, step_rewards_BT: jax.Array | None = None) -> RolloutBatch:
        """The batch of a sampled ``rollout.Rollout`` and its shaped scores ``[B]``."""
        ids_BT, mask_BT = rollout.sequences()
        return cls(ids_BT, mask_BT, rollout.action_mask(), rollout.sequence_logprobs(), scores_B, step_rewards_BT,
                   prompt_width=rollout.prompt_mask_BP.shape[1])


# ``iteration(state, reference, batch, key) -> (state, metrics)``: one compiled update on a
# scored rollout (the reference None when it is the LoRA policy's own base, or not used)
Iteration = Callable[[OnlineState, Any, RolloutBatch, jax.Array], tuple[OnlineState, dict]]


class OnlineAlgorithm(Protocol):
    """An online algorithm of :data:`ALGORITHMS`. ``section(config)`` is its own config
    section (``config.<name>``); ``make_iteration`` compiles one iteration for a run."""

    name: ClassVar[str]  # the CLI sub-command, the config section and the metrics prefix
    summary: ClassVar[str]  # the CLI's one-line help
    needs_critic: ClassVar[bool]  # PPO: a value model trained beside the policy
    compares_samples: ClassVar[bool]  # needs rollout.samples >= 2 (a group baseline, a best-of-N)
    uses_reference: ClassVar[bool]  # a KL to the frozen reference (kl.* act)
    uses_policy_optimizer: ClassVar[bool]  # train.optimizer steps the policy (TRPO's step is its own)
    kl_in_loss: ClassVar[bool]  # kl.in_loss's default: the KL as a k3 loss term (else in the reward)
    takes_policy_lag: ClassVar[bool]  # can train on an older policy's batches (rollout.max_policy_lag); absent: no

    @property
    def section_key(self) -> str:
        """The name of the config section the algorithm reads (``config.<section_key>``)."""
        ...

    def section(self, config: OnlineConfig) -> Any:
        """The algorithm's config section."""
        ...

    def rows_per_iteration(self, config: OnlineConfig) -> int:
        """The rollout rows one iteration's update trains on."""
        ...

    def init(self, config: OnlineConfig, policy: TrainState, critic: TrainState | None,
             kl_state: kl.KLControllerState) -> OnlineState:
        """The state at iteration 0 (the algorithm's own parts beside policy, critic and KL)."""
        ...

    def make_iteration(self, config: OnlineConfig, policy_tx, critic_tx, controller: kl.KLController) -> Iteration:
        """One iteration, compiled (the state donated), returning ``state.advanced(...)`` -- which
        counts the iteration and keeps the sampler's parameters of a policy lag."""
        ...


def fresh_state(config: OnlineConfig, policy: TrainState, critic: TrainState | None,
                kl_state: kl.KLControllerState) -> OnlineState:
    """The state at iteration 0 of an algorithm with nothing of its own to carry."""
    del config
    return OnlineState(jnp.zeros((), jnp.int32), policy, critic, kl_state)


def mean_metrics(update_metrics: dict) -> dict:
    """Per-minibatch metrics -> one number each (the max for ``*_max``), plus the first
    minibatch's ``first_ratio_max``: 1 when the trainer scores the sampling distribution."""
    means = {k: (jnp.max(v) if k.endswith("_max") else jnp.mean(v.astype(jnp.float32)))
             for k, v in update_metrics.items()}
    return means | ({"first_ratio_max": update_metrics["ratio_max"][0]} if "ratio_max" in update_metrics else {})


def sampling_config(config: OnlineConfig) -> SamplingConfig:
    """The rollout's sampling distribution (``rollout.*``)."""
    r = config.rollout
    return SamplingConfig(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p)


@dataclasses.dataclass(frozen=True)
class PolicyGradient:
    """PPO and the critic-free family: experience from the rollout (log-probs of policy and
    reference, advantages), the clipped-surrogate update, then the KL controller -- one
    jitted call per prompt width."""

    uses_reference: ClassVar[bool] = True
    uses_policy_optimizer: ClassVar[bool] = True
    takes_policy_lag: ClassVar[bool] = True  # the sampler's log-probs reweighted by tis_cap

    init = staticmethod(fresh_state)

    @property
    def section_key(self) -> str:
        """The config section the algorithm reads: its own, ``config.<name>``."""
        return self.name

    def section(self, config: OnlineConfig) -> rl.ClippedUpdateConfig | rl.TRPOConfig:
        """The algorithm's section, ``config.<section_key>``."""
        return getattr(config, self.section_key)

    def rows_per_iteration(self, config: OnlineConfig) -> int:
        """Every sample of every prompt: ``rollout.prompts x rollout.samples``."""
        return config.rollout.prompts * config.rollout.samples

    def resolved_kl_in_loss(self, config: OnlineConfig) -> bool:
        """``kl.in_loss``, or the algorithm's default when unset."""
        return self.kl_in_loss if config.kl.in_loss is None else config.kl.in_loss

    def update(self, state: OnlineState, reference, batch: RolloutBatch, key, *, config: OnlineConfig, policy_tx,
               critic_tx):
        """``(policy, critic, metrics)`` after the algorithm's experience and update."""
        raise NotImplementedError

    def _iteration(self, state: OnlineState, reference, batch: RolloutBatch, key, *, config: OnlineConfig, policy_tx,
                   critic_tx, controller: kl.KLController):
        reference = without_lora(state.policy.model()) if reference is None else reference  # a LoRA policy's base
        policy, critic, metrics = self.update(state, reference, batch, key, config=config, policy_tx=policy_tx,
                                              critic_tx=critic_tx)
        kl_controller = controller.update(state.kl_controller, metrics["kl"], batch.ids_BT.shape[0])
        return state.advanced(policy=policy, critic=critic, kl_controller=kl_controller,
                              policy_penalty=self.next_penalty(config, state.policy_penalty, metrics)), metrics

    def next_penalty(self, config: OnlineConfig, penalty: kl.KLControllerState | None, metrics: dict):
        """The KL-penalty coefficient after an update (PPO's penalty form only)."""
        return penalty

    def make_iteration(self, config: OnlineConfig, policy_tx, critic_tx, controller: kl.KLController) -> Iteration:
        """The compiled iteration (the state donated; one program per prompt width): the run
        calls it, ``rlhf-jax plan`` lowers it."""
        return pure_jit(functools.partial(self._iteration, config=config, policy_tx=policy_tx, critic_tx=critic_tx,
                                         controller=controller), donate_argnums=0)

    def context(self, config: OnlineConfig) -> rl.UpdateContext:
        """What the update reads from outside the algorithm's section: the rollout's sampling
        distribution and samples per prompt, the KL's estimator and place."""
        return rl.UpdateContext(sampling=sampling_config(config), group_size=config.rollout.samples,
                                kl_kind=config.kl.kind, kl_in_loss=self.resolved_kl_in_loss(config))


def forward_micro_batches(section: rl.ClippedUpdateConfig) -> int:
    """The experience's forwards in micro-batches of the update's gradient micro-batch (rows /
    (minibatches x micro_batches)): a config whose update fits holds no more logits and
    activations when it scores the rollout."""
    return section.minibatches * section.micro_batches


@dataclasses.dataclass(frozen=True)
class PPO(PolicyGradient):
    """PPO with a critic and GAE (Ouyang et al., 2022; ``rl.ppo``)."""

    name: ClassVar[str] = "ppo"
    summary: ClassVar[str] = "PPO against a reward model and/or function with a KL penalty (InstructGPT)"
    needs_critic: ClassVar[bool] = True
    compares_samples: ClassVar[bool] = False
    kl_in_loss: ClassVar[bool] = False

    def update(self, state, reference, batch: RolloutBatch, key, *, config, policy_tx, critic_tx):
        """GAE experience with the critic's values (and process rewards at step ends), then the
        PPO update of policy and critic."""
        ppo, context = self.section(config), self.context(config)
        beta = state.kl_controller.beta
        experience, stats = rl.make_experience(state.policy.model(), reference, state.critic.model(), batch.ids_BT,
                                               batch.mask_BT, batch.action_mask_BT, batch.scores_B, beta, ppo,
                                               batch.prompt_width, batch.sampler_logp_BT, batch.step_rewards_BT,
                                               context=context, forward_micro_batches=forward_micro_batches(ppo))
        penalty_beta = 0.0 if state.policy_penalty is None else state.policy_penalty.beta
        policy, critic, metrics = rl.ppo_update(state.policy, state.critic, experience, key, beta, policy_tx,
                                                critic_tx, ppo, penalty_beta, context=context)
        penalty = {} if state.policy_penalty is None else {"penalty_beta": penalty_beta}
        return policy, critic, stats | mean_metrics(metrics) | penalty

    def penalty_controller(self, config: OnlineConfig) -> kl.KLController:
        """The adaptive coefficient of the KL-penalty form (Schulman et al., 2017, sec. 4)."""
        s: rl.PPOConfig = self.section(config)
        return kl.ppo_penalty_kl_controller(s.penalty_beta, s.penalty_target)

    def init(self, config: OnlineConfig, policy: TrainState, critic: TrainState | None,
             kl_state: kl.KLControllerState) -> OnlineState:
        """With ``ppo.surrogate: kl_penalty`` the state carries the penalty's coefficient."""
        penalty = self.penalty_controller(config).init() if self.section(config).surrogate == "kl_penalty" else None
        return OnlineState(jnp.zeros((), jnp.int32), policy, critic, kl_state, penalty)

    def next_penalty(self, config: OnlineConfig, penalty: kl.KLControllerState | None, metrics: dict):
        """The coefficient halved or doubled by the KL(pi_old || pi) the update reached (the
        mean over its minibatches of the k3 estimate, ``approx_kl``)."""
        if penalty is None:
            return None
        return self.penalty_controller(config).update(penalty, metrics["approx_kl"], 1)


@dataclasses.dataclass(frozen=True)
class CriticFree(PolicyGradient):
    """GRPO, RLOO or REINFORCE: a per-completion advantage from the scores of a prompt's
    samples or the batch, no critic (``rl.critic_free``)."""

    name: str
    summary: str
    compares_samples: bool
    kl_in_loss: bool = False
    needs_critic: ClassVar[bool] = False
    estimator: str | None = None  # a name of rl.ESTIMATORS; None: the algorithm's own name
    options: str | None = None  # the section it reads when not its own (an algorithm a plugin adds)

    @property
    def section_key(self) -> str:
        """``options``, or the algorithm's own section."""
        return self.options or self.name

    def __post_init__(self):
        if (self.estimator or self.name) not in rl.ESTIMATORS:
            raise ValueError(f"algorithm {self.name!r}: no advantage estimator named {self.estimator or self.name!r}; "
                             f"register it first (rl.register_estimator) or name one of {', '.join(rl.ESTIMATORS)}")

    @property
    def advantage_estimator(self) -> rl.AdvantageEstimator:
        """Its entry of ``rl.ESTIMATORS``: ``estimator``, or the algorithm's own name."""
        return rl.ESTIMATORS[self.estimator or self.name]

    def update(self, state, reference, batch: RolloutBatch, key, *, config, policy_tx, critic_tx):
        """The estimator's per-completion advantages, then the clipped policy update; no critic."""
        section, context = self.section(config), self.context(config)
        beta = state.kl_controller.beta
        experience, stats = rl.make_group_experience(state.policy.model(), reference, batch.ids_BT, batch.mask_BT,
                                                     batch.action_mask_BT, batch.scores_B, beta, section,
                                                     batch.prompt_width, batch.sampler_logp_BT, context=context,
                                                     estimator=self.advantage_estimator.name,
                                                     forward_micro_batches=forward_micro_batches(section))
        policy, metrics = rl.critic_free_update(state.policy, experience, key, beta, policy_tx, section,
                                                context=context)
        return policy, None, stats | mean_metrics(metrics)


@dataclasses.dataclass(frozen=True)
class TRPO(PolicyGradient):
    """TRPO (Schulman et al., 2015; ``rl.trpo``): PPO's experience, one trust-region step of the
    policy, the critic's regression; the KL to the reference in the reward (or, with
    ``kl.in_loss``, a k3 term of the surrogate)."""

    name: ClassVar[str] = "trpo"
    summary: ClassVar[str] = "TRPO: natural-gradient trust-region steps of the policy, PPO's critic"
    needs_critic: ClassVar[bool] = True
    compares_samples: ClassVar[bool] = False
    uses_policy_optimizer: ClassVar[bool] = False
    kl_in_loss: ClassVar[bool] = False
    takes_policy_lag: ClassVar[bool] = False  # its trust region is around the policy that sampled

    def update(self, state, reference, batch: RolloutBatch, key, *, config, policy_tx, critic_tx):
        """PPO's experience (GAE with the critic, process rewards at step ends), then ``rl.trpo_update``."""
        trpo, context = config.trpo, self.context(config)
        experience, stats = rl.make_experience(state.policy.model(), reference, state.critic.model(), batch.ids_BT,
                                               batch.mask_BT, batch.action_mask_BT, batch.scores_B,
                                               state.kl_controller.beta, trpo, batch.prompt_width,
                                               batch.sampler_logp_BT, batch.step_rewards_BT, context=context)
        policy, critic, metrics = rl.trpo_update(state.policy, state.critic, experience, key, state.kl_controller.beta,
                                                 critic_tx, trpo, context=context)
        return policy, critic, stats | metrics


@dataclasses.dataclass(frozen=True)
class RAFT:
    """RAFT (Dong et al., 2023): the SFT loss on the best of each prompt's samples by the
    shaped score; no ratio, no reference."""

    name: ClassVar[str] = "raft"
    summary: ClassVar[str] = "RAFT / ReST: sample N, keep the best, fine-tune on it, repeat"
    needs_critic: ClassVar[bool] = False
    compares_samples: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = False
    uses_policy_optimizer: ClassVar[bool] = True
    kl_in_loss: ClassVar[bool] = False
    takes_policy_lag: ClassVar[bool] = True  # it fine-tunes on the kept samples, whoever drew them

    section_key: ClassVar[str] = "raft"

    def section(self, config: OnlineConfig) -> RAFTSection:
        """``config.raft``."""
        return config.raft

    init = staticmethod(fresh_state)

    def rows_per_iteration(self, config: OnlineConfig) -> int:
        """One kept completion per prompt."""
        return config.rollout.prompts

    def make_iteration(self, config: OnlineConfig, policy_tx, critic_tx, controller: kl.KLController) -> Iteration:
        """The best of each prompt's samples (host), then the compiled SFT update on them."""
        s = config.raft

        def update(state: OnlineState, ids_BT, mask_BT, action_mask_BT, key):
            policy, metrics = raft_update(state.policy, ids_BT, mask_BT, action_mask_BT, key, policy_tx,
                                          epochs=s.epochs, minibatches=s.minibatches)
            return state.advanced(policy=policy), mean_metrics(metrics)

        jitted = jax.jit(update, donate_argnums=0)

        def iteration(state, reference, batch: RolloutBatch, key):
            del reference  # RAFT has none; nor step rewards: it keeps whole completions (phases.audit)
            best = best_in_groups(np.asarray(to_host(batch.scores_B)), config.rollout.samples)
            return jitted(state, batch.ids_BT[best], batch.mask_BT[best], batch.action_mask_BT[best], key)

        return iteration


ALGORITHMS: dict[str, OnlineAlgorithm] = {}


def register_algorithm(algorithm: OnlineAlgorithm) -> OnlineAlgorithm:
    """Add an online algorithm under its ``name`` -- a CLI command and a value of the config's
    ``algorithm`` -- reading the config section its ``section_key`` names (its own, or a
    built-in one whose options it shares); returns it. Raises ``ValueError`` for a name
    already taken."""
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"an online algorithm named {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


for _algorithm in (
        PPO(),
        CriticFree("grpo", "GRPO: group-relative advantages, k3 KL loss, no critic", compares_samples=True,
                   kl_in_loss=True),
        CriticFree("rloo", "RLOO: REINFORCE with a leave-one-out baseline", compares_samples=True),
        CriticFree("reinforce", "REINFORCE with a batch-mean baseline", compares_samples=False),
        RAFT(), TRPO()):
    register_algorithm(_algorithm)
