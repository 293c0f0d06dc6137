"""Typed, frozen configs from YAML: unknown keys, wrong types and missing values are errors
that name the key and the valid choices; ``key=value`` overrides from the command line."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config that cannot be turned into its dataclass; the message names the key."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        types_ = typing.get_args(annotation)
        if types_:
            return {_coerce(k, types_[0], f"{key} key"): _coerce(v, types_[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item = typing.get_args(annotation)[0] if typing.get_args(annotation) else typing.Any
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: type[C], mapping: dict[str, Any], *, prefix: str = "") -> C:
    """Build the frozen dataclass ``cls`` from ``mapping``, checking every key and type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys are: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, field in fields.items():
        if name in mapping:
            values[name] = _coerce(mapping[name], hints[name], prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{prefix}{name}'")
    try:
        return cls(**values)
    except ValueError as error:  # a dataclass's own check (__post_init__)
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. seed=3)")
    key, raw = text.split("=", 1)
    return key.split("."), yaml.safe_load(raw)


def load_mapping(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """The raw mapping of ``path`` (YAML, via ``yaml.safe_load``; empty when None) with the
    ``key=value`` overrides applied (values parsed as YAML scalars)."""
    mapping: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        mapping = loaded or {}
    for text in overrides:
        keys, value = _parse_override(text)
        node = mapping
        for part in keys[:-1]:
            node = node.setdefault(part, {})
        node[keys[-1]] = value
    return mapping


def load(cls: type[C], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> C:
    """:func:`load_mapping`, then build ``cls`` from it."""
    return from_dict(cls, load_mapping(path, overrides))
