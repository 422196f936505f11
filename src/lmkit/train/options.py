"""Run configurations from YAML files and command-line overrides, for any config dataclass.

    cfg = read_config(PretrainConfig, "cfg.yaml", {"steps": 2000, "model.hidden_size": "128"})

Defaults, then the YAML file (flat keys; a field typed `dict` such as `model:` holds a
mapping), then the overrides (dotted keys reach into a nested mapping). Every value is
converted to its field's type, unknown keys are errors, and `$VARS` and `~` are expanded in
the fields the class lists in `PATH_FIELDS`. `NESTED` maps a dict field to the dataclass
its keys must belong to (PretrainConfig: {"model": ModelConfig}).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmkit.errors import ConfigError, LmkitError
from lmkit.textfiles import read_bytes

C = TypeVar("C")
MAX_YAML_BYTES = 1 << 20


def parse_set(items: list[str] | None) -> dict[str, str]:
    """`["lr=1e-3", "model.hidden_size=128"]` -> `{"lr": "1e-3", "model.hidden_size": "128"}`
    (values are converted to the field's type by `read_config`)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r} is not key=value (e.g. --set lr=1e-3)")
        out[key.strip()] = value.strip()
    return out


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` (from YAML, argparse or a --set string) as the type `hint` says."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and
                                                     value.lower() in ("none", "null", "~"))):
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)

    def bad(what: str) -> ValueError:
        return ValueError(f"{name}={value!r} is not {what}")

    if hint is list or origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [str(v) for v in value]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise bad("true or false")
    if hint is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("an integer") from None
        if isinstance(value, bool) or not number.is_integer():
            raise bad("an integer")
        return int(number)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    return value


def typed_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` converted to the types of `cls`'s fields; unknown names are an error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}; known: {sorted(known)}")
    return {k: _coerce(k, v, hints[k]) for k, v in values.items()}


def _expand(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def read_config(cls: type[C], path: str | Path | None = None,
                overrides: dict[str, Any] | None = None, strict: bool = False) -> C:
    """An instance of the dataclass `cls` from its defaults, a YAML file and overrides (an
    override of None is ignored: an argparse option that was not given). Validated when the
    class has a `validate` method. `strict` (a run's saved config, read on resume): the file
    must give every field, since a missing one would silently take its default, except the
    class's `LATER_FIELDS` (added since runs were saved without them; their defaults are how
    those runs trained)."""
    values = read_yaml(path) if path is not None else {}
    later = getattr(cls, "LATER_FIELDS", ())
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.name not in later]
    if strict and path is not None and missing:
        raise ConfigError(
            f"{path} lacks {missing}: the saved run config is truncated or was edited, and a "
            "missing field would silently change the run; restore the file (every field is "
            "written when the run starts)")
    given = {k for k, v in (overrides or {}).items() if v is not None}
    try:
        return _build(cls, values, overrides)
    except (ValueError, TypeError) as e:  # name the file the value came from (or may have)
        if isinstance(e, LmkitError) and not isinstance(e, ConfigError):
            raise
        if path is None:
            raise ConfigError(str(e)) from e
        where = f"{path}: {e}" if not given else f"{e} (in {path} or the overrides)"
        raise ConfigError(where) from e


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file of at most MAX_YAML_BYTES; syntax errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = read_bytes(path, MAX_YAML_BYTES, "config file", ConfigError)
    try:
        loaded = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); the file "
                          "is corrupted: fix or rewrite it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML ({problem}); fix the file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields (key: value lines)")
    return loaded


def _build(cls: type[C], values: dict[str, Any], overrides: dict[str, Any] | None) -> C:
    nested: dict[str, type] = getattr(cls, "NESTED", {})
    for name in nested:
        values[name] = dict(values.get(name) or {})
    for key, value in (overrides or {}).items():
        head, dot, rest = key.partition(".")
        if dot and head in nested:
            values[head][rest] = value
        elif value is not None:
            values[key] = value
    where = cls.__name__
    typed = typed_fields(cls, values, where)
    for name, inner in nested.items():
        typed[name] = typed_fields(inner, typed.get(name) or {}, f"{where}.{name}")
    for name in getattr(cls, "PATH_FIELDS", ()):
        value = typed.get(name)
        if isinstance(value, str):
            typed[name] = _expand(value)
        elif isinstance(value, list):
            typed[name] = [_expand(v) for v in value]
    cfg = cls(**typed)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass (or a mapping) as YAML (what `read_config` / `read_yaml` read
    back), atomically: a kill leaves the previous file or the new one, never a truncated one."""
    path = Path(path)
    data = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(yaml.safe_dump(data, sort_keys=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

