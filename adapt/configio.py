"""Loading typed configs: YAML files plus dotted `key=value` overrides into nested dataclasses.

The dataclasses themselves live in `adapt.config`. Every field carries its help in `metadata["help"]`
(`opt`); unknown keys, wrong types and impossible values raise `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A config key, type or value is wrong; the message names the dotted key."""


def opt(default, help: str):
    """A dataclass field with help text (mutable defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def template_fields(template: str) -> set:
    """Names a str.format template uses; a malformed template counts as {'<malformed>'}."""
    import string
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError:
        return {"<malformed>"}


def check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{key}: {msg}")


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp`; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / off / yes / on as a boolean
            spelled = [c for c in (("yes", "on", "true") if value else ("no", "off", "false")) if c in choices]
            value = spelled[0] if spelled else value
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _SCI.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string; it is meant as a number
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp is str and isinstance(value, bool):
        raise ConfigError(f"{key}: expected str, got bool {value!r} (YAML reads a bare yes / no / on / off / true / false "
                          "as a boolean: quote the word if you meant it)")
    if tp in (int, float, str, bool, list, dict) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    types_of = hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (valid keys under '{prefix or '<top>'}': {sorted(names)})")
    kwargs = {k: _coerce(v, types_of[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({' '.join(str(e).split())})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls, path: str | Path | None = None, overrides: list[str] | tuple = ()):
    """Build config `cls` from a YAML file (optional) and dotted overrides."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:  # e.g. a tab used for indentation
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    data = _merge(data, parse_overrides(list(overrides)))
    return _build(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg, path: str | Path, notes: list[str] = ()) -> None:
    """Write the resolved config atomically; `notes` (e.g. the resume history) go on top as comments, so the
    file still loads as a config."""
    from adapt import atomic
    head = "".join(f"# {line}\n" for line in notes)
    atomic.write_text(path, head + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for `--help` and docs."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows


def keys_help(cls) -> str:
    """Every key with its default and help, for an argparse epilog."""
    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows)
    return "config keys (key=value overrides):\n" + "\n".join(f"  {k:<{width}}  {h} [default {d}]" for k, d, h in rows)
