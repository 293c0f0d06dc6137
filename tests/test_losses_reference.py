"""Losses against independent float64 torch code written here from the papers' formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rlhf_jax import losses

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

torch = pytest.importorskip("torch", reason="reference tests need the `parity` extra (CPU torch)")
F = torch.nn.functional

B, T = 8, 6
rng = np.random.default_rng(0)


def t(x):
    return torch.as_tensor(np.asarray(x, np.float64))


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def pair_logps():
    return [rng.normal(-20, 4, size=B) for _ in range(4)]


@pytest.mark.parametrize(
    "loss_type, eps",
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)],
)
def test_dpo_family_matches_torch(loss_type, eps):
    pc, pr, rc, rr = pair_logps()
    beta = 0.3
    h = (t(pc) - t(rc)) - (t(pr) - t(rr))
    if loss_type == "sigmoid":
        expected = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        expected = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        expected = (h - 1 / (2 * beta)) ** 2
    else:
        expected = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    loss, aux = losses.dpo_loss(
        *map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    assert float(loss) == pytest.approx(expected.mean().item(), rel=1e-10)
    chosen = beta * (t(pc) - t(rc))
    rejected = beta * (t(pr) - t(rr))
    assert float(aux.chosen_reward) == pytest.approx(chosen.mean().item(), rel=1e-10)
    assert float(aux.reward_accuracy) == pytest.approx((chosen > rejected).double().mean().item())


def test_dpo_is_log2_when_policy_equals_reference():
    pc, pr, _, _ = pair_logps()
    loss, _ = losses.dpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(pr))
    assert float(loss) == pytest.approx(math.log(2), rel=1e-12)


def test_simpo_matches_torch():
    pc, pr, _, _ = pair_logps()
    lc, lr = rng.integers(1, 30, size=B), rng.integers(1, 30, size=B)
    beta, gamma = 2.0, 1.2
    expected = -F.logsigmoid(beta * t(pc) / t(lc) - beta * t(pr) / t(lr) - gamma).mean()
    loss, _ = losses.simpo_loss(*map(jnp.asarray, (pc, pr, lc, lr)), beta=beta, gamma=gamma)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-10)


def test_orpo_matches_torch():
    lc, lr = rng.integers(1, 30, size=B), rng.integers(1, 30, size=B)
    pc, pr = -rng.uniform(0.01, 3, size=B) * lc, -rng.uniform(0.01, 3, size=B) * lr
    mc, mr = t(pc) / t(lc), t(pr) / t(lr)
    log_odds = (mc - torch.log(1 - torch.exp(mc))) - (mr - torch.log(1 - torch.exp(mr)))
    nll = -t(pc).sum() / t(lc).sum()
    expected = nll - 0.25 * F.logsigmoid(log_odds).mean()
    loss, aux = losses.orpo_loss(*map(jnp.asarray, (pc, pr, lc, lr)), lam=0.25)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-10)
    assert float(aux.nll) == pytest.approx(nll.item(), rel=1e-10)


def test_kto_matches_torch():
    policy, ref = rng.normal(-20, 3, size=B), rng.normal(-20, 3, size=B)
    desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    z0 = 0.4
    r = t(policy) - t(ref)
    d = torch.as_tensor(desirable, dtype=torch.bool)
    expected = torch.where(d, 1.0 * (1 - torch.sigmoid(0.1 * (r - z0))), 1.5 * (1 - torch.sigmoid(0.1 * (z0 - r))))
    loss, _ = losses.kto_loss(
        jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(desirable), z0, beta=0.1, undesirable_weight=1.5
    )
    assert float(loss) == pytest.approx(expected.mean().item(), rel=1e-10)
    mismatched_kl = float(losses.kto_reference_point(jnp.asarray(policy), jnp.asarray(ref)))
    assert mismatched_kl == pytest.approx(max(0.0, r.mean().item()), rel=1e-10)


def test_bradley_terry_with_margin_matches_torch():
    rc, rr, m = rng.normal(size=B), rng.normal(size=B), rng.uniform(0, 1, size=B)
    expected = -F.logsigmoid(t(rc) - t(rr) - t(m)).mean() + 0.01 * ((t(rc) + t(rr)) ** 2).mean()
    loss, aux = losses.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), margin_B=jnp.asarray(m), center_coef=0.01)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-10)
    assert float(aux.accuracy) == pytest.approx(float(np.mean(rc > rr)))


def test_ranking_losses_match_torch_loops():
    rewards = rng.normal(size=(4, 5))
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
    all_pairs, plackett_luce = [], []
    for b in range(4):
        r = t(rewards[b, : valid[b].sum()])
        k = len(r)
        pairs = [-F.logsigmoid(r[i] - r[j]) for i in range(k) for j in range(i + 1, k)]
        all_pairs.append(torch.stack(pairs).mean())
        plackett_luce.append(-sum(r[i] - torch.logsumexp(r[i:], 0) for i in range(k)))
    for kind, expected in [("all_pairs", all_pairs), ("plackett_luce", plackett_luce)]:
        loss, _ = losses.ranking_loss(jnp.asarray(rewards), valid_BK=jnp.asarray(valid), kind=kind)
        assert float(loss) == pytest.approx(torch.stack(expected).mean().item(), rel=1e-10), kind


def test_two_way_ranking_is_bradley_terry():
    rewards = rng.normal(size=(B, 2))
    bt, _ = losses.bradley_terry_loss(jnp.asarray(rewards[:, 0]), jnp.asarray(rewards[:, 1]))
    for kind in ("all_pairs", "plackett_luce"):
        loss, _ = losses.ranking_loss(jnp.asarray(rewards), kind=kind)
        assert float(loss) == pytest.approx(float(bt), rel=1e-12)


def token_batch():
    mask = np.arange(T)[None, :] < rng.integers(1, T + 1, size=B)[:, None]
    logp = rng.normal(-2, 0.5, size=(B, T))
    old = logp + rng.normal(0, 0.3, size=(B, T))
    adv = rng.normal(size=(B, T))
    return logp, old, adv, mask


@pytest.mark.parametrize("dual_clip, eps_high", [(None, None), (3.0, None), (None, 0.28)])
def test_ppo_policy_loss_matches_torch(dual_clip, eps_high):
    logp, old, adv, mask = token_batch()
    eps_low = 0.2
    ratio = torch.exp(t(logp) - t(old))
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + (eps_high or eps_low))
    objective = torch.minimum(ratio * t(adv), clipped * t(adv))
    if dual_clip:
        objective = torch.where(t(adv) < 0, torch.maximum(objective, dual_clip * t(adv)), objective)
    m = torch.as_tensor(mask)
    expected = -(objective * m).sum() / m.sum()
    loss, aux = losses.ppo_policy_loss(
        *map(jnp.asarray, (logp, old, adv, mask)), clip_eps=eps_low, clip_eps_high=eps_high, dual_clip=dual_clip
    )
    assert float(loss) == pytest.approx(expected.item(), rel=1e-10)
    log_r = t(logp) - t(old)
    k3 = torch.exp(log_r) - 1 - log_r
    assert float(aux.approx_kl) == pytest.approx(((k3 * m).sum() / m.sum()).item(), rel=1e-10)
    assert float(aux.ratio_max) == pytest.approx(ratio[m].max().item(), rel=1e-12)


def test_ppo_policy_loss_matches_rlax_clipped_surrogate():
    logp, old, adv, _ = token_batch()
    loss, _ = losses.ppo_policy_loss(*map(jnp.asarray, (logp, old, adv)), jnp.ones((B, T), bool), clip_eps=0.2)
    expected = rlax.clipped_surrogate_pg_loss(jnp.exp(jnp.asarray(logp - old)).ravel(), jnp.asarray(adv).ravel(), 0.2)
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)


def test_ppo_value_loss_matches_torch():
    values, old_values, returns, mask = token_batch()
    v, vo, ret = t(values), t(old_values), t(returns)
    v_clip = vo + torch.clamp(v - vo, -0.2, 0.2)
    per_token = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    m = torch.as_tensor(mask)
    loss, _ = losses.ppo_value_loss(*map(jnp.asarray, (values, old_values, returns, mask)), clip_eps=0.2)
    assert float(loss) == pytest.approx(((per_token * m).sum() / m.sum()).item(), rel=1e-10)


def test_grpo_matches_torch_with_sequence_mean_of_token_means():
    logp, old, _, mask = token_batch()
    ref = logp + rng.normal(0, 0.2, size=(B, T))
    adv = rng.normal(size=B)
    ratio = torch.exp(t(logp) - t(old))
    a = t(adv)[:, None]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
    log_r = t(ref) - t(logp)
    k3 = torch.exp(log_r) - log_r - 1
    per_token = -(surrogate - 0.04 * k3)
    m = torch.as_tensor(mask).double()
    expected = ((per_token * m).sum(1) / m.sum(1)).mean()
    loss, _ = losses.grpo_loss(*map(jnp.asarray, (logp, old, ref, adv, mask)), beta=0.04)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-10)


def test_entropy_and_sft_match_torch():
    logits = rng.normal(size=(B, T, 7))
    targets = rng.integers(0, 7, size=(B, T))
    _, _, _, mask = token_batch()
    m = torch.as_tensor(mask).double()
    logp = F.log_softmax(t(logits), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    loss, aux = losses.entropy_bonus(jnp.asarray(logits), jnp.asarray(mask))
    assert float(loss) == pytest.approx(-((entropy * m).sum() / m.sum()).item(), rel=1e-10)
    nll = F.cross_entropy(t(logits).reshape(-1, 7), torch.as_tensor(targets).reshape(-1), reduction="none").reshape(B, T)
    loss, aux = losses.sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert float(loss) == pytest.approx(((nll * m).sum() / m.sum()).item(), rel=1e-10)
    assert float(aux.num_tokens) == mask.sum()


def test_reinforce_with_baseline_matches_torch():
    logp, _, _, mask = token_batch()
    rewards, baseline = rng.normal(size=B), rng.normal(size=B)
    m = torch.as_tensor(mask).double()
    expected = (-(t(rewards) - t(baseline)) * (t(logp) * m).sum(1)).mean()
    loss, _ = losses.reinforce_loss(
        jnp.asarray(logp), jnp.asarray(rewards), jnp.asarray(mask), baseline_B=jnp.asarray(baseline)
    )
    assert float(loss) == pytest.approx(expected.item(), rel=1e-10)
