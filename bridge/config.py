"""Typed configs: dataclasses filled from YAML files plus `key.sub=value` overrides.

Shared by both tiers (it imports neither JAX nor torch). Every key is checked against
the dataclass: an unknown key or a value of the wrong type fails with a ConfigError that
names the key and where it came from, instead of surfacing later as a confusing crash.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so `on:`/`no:` stay strings."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _parse(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line value: kept as text for str keys (tokens, paths), parsed as YAML otherwise."""

    text: str


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from a YAML file (optional) with `a.b=value` overrides applied on top."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}  # dotted key -> where its value came from
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        raw = _read_file(Path(path), origin, ())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key = key.strip()
        _set_dotted(raw, key, _Override(value.strip()), item)
        origin[key] = f"override {item!r}"
    derive = getattr(cls, "derived_keys", None)
    if derive is None:
        return _build(cls, raw, "", origin, source)
    try:
        facts, defaults, sources = derive(lambda key: _plain(_get_dotted(raw, key)))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{_where(getattr(cls, 'DERIVED_FROM', ''), origin, source)}: {e}") from None
    for key, value in {**defaults, **facts}.items():
        said_by = sources[key]  # where the value comes from, for the origin of a later error
        given = _get_dotted(raw, key)
        if _plain(given) in (None, ""):  # absent, null or empty: derived
            _set_dotted(raw, key, value, key)
            origin[key] = said_by
        elif key in facts:
            ours = _coerce(_hint(cls, key), given, key, origin, source)
            if not _same(ours, value):
                raise ConfigError(f"{_where(key, origin, source)}: '{key}' = {_show(ours)} conflicts with "
                                  f"{said_by}, which says {_show(value)}; drop the key or fix it")
    return _build(cls, raw, "", origin, source)


def _read_file(path: Path, origin: dict[str, str], chain: tuple[Path, ...]) -> dict:
    """One YAML file as a dict; with a top-level `base: FILE` (relative to this file), that file's
    keys first and this file's on top (mappings merged key by key, anything else replaced)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        loaded = _parse(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    raw: dict = {}
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: 'base' must name a config file, got {base!r}")
        base_path = (path.parent / base).resolve()
        if base_path in chain or base_path == path.resolve():
            raise ConfigError(f"{path}: 'base: {base}' includes itself")
        raw = _read_file(base_path, origin, chain + (path.resolve(),))
    _record_origin(loaded, "", str(path), origin)
    _merge(raw, loaded)
    return raw


def _merge(into: dict, top: dict) -> None:
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def from_dict(cls: type[T], raw: dict, source: str, known_only: bool = False) -> T:
    """Build `cls` from a plain dict (e.g. a config saved with a checkpoint); errors name `source`.
    `known_only`: keys this version no longer has are dropped with a warning instead of refused
    (a config an older version saved; a user's file is always checked strictly)."""
    if known_only:
        raw = _known(cls, raw, "", source)
    origin: dict[str, str] = {}
    _record_origin(raw, "", source, origin)
    return _build(cls, raw, "", origin, source)


def _known(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not (dataclasses.is_dataclass(cls) and isinstance(raw, dict)):
        return raw
    hints, out = typing.get_type_hints(cls), {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in raw.items():
        if k in names:
            out[k] = _known(hints[k], v, f"{prefix}{k}.", source)
        else:
            log.warning("%s: key '%s%s' is not known to this version; ignored", source, prefix, k)
    return out


def resolve_secret(value: str) -> str:
    """'env:NAME' -> $NAME (so tokens stay out of YAML files); anything else as is."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"secret refers to ${name}, which is not set")
        if not os.environ[name].strip():  # an empty token would turn auth off while the config asks for it
            raise ValueError(f"secret refers to ${name}, which is empty")
        return os.environ[name]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for logs and JSON reports)."""
    return dataclasses.asdict(cfg)


def _record_origin(node: dict, prefix: str, source: str, origin: dict[str, str]) -> None:
    for k, v in node.items():
        key = f"{prefix}{k}"
        origin[key] = source
        if isinstance(v, dict):
            _record_origin(v, key + ".", source, origin)


def _set_dotted(raw: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _get_dotted(raw: dict, key: str) -> Any:
    node: Any = raw
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _plain(value: Any) -> Any:
    return value.text if isinstance(value, _Override) else value


def _hint(cls: type, key: str) -> Any:
    """The declared type of a dotted key of a config dataclass."""
    tp: Any = cls
    for p in key.split("."):
        tp = typing.get_type_hints(tp)[p]
    return tp


def _same(ours: Any, theirs: Any) -> bool:
    """Equal as config values: floats within a relative 1e-6 (a float32 round trip of 1e-5 is not a
    difference), config objects by their dict form (`to_hf()` where they have one)."""
    if dataclasses.is_dataclass(ours):
        ours = ours.to_hf() if hasattr(ours, "to_hf") else dataclasses.asdict(ours)
    if isinstance(ours, float) or isinstance(theirs, float):
        return isinstance(theirs, (int, float)) and math.isclose(float(ours), float(theirs), rel_tol=1e-6)
    return ours == theirs


def _show(value: Any) -> str:
    return repr(value.to_hf() if hasattr(value, "to_hf") else value)


def _where(key: str, origin: dict[str, str], source: str) -> str:
    # The nearest recorded origin of this key or one of its parents.
    k = key
    while k:
        if k in origin:
            return origin[k]
        k = k.rpartition(".")[0]
    return source


def _build(cls: type, raw: Any, prefix: str, origin: dict[str, str], source: str) -> Any:
    where = _where(prefix.rstrip("."), origin, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping (section {cls.__name__}), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            key = f"{prefix}{k}"
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_where(key, origin, source)}: unknown key '{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], key, origin, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{key}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        section = prefix.rstrip(".") or "<top level>"
        raise ConfigError(f"{where}: invalid section '{section}': {e}") from None


def _coerce(tp: Any, value: Any, key: str, origin: dict[str, str], source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{_where(key, origin, source)}: key '{key}' expects {expected}, got {value!r}")

    if isinstance(value, _Override):
        if tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)):
            return value.text
        try:
            value = _parse(value.text)
        except yaml.YAMLError:
            value = value.text
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", origin, source)
    o = typing.get_origin(tp)
    if o is Union or o is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, origin, source)
            except ConfigError as e:
                errors.append(e)
        raise bad(" or ".join(_name(a) for a in args))
    if o is Literal:
        if value not in typing.get_args(tp):
            raise bad("one of " + ", ".join(repr(a) for a in typing.get_args(tp)))
        return value
    if o in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {_name(typing.get_args(tp)[0])}")
        item = typing.get_args(tp)[0]
        out = [_coerce(item, v, f"{key}[{i}]", origin, source) for i, v in enumerate(value)]
        return out if o is list else tuple(out)
    if o is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        vt = typing.get_args(tp)[1]
        return {str(k): _coerce(vt, v, f"{key}.{k}", origin, source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
            if not math.isfinite(value):
                raise bad("a finite number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise ConfigError(f"key '{key}': unsupported config type {tp!r}")  # a bug in the schema, not the file


def _name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
