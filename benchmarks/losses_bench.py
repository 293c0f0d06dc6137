"""GAE and the PPO update's loss+gradient: rlhf_jax (jitted) against torch written the way
the torch RLHF stacks write it (TRL's reversed Python loop for GAE; eager torch losses),
side by side in one process. Prints the median of several repeats and the ratio.

    python benchmarks/losses_bench.py [--batch 64] [--length 256] [--repeats 20]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench_common import median_seconds, parse_args

from rlhf_jax import advantages, losses


def torch_gae(rewards, values, mask, gamma, lam):
    """The reversed Python loop used by TRL's PPO trainer (padding handled by the mask)."""
    last_gae = torch.zeros(rewards.shape[0])
    reversed_adv = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] * mask[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = (delta + gamma * lam * last_gae * (mask[:, t + 1] if t < length - 1 else 0.0)) * mask[:, t]
        reversed_adv.append(last_gae)
    adv = torch.stack(reversed_adv[::-1], dim=1)
    return adv, adv + values


def torch_ppo_loss(logp, old_logp, adv, values, old_values, returns, mask, eps=0.2):
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-ratio * adv, -torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    v_clip = old_values + torch.clamp(values - old_values, -eps, eps)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
    return ((pg + 0.5 * vf) * mask).sum() / mask.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parse_args(parser, smoke={"batch": 4, "length": 16, "repeats": 1})
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rng = np.random.default_rng(0)
    shape = (args.batch, args.length)
    lengths = rng.integers(args.length // 4, args.length + 1, size=args.batch)
    mask = (np.arange(args.length)[None, :] < lengths[:, None]).astype(np.float32)
    rewards, values, old_values, logp, noise = (rng.normal(size=shape).astype(np.float32) for _ in range(5))
    old_logp = logp + 0.1 * noise

    j = {k: jnp.asarray(v) for k, v in dict(r=rewards, v=values, ov=old_values, lp=logp, olp=old_logp, m=mask).items()}
    t = {k: torch.tensor(np.array(v)) for k, v in j.items()}

    gae_jit = jax.jit(lambda r, v, m: advantages.gae(r, v, m, gamma=1.0, lam=0.95))

    def jax_gae():
        jax.block_until_ready(gae_jit(j["r"], j["v"], j["m"]))

    def ours_loss(lp, vals, olp, ov, adv, ret, m):
        pg, _ = losses.ppo_policy_loss(lp, olp, adv, m)
        vf, _ = losses.ppo_value_loss(vals, ov, ret, m)
        return pg + 0.5 * vf

    grad_jit = jax.jit(jax.grad(ours_loss, argnums=(0, 1)))
    adv_j, ret_j = gae_jit(j["r"], j["v"], j["m"])

    def jax_update():
        jax.block_until_ready(grad_jit(j["lp"], j["v"], j["olp"], j["ov"], adv_j, ret_j, j["m"]))

    adv_t, ret_t = torch_gae(t["r"], t["v"], t["m"], 1.0, 0.95)
    # Same convention check before timing: both sides compute the same advantages.
    np.testing.assert_allclose(np.asarray(adv_j), adv_t.numpy(), atol=1e-3)

    def torch_update():
        lp = t["lp"].clone().requires_grad_(True)
        vals = t["v"].clone().requires_grad_(True)
        torch_ppo_loss(lp, t["olp"], adv_t, vals, t["ov"], ret_t, t["m"]).backward()

    def timed(fn):
        return median_seconds(fn, args.repeats, warm_up=True)

    rows = [
        ("GAE", timed(lambda: torch_gae(t["r"], t["v"], t["m"], 1.0, 0.95)), timed(jax_gae)),
        ("PPO loss + grad", timed(torch_update), timed(jax_update)),
    ]
    print(f"batch {args.batch}, length {args.length}, median of {args.repeats}, device {jax.devices()[0].platform}")
    print("| | torch (ms) | rlhf_jax (ms) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, torch_s, jax_s in rows:
        print(f"| {name} | {1e3 * torch_s:.3f} | {1e3 * jax_s:.3f} | {torch_s / jax_s:.1f}x |")


if __name__ == "__main__":
    main()
