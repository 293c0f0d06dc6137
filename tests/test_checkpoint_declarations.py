"""What a checkpoint declares wins over the library's guesses: every EOS id its
generation_config.json lists (or a GGUF file's eos/eot/eom ids) stops sampling in every phase,
as transformers' ``generate`` stops, ``tokenizer.stop_tokens`` adds more, and the export keeps
the list and the rest of the source's generation config."""

import json

import pytest
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.config import ConfigError
from rlhf_jax.models.declared import declared_eos_ids
from rlhf_jax.phases.config import TokenizerConfig
from rlhf_jax.phases.setup import stop_token_ids

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

END, TURN = 2, 4  # the tokenizer's EOS, and the chat end-of-turn token the checkpoint also declares


def turn_tokenizer():
    """Characters and [UNK] 0, [PAD] 1, [END] 2 (EOS), [BOS] 3, [TURN] 4."""
    specials = ["[UNK]", "[PAD]", "[END]", "[BOS]", "[TURN]"]
    chars = "abcdefghijklmnopqrstuvwxyz :\n"
    vocab = {t: i for i, t in enumerate(specials)} | {ch: len(specials) + i for i, ch in enumerate(chars)}
    core = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", eos_token="[END]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def end_of_turn_checkpoint(path):
    """A tiny GPT-2 whose every next token is [TURN] with probability ~1 (the final layer norm
    outputs a constant that only [TURN]'s row of the tied embedding reads), declaring EOS ids
    [TURN, END] in generation_config.json as a chat model does; its tokenizer beside it."""
    from hf_tiny import save_tiny, torch, transformers

    model = save_tiny(path, "gpt2")
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[TURN, 0] = 50.0
    model.generation_config = transformers.GenerationConfig(eos_token_id=[TURN, END], pad_token_id=1, do_sample=True,
                                                          temperature=0.7)
    model.save_pretrained(path, safe_serialization=True)
    turn_tokenizer().save_pretrained(path)
    return model


def test_every_declared_eos_id_stops_transformers_and_our_sampler_alike(tmp_path):
    from hf_tiny import torch

    reference = end_of_turn_checkpoint(tmp_path)
    assert declared_eos_ids(tmp_path) == (TURN, END)
    assert stop_token_ids(turn_tokenizer(), TokenizerConfig(), str(tmp_path)) == (TURN, END)
    torch.manual_seed(0)
    out = reference.generate(torch.tensor([[5, 6, 7]]), do_sample=True, max_new_tokens=8)
    assert out[0, 3:].tolist() == [TURN]  # transformers stops after the end-of-turn token


def test_stop_tokens_add_ids_and_an_unknown_one_is_named(tmp_path):
    tokenizer = turn_tokenizer()
    assert stop_token_ids(tokenizer, TokenizerConfig(stop_tokens=("[TURN]",))) == (END, TURN)
    with pytest.raises(ConfigError, match=r"tokenizer.stop_tokens: '<\|im_end\|>' is not a token"):
        stop_token_ids(tokenizer, TokenizerConfig(stop_tokens=("<|im_end|>",)))


def test_a_gguf_file_declares_its_eos_and_end_of_turn_ids(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    writer.add_eos_token_id(END)
    writer.add_eot_token_id(TURN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert declared_eos_ids(tmp_path / "m.gguf") == (END, TURN)


def test_grpo_stops_at_each_declared_eos_id_and_the_export_keeps_the_list(tmp_path):
    from phase_runs import cli

    end_of_turn_checkpoint(tmp_path / "policy")
    run = cli("grpo", "configs/grpo_tiny.yaml", "model.init=null", f"model.path={tmp_path / 'policy'}",
              "tokenizer.name=null", "train.iterations=1", "train.eval_every=0",
              "rollout.max_new_tokens=8", "metrics.progress=false", f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "eos_rate" in r]
    assert trained and all(r["eos_rate"] == 1.0 and r["completion_length"] == 1.0 for r in trained)
    exported = json.loads((tmp_path / "run" / "hf" / "generation_config.json").read_text())
    assert exported["eos_token_id"] == [TURN, END] and exported["temperature"] == 0.7
    assert declared_eos_ids(tmp_path / "run" / "hf") == (TURN, END)


def test_evaluate_stops_each_side_at_the_declared_end_of_turn(tmp_path):
    from rlhf_jax.config import from_dict
    from rlhf_jax.evaluation.compare import EvaluateConfig, run_evaluate

    end_of_turn_checkpoint(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ("abc", "de", "fgh")))
    config = from_dict(EvaluateConfig, {
        "output_dir": str(tmp_path / "eval"), "policy": {"path": str(tmp_path / "policy")},
        "baseline": {"path": str(tmp_path / "policy")}, "judge": {"function": "builtin:letters"},
        "data": {"source": str(tmp_path / "prompts.jsonl"), "format": "prompt", "max_length": 16},
        "prompts": 3, "batch_size": 3, "max_new_tokens": 8})
    metrics = run_evaluate(config).eval
    assert metrics["length_policy"] == metrics["length_baseline"] == 1.0  # the [TURN] token alone, not 8
