"""Any dataclass from a dict, a JSON/TOML file or `key=value` overrides, with one-line errors naming the bad key.

The model configs and the training config both use these, so neither grows its own parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, TypeVar

from aigc_jax.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Builds `cls` from a dict, rejecting unknown keys and values of the wrong type with one-line errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"unknown {section} key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**values)


def with_overrides(obj: T, overrides: dict[str, Any], prefix: str = "") -> T:
    """`dataclasses.replace` with the same key and type checks as `from_dict`."""
    merged = {**dataclasses.asdict(obj), **overrides}
    merged.pop("family", None)  # a model config's class already says it
    return from_dict(type(obj), merged, prefix)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """["a=1", "b.c=x"] -> {"a": "1", "b.c": "x"} (values stay strings; `from_dict` coerces them)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_file(path: str | os.PathLike) -> dict:
    """Reads a JSON or TOML config file: an object whose "model"/"train" sections, if present, are objects."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; pass a JSON or TOML file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib  # Python >= 3.11

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except ImportError:
        raise ConfigError(f"{path}: TOML configs need Python >= 3.11; use JSON instead") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object with 'model'/'train' sections (or model keys), "
                          f"got a {type(data).__name__}")
    for section in ("model", "train"):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{path}: '{section}' must be an object of key/value pairs, "
                              f"got a {type(data[section]).__name__}")
    return data


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Converts `value` (possibly a string from the command line) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (tuple, list):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return origin(_coerce(item_tp, v, name) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(number):  # inf passes every "> 0" check and then trains to NaN
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value
