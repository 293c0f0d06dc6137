"""Tokenizers: any Hugging Face tokenizer from a local directory (or the cache), and a
built-in byte-level one (``"builtin:bytes"``) for offline runs with no download.

A tokenizer without a pad token is an error unless the config states the fix:
``pad_token: eos`` pads with EOS (safe here: padding is always masked by the attention
mask, and losses never read it) or ``pad_token: <an existing token>``."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from rlhf_jax.data.report import DataError

BUILTIN_BYTES = "builtin:bytes"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


def vocabulary_digest(tokenizer) -> str:
    """The first 16 hex digits of the SHA-256 of ``tokenizer``'s vocabulary (token -> id, every
    added token included): token ids recorded under one tokenizer are read only by a tokenizer
    with the same digest."""
    import hashlib
    import json

    vocabulary = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode()).hexdigest()[:16]


def has_tokenizer(path: str | Path) -> bool:
    """Whether a checkpoint ``path`` carries its own tokenizer (files beside it, or a GGUF file's metadata)."""
    path = Path(path).expanduser()
    return path.suffix == ".gguf" or any((path / name).exists() for name in TOKENIZER_FILES)
# Roles as plain text, one EOS closing each assistant turn: the loss on a turn teaches the
# policy to stop.
BYTES_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """256 byte tokens (ids 0-255, GPT-2's byte-to-unicode alphabet), then ``<|pad|>`` (256)
    and ``<|endoftext|>`` (257, EOS); a chat template. Any text encodes, nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|pad|>", "<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|endoftext|>")
    tokenizer.chat_template = BYTES_CHAT_TEMPLATE
    tokenizer.name_or_path = BUILTIN_BYTES
    return tokenizer


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest
    to 256 + their rank."""
    code = ord(ch)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def load_tokenizer(name: str, *, pad_token: str | None = None, needs_eos: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer at ``name`` (a local directory, a GGUF file, a cached hub name, or
    ``builtin:bytes``) with a pad token: its own, or the one ``pad_token`` states (``"eos"``
    or a token text). Raises ``DataError`` naming the fix when it cannot be loaded or has no
    pad token, or no EOS token -- which a reward model's encoder tokenizer (``needs_eos``
    False) may lack when it has BERT's [SEP] to end a response on."""
    if name == BUILTIN_BYTES:
        tokenizer = byte_tokenizer()
    elif (name.startswith((".", "/", "~")) or name.endswith(".gguf")) and not Path(name).expanduser().exists():
        raise DataError(f"tokenizer {name} does not exist; give a directory with tokenizer files (a checkpoint's "
                        f"own), a .gguf file, a cached hub name, or {BUILTIN_BYTES!r}")
    elif name.endswith(".gguf"):  # the tokenizer and chat template in the file's metadata
        from transformers import AutoTokenizer

        from rlhf_jax.models.gguf import GGUFError, tokenizer_directory

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_directory(Path(name).expanduser()))
        except GGUFError as error:
            raise DataError(str(error)) from None
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"cannot load tokenizer {name!r} ({cause}). Give a local directory with tokenizer "
                            f"files, or {BUILTIN_BYTES!r}") from None
    if pad_token is not None:
        text = tokenizer.eos_token if pad_token == "eos" else pad_token
        if text is None or tokenizer.convert_tokens_to_ids(text) in (None, tokenizer.unk_token_id):
            raise DataError(f"tokenizer {name!r}: pad_token {pad_token!r} is not a token of its vocabulary")
        tokenizer.pad_token = text
    if tokenizer.pad_token_id is None:
        raise DataError(f"tokenizer {name!r} has no pad token. Set tokenizer.pad_token: eos (pads with EOS; "
                        "padding is always masked out) or name an existing token")
    if tokenizer.eos_token_id is None and (needs_eos or tokenizer.sep_token_id is None):
        raise DataError(f"tokenizer {name!r} has no EOS token; responses need one to end on"
                        + ("" if needs_eos else " (or a [SEP] token, as an encoder's)"))
    # every sequence is cut by this library's stated, counted truncation policy before a model reads
    # it, so transformers' "longer than the specified maximum sequence length" alarm does not apply
    # (marked as given, not by changing model_max_length, which the export would write out)
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def renders_prompts(tokenizer, chat_template: str) -> bool:
    """Whether prompts of the formats with a prompt go through the chat template:
    ``chat_template == "auto"`` and the tokenizer brings its own template (a checkpoint's; the
    built-in byte tokenizer's template serves ``messages`` rows only, its plain prompts stay
    plain text)."""
    return (chat_template == "auto" and getattr(tokenizer, "chat_template", None) is not None
            and tokenizer.name_or_path != BUILTIN_BYTES)


def encode_prompt(tokenizer, text: str, *, templated: bool = False) -> list[int]:
    """Token ids of a prompt, special tokens added once. Text ``templated`` (rendered by a chat
    template, which writes the special tokens it wants) gets none added, as
    ``apply_chat_template(tokenize=True)`` adds none; other text gets the tokenizer's own
    (BOS, or BERT's [CLS] ... [SEP]) -- except a BOS in front of a BOS the text already starts
    with, which is dropped, so a prompt never begins with two."""
    if templated:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids
