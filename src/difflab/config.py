"""Typed dataclass configs: ``--set key=value`` overrides, and the JSON round trip of ``config.json``.

Configs are frozen dataclasses that may nest (``unet.channels``, ``train.lr``). Overrides are parsed
against each field's declared type, so ``--set train.lr=3e-4`` is a float and ``--set
unet.channel_mult=1,2,2`` a tuple of ints; an unknown key names the valid ones and the closest match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp):
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_value(text: str, tp, key: str):
    """Parse ``text`` as the type ``tp`` of config field ``key``; a bad value names the key and the type."""
    tp, optional = _strip_optional(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float, str):
            return tp(text)
        if origin is tuple:
            args = typing.get_args(tp)
            elem = args[0] if args else str
            items = [s for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
            return tuple(parse_value(s.strip(), elem, key) for s in items)
        if origin is dict or tp is dict:
            return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        pass
    else:
        raise DifflabError(f"config key '{key}' has a type ({tp}) that cannot be set from the command line")
    raise DifflabError(f"bad value '{text}' for config key '{key}'; expected {getattr(tp, '__name__', tp)}")


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config class."""
    keys = []
    for name, tp in _field_types(cls).items():
        if name.startswith("_"):
            continue
        if _is_dataclass_type(tp):
            keys.extend(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def apply_overrides(cfg, overrides: list[str]):
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (dotted keys reach nested configs)."""
    for item in overrides:
        if "=" not in item:
            raise DifflabError(f"bad override '{item}'; expected key=value, e.g. train.lr=3e-4")
        key, text = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), text.strip(), key.strip(), type(cfg))
    return cfg


def _set(cfg, path: list[str], text: str, full_key: str, root_cls):
    types_ = _field_types(type(cfg))
    name = path[0]
    if name not in types_ or name.startswith("_"):
        keys = valid_keys(root_cls)
        close = difflib.get_close_matches(full_key, keys, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DifflabError(f"unknown config key '{full_key}'{hint}; valid keys: {', '.join(keys)}")
    if len(path) > 1:
        child = getattr(cfg, name)
        if not dataclasses.is_dataclass(child):
            raise DifflabError(f"config key '{full_key}': '{name}' has no sub-keys")
        value = _set(child, path[1:], text, full_key, root_cls)
    else:
        if _is_dataclass_type(types_[name]):
            raise DifflabError(
                f"config key '{full_key}' is a group; set one of its keys, e.g. {full_key}.<key>"
            )
        value = parse_value(text, types_[name], full_key)
    try:
        return dataclasses.replace(cfg, **{name: value})
    except (ValueError, TypeError) as err:  # a config's own __post_init__ validation
        raise DifflabError(f"config key '{full_key}={text}' is invalid: {err}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass from ``to_dict`` output; lists become tuples where the field
    is a tuple. Unknown keys are an error (a run made by an incompatible version)."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise DifflabError(
            f"config has unknown keys {sorted(unknown)} for {cls.__name__}; made by another version?"
        )
    kwargs = {}
    for name, value in data.items():
        tp, _ = _strip_optional(types_[name])
        if _is_dataclass_type(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Write a file atomically: the block writes the yielded temporary path, which is then fsynced and
    renamed onto ``path``, so a crash never leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
