"""Model families: one record per family -- how its ``config.json`` maps onto this library's
config, its checkpoint tensor names, its transformers class names, its default head and
whether it loads from GGUF -- and the registry every loader, exporter and config check reads.

A new family is one module that builds a :class:`Family` and calls :func:`register_family`
(the built-in ones: :mod:`.llama`, :mod:`.gemma`, :mod:`.gpt2`, :mod:`.bert`); nothing
else in the package names a ``model_type``. Outside the package, a module named by the
``RLHF_JAX_PLUGINS`` environment variable registers its family the same way
(:mod:`rlhf_jax.plugins`)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping

from rlhf_jax.models.config import DecoderConfig, EncoderConfig
from rlhf_jax.models.disk_cache import cached_json, package_dir
from rlhf_jax.models.hf_names import HEADS, TensorName


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything the package knows about one model family.

    ``class_prefixes``: ``model_type`` -> the transformers class prefix (``"Llama"``) each type
    this family reads; ``config_from_hf`` maps a config.json dict to a :class:`DecoderConfig`
    (the shared decoder) or :class:`EncoderConfig` (BERT) and raises ``ValueError`` for what it
    cannot represent; ``tensor_names(config, head)`` lists the checkpoint tensors of a model
    with ``head``; ``heads``: the heads it has (the first is loaded by default);
    ``causal_lm_class``: the LM class when it is not ``<prefix>ForCausalLM``; ``gguf``: whether
    transformers' GGUF mapping reads it with llama.cpp's q/k row order."""

    name: str
    class_prefixes: Mapping[str, str]
    config_from_hf: Callable[[dict], DecoderConfig | EncoderConfig]
    tensor_names: Callable[[DecoderConfig | EncoderConfig, str], list[TensorName]]
    heads: tuple[str, ...] = ("lm", "score")
    causal_lm_class: str | None = None
    gguf: bool = False

    def __post_init__(self):
        if not self.heads or any(head not in HEADS for head in self.heads):
            raise ValueError(f"family {self.name}: heads {self.heads} must be some of {', '.join(HEADS)}")

    def architecture(self, model_type: str, head: str) -> str:
        """The transformers class name of a ``head`` model of ``model_type`` (config.json's
        ``architectures``)."""
        prefix = self.class_prefixes[model_type]
        if head == "score":
            return prefix + "ForSequenceClassification"
        if head == "base":
            return prefix + "Model"
        return self.causal_lm_class or prefix + "ForCausalLM"


FAMILIES: dict[str, Family] = {}  # model_type -> its family


def register_family(family: Family) -> Family:
    """Add ``family`` under each of its model types; returns it. Raises ``ValueError`` for a
    model type another family already reads."""
    for model_type in family.class_prefixes:
        if model_type in FAMILIES and FAMILIES[model_type] is not family:
            raise ValueError(f"model_type {model_type!r} is already read by family {FAMILIES[model_type].name}")
    FAMILIES.update(dict.fromkeys(family.class_prefixes, family))
    return family


def supported_model_types() -> tuple[str, ...]:
    """Every registered ``model_type``, sorted."""
    return tuple(sorted(FAMILIES))


def family_of(model_type: str | None) -> Family:
    """The family reading ``model_type``; ``ValueError`` naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict) -> DecoderConfig | EncoderConfig:
    """Map a Hugging Face config dict to this library's config by its ``model_type``'s family.
    Raises ``ValueError`` for an unsupported type, a missing field or a non-positive size."""
    model_type = hf.get("model_type")
    family = family_of(model_type)
    try:
        return family.config_from_hf(hf)
    except KeyError as missing:
        raise ValueError(f"{model_type} config.json lacks the field {missing}") from None
    except (TypeError, ZeroDivisionError) as error:  # a size that is not a positive number
        raise ValueError(f"{model_type} config: the sizes (hidden_size, num_attention_heads, ...) must be positive "
                         f"integers ({error})") from None


def tensor_names(config: DecoderConfig | EncoderConfig, head: str) -> list[TensorName]:
    """The Hugging Face tensors of a ``head`` model of ``config``'s family and where each goes in
    ours. Raises ``ValueError`` for a head the family has not."""
    if head not in HEADS:
        raise ValueError(f"head {head!r} is not one of {', '.join(HEADS)}")
    family = family_of(config.model_type)
    if head not in family.heads:
        raise ValueError(f"{config.model_type} loads with head={' or head='.join(map(repr, family.heads))}, "
                         f"not {head!r}")
    return family.tensor_names(config, head)


def _config_fields(model_type: str) -> list[str] | None:
    """The config.json fields transformers' config class of ``model_type`` knows (its
    attributes and aliases), or None for a type transformers does not know (a plugin's).
    Kept on disk per transformers version: importing its config classes costs seconds."""
    def read():
        import transformers

        try:
            reference = transformers.AutoConfig.for_model(model_type)
        except ValueError:
            return None
        return sorted(set(reference.to_dict()) | set(getattr(reference, "attribute_map", {})))

    return cached_json(None, f"{model_type}-config-fields.json", read, directory=package_dir("transformers"))


def check_init_fields(init: dict) -> None:
    """``ValueError`` naming the first key of ``init`` (config.json fields of a fresh model) that
    the transformers config of its ``model_type`` does not know, with the closest valid key --
    a misspelt ``hiden_size`` would otherwise be ignored and the default taken."""
    import difflib

    model_type = init.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"init.model_type={model_type!r}; supported: {', '.join(supported_model_types())}")
    fields = _config_fields(model_type)
    if fields is not None:  # a family transformers does not know checks the fields by its own mapping
        known = {*fields, "vocab_size"}
        for key in init:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                raise ValueError(f"init.{key} is not a {model_type} config.json field"
                                 + (f"; did you mean {close[0]!r}?" if close else ""))
    try:  # the values: sizes, head grouping, epsilon (vocab_size comes from the tokenizer when absent)
        config_from_hf({"vocab_size": 2, **init})
    except ValueError as error:
        raise ValueError(f"init: {error}") from None


for _builtin in ("llama", "gemma", "gpt2", "bert"):  # the built-in families register themselves
    importlib.import_module(f"{__name__}.{_builtin}")
