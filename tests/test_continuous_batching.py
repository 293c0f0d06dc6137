"""The continuous-batching engine against the static one: the same completions (tokens,
log-probs, stops) for the same keys -- greedy and sampled, any slot count, any page size,
with preemption -- and its schedule's counts worked out by hand."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import models, rollout
from rlhf_jax.phases.config import MeshConfig
from rlhf_jax.models.sharding import activation_sharding, place
from rlhf_jax.phases.setup import make_mesh
from rlhf_jax.rollout.continuous import generate_continuous, pages_for
from rlhf_jax.rollout.engine import ContinuousBatching

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

V, EOS = 32, 0
FAMILIES = {
    "llama": {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 64},
    "gemma2": {"model_type": "gemma2", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
               "sliding_window": 4, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
}


@pytest.fixture(scope="module")
def tiny():
    built = {}
    for name, fields in FAMILIES.items():
        hf = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 64} | fields
        built[name] = models.build_model(models.config_from_hf(hf), "lm", rngs=nnx.Rngs(0))
    return built


def prompts(lengths, seed=1):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids, mask = np.zeros((len(lengths), T), np.int32), np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        ids[b, T - n:], mask[b, T - n:] = rng.integers(1, V, size=n), 1
    return ids, mask


def config(temperature=1.0, samples=3, new=12, **sampling):
    return rollout.GenerationConfig(max_new_tokens=new, stop_token_ids=(EOS, 1, 2), pad_token_id=EOS, num_samples=samples,
                                    sampling=rollout.SamplingConfig(temperature=temperature, **sampling),
                                    prompt_buckets=(8, 16))


def assert_same(got, expected):
    for field in ("completion_ids_BN", "completion_mask_BN", "stopped_B", "prompt_ids_BP"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(expected, field)), field)
    np.testing.assert_allclose(np.asarray(got.logprobs_BN), np.asarray(expected.logprobs_BN), atol=2e-5)


CASES = [  # family, sampling, slots, page size, pool pages (0: sized for the slots)
    ("llama", dict(temperature=1.0), 2, 4, 0),
    ("llama", dict(temperature=0.0), 5, 3, 0),
    ("llama", dict(temperature=0.8, top_k=8), 16, 16, 0),
    ("llama", dict(temperature=1.0), 4, 2, 14),  # a small pool: preemption
    ("gpt2", dict(temperature=1.0), 3, 8, 0),
    ("gemma2", dict(temperature=1.0), 3, 1, 0),  # sliding windows and soft-caps over one-token pages
]


@pytest.mark.parametrize(("family", "sampling", "slots", "page_size", "pages"), CASES)
def test_continuous_equals_static(tiny, family, sampling, slots, page_size, pages):
    ids, mask = prompts((7, 3, 1, 5))
    limits = np.random.default_rng(2).integers(1, 13, size=12)  # per-row token limits, and the EOS stops
    base = config(**sampling)
    key = jax.random.key(4)
    expected = rollout.generate(tiny[family], ids, mask, key, base, max_new_tokens_B=limits)
    continuous = dataclasses.replace(base, continuous=ContinuousBatching(slots, page_size, pages))
    got, stats = generate_continuous(tiny[family], ids, mask, key, continuous, max_new_tokens_B=limits)
    assert_same(got, expected)
    lengths = np.asarray(expected.completion_mask_BN).sum(1)
    assert 0 < lengths.min() and (lengths <= limits).all()
    assert np.asarray(expected.stopped_B).any() or sampling["temperature"] == 0  # greedy rows may never stop
    assert stats.prefills >= 4 and stats.peak_pages <= stats.pages
    if pages:
        assert stats.preemptions > 0


def test_one_slot_schedule_is_worked_out_by_hand(tiny):
    """One slot runs the requests one after another: a decode step per generated token, one
    prefill per prompt (its later samples copy its pages: no row holds them any more to share),
    at most one request's pages held."""
    ids, mask = prompts((7, 3))
    c = dataclasses.replace(config(), continuous=ContinuousBatching(slots=1, page_size=4))
    got, stats = generate_continuous(tiny["llama"], ids, mask, jax.random.key(0), c)
    lengths = np.asarray(got.completion_mask_BN).sum(1)
    assert stats.steps == lengths.sum() and stats.prefills == 2 and stats.preemptions == 0
    assert stats.peak_pages == max(pages_for(p + n - 1, 4) for p, n in zip([7] * 3 + [3] * 3, lengths))
    assert stats.pages == pages_for(8 + 12, 4)  # one slot: its longest request (prompt bucket 8 + 12 new)


def test_the_samples_of_a_prompt_share_its_full_pages(tiny):
    """Four greedy samples (the same tokens, so the same lengths n) of an 8-token prompt on
    4-token pages, four slots: the prompt's two pages are held once, each row adds only the
    pages its new tokens fill (the last token is never written): 2 + 4 x (pages(8 + n - 1) - 2),
    where copies would hold 4 x pages(8 + n - 1)."""
    ids, mask = prompts((8,))
    c = dataclasses.replace(config(temperature=0.0, samples=4),
                            continuous=ContinuousBatching(slots=4, page_size=4))
    got, stats = generate_continuous(tiny["llama"], ids, mask, jax.random.key(0), c)
    assert_same(got, rollout.generate(tiny["llama"], ids, mask, jax.random.key(0), config(temperature=0.0, samples=4)))
    (n,) = set(np.asarray(got.completion_mask_BN).sum(1).tolist())
    assert stats.prefills == 1 and stats.peak_pages == 2 + 4 * (pages_for(8 + n - 1, 4) - 2)


def test_generate_dispatches_on_the_config(tiny):
    ids, mask = prompts((5, 2))
    c = config(samples=2)
    expected = rollout.generate(tiny["llama"], ids, mask, jax.random.key(1), c)
    got = rollout.generate(tiny["llama"], ids, mask, jax.random.key(1),
                           dataclasses.replace(c, continuous=ContinuousBatching(slots=3, page_size=4)))
    assert_same(got, expected)


def test_bad_sizes_get_clear_errors(tiny):
    ids, mask = prompts((7, 3))
    small = dataclasses.replace(config(), continuous=ContinuousBatching(slots=2, page_size=4, pages=3))
    with pytest.raises(ValueError, match="cannot hold the longest request .5 pages.; raise rollout.cache_pages"):
        generate_continuous(tiny["llama"], ids, mask, jax.random.key(0), small)
    one_token = dataclasses.replace(config(new=1), continuous=ContinuousBatching(slots=1, page_size=4, pages=2))
    ids8, mask8 = prompts((8,))  # two full pages; admission wants a third for the first new token
    with pytest.raises(ValueError, match="longest request .3 pages."):
        generate_continuous(tiny["llama"], ids8, mask8, jax.random.key(0), one_token)
    fits = dataclasses.replace(one_token, continuous=ContinuousBatching(slots=1, page_size=4, pages=3))
    got, _ = generate_continuous(tiny["llama"], ids8, mask8, jax.random.key(0), fits)
    assert np.asarray(got.completion_mask_BN).sum() == 3  # one token for each of the 3 samples
    with pytest.raises(ValueError, match="slots >= 1"):
        ContinuousBatching(slots=0)
    with pytest.raises(ValueError, match="max_new_tokens_B must be 6 per-row limits"):
        rollout.generate(tiny["llama"], ids, mask, jax.random.key(0), config(), max_new_tokens_B=[13] * 6)


def test_on_a_mesh_equals_one_device(tiny):
    """Parameters placed by the rules on a data x fsdp x tensor mesh, prompt rows over data,
    activations constrained (slots over data, KV heads over tensor): the same completions, the
    rows split as the prompts were."""
    model = tiny["llama"]
    ids, mask = prompts((7, 3, 1, 5))
    c = dataclasses.replace(config(), continuous=ContinuousBatching(slots=4, page_size=4))
    expected, _ = generate_continuous(model, ids, mask, jax.random.key(2), c)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    placed = nnx.merge(nnx.graphdef(model), place(nnx.state(model), mesh))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with activation_sharding(mesh):
        got, _ = generate_continuous(placed, jax.device_put(ids, rows), jax.device_put(mask, rows),
                                     jax.random.key(2), c)
    assert got.completion_ids_BN.sharding.spec[0] == ("data", "fsdp")
    assert_same(got, expected)


def test_online_runs_with_the_continuous_engine_or_a_sampler_layout_train_as_the_plain_sampler(tmp_path, capsys):
    """GRPO for two iterations on a 2x2x2 mesh with ``rollout.engine: continuous`` (3 slots for
    16 rows) on the policy laid out for sampling by ``mesh.sampler_rules`` (no ``embed`` over
    fsdp): the same completions, so the same rewards and losses as the static engine's run in
    the training layout, and the engine's counts and the move logged."""
    import json

    from phase_runs import main_in_process

    def run(name, *extra):
        code, err = main_in_process(capsys, "grpo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path / name}",
                                    "train.iterations=2", "checkpoint.every=100", "checkpoint.export_hf=false",
                                    "metrics.progress=false", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *extra)
        assert code == 0, err
        return [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                if r["kind"].endswith("/train")]

    static = run("static")
    moved = run("moved", "rollout.engine=continuous", "rollout.slots=3", "rollout.page_size=4",
                "mesh.sampler_rules={vocab: tensor, heads: tensor, kv: tensor, mlp: tensor}")
    for a, b in zip(static, moved, strict=True):
        assert a["score_mean"] == b["score_mean"] and a["completion_length"] == b["completion_length"]
        assert abs(a["policy_loss"] - b["policy_loss"]) < 1e-5
        assert b["engine_steps"] >= a["completion_length"] * 16 / 3 and b["cache_pages_peak"] > 0
        assert "sampler_params_gb" not in a and b["sampler_reshard_seconds"] > 0
    # per device in that layout, float32: the 258 x 64 embedding and head, and per layer q, o (64 x 64), k, v
    # (64 x 32), gate, up, down (64 x 128) halved over tensor; the two norms per layer and the final one whole
    split, whole = 2 * 258 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128), 2 * 2 * 64 + 64
    assert moved[0]["sampler_params_gb"] * 1e9 == pytest.approx(4 * (split // 2 + whole), abs=1e-3)


def test_the_page_pool_splits_its_kv_heads_over_tensor(tiny):
    """The compiled program's per-device temporaries on data=4 x tensor=2 against data=8: the
    pool (here most of them) holds half its KV heads per device -- XLA carries the attention's
    head sharding to the pages it reads."""
    from rlhf_jax.rollout.continuous import compiled_program, program_plan
    from rlhf_jax.rollout.engine import prepare_prompts

    model = tiny["llama"]  # 2 KV heads
    c = dataclasses.replace(config(), continuous=ContinuousBatching(slots=2, page_size=4, pages=4096))
    ids, mask, index, limit = prepare_prompts(model, *prompts((7, 3)), c)
    temps = {}
    for tensor in (1, 2):
        mesh = make_mesh(MeshConfig(data=8 // tensor, fsdp=1, tensor=tensor))
        placed = nnx.merge(nnx.graphdef(model), place(nnx.state(model), mesh))
        graphdef, params = nnx.split(placed)
        replicated = NamedSharding(mesh, PartitionSpec())
        with activation_sharding(mesh):
            lowered = compiled_program.lower(graphdef, params, *(jax.device_put(a, replicated) for a in (ids, mask)),
                                             jax.random.key(0), *(jax.device_put(a, replicated) for a in (index, limit)),
                                             c, program_plan(c, ids.shape[1], model.config))
        temps[tensor] = lowered.compile().memory_analysis().temp_size_in_bytes
    pool = 2 * 2 * 2 * 4096 * 4 * 8 * 4  # keys and values: layers x KV heads x pages x page size x head dim x fp32
    assert temps[1] - temps[2] >= pool / 2 * 0.9, temps
