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
import math
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


def _describe(tp) -> str:
    """A declared type in words, for error messages: ``tuple[float, float]`` -> 'a list of 2 floats'."""
    tp, optional = _strip_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    names = {
        int: "an integer",
        float: "a finite float",
        str: "a string",
        bool: "true or false",
        dict: "an object",
    }
    plural = {int: "integers", float: "finite floats", str: "strings", bool: "booleans"}
    if tp in names:
        text = names[tp]
    elif _is_dataclass_type(tp):
        text = f"an object of {tp.__name__} keys"
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        text = f"a list of {plural.get(args[0], args[0])}"
    elif origin is tuple and args and len(set(args)) == 1:
        text = f"a list of {len(args)} {plural.get(args[0], args[0])}"
    elif origin is dict:
        text = "an object"
    else:
        text = str(tp)
    return text + (" or null" if optional else "")


INT64 = 2**63
"""Integers of a config fit a signed 64-bit integer (what torch and numpy take); ranges are per field."""


def _scalar_ok(value, tp) -> bool:
    """Whether ``value`` (as read from JSON or parsed from the command line) is a ``tp`` scalar."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and -INT64 <= value < INT64
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # a type this module does not check (none of the configs has one)


def _tuple_items(tp) -> list | None:
    """The item types of a tuple type: ``tuple[int, ...]`` -> None (any length of ``int``), ``tuple[float,
    float]`` -> [float, float]."""
    args = typing.get_args(tp)
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        return None
    return list(args)


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
            return tp(text)  # nan, inf and 2**70 parse: each field's own range refuses them, by name
        if origin is tuple:
            args = typing.get_args(tp)
            items = [s.strip() for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
            fixed = _tuple_items(tp)
            if fixed is not None and len(items) != len(fixed):
                raise DifflabError(
                    f"bad value '{text}' for config key '{key}'; expected {len(fixed)} comma-separated values"
                )
            elems = fixed or [args[0] if args else str] * len(items)
            return tuple(parse_value(s, elem, key) for s, elem in zip(items, elems, strict=True))
        if origin is dict or tp is dict:
            return json.loads(text)
    except (ValueError, json.JSONDecodeError) as err:
        if isinstance(err, DifflabError):
            raise
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
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (dotted keys reach nested configs).

    Every value is parsed first; then each config is rebuilt once with all of its new values, so that the
    checks across fields (widths divisible by heads, ...) see the final values whatever the order of the
    overrides. A config's own check that fails names the overrides of that config."""
    changes: dict = {}  # nested: {"unet": {"channels": 32}, ...}
    given: dict[str, str] = {}  # "unet.channels" -> "unet.channels=32", for error messages
    for item in overrides:
        if "=" not in item:
            raise DifflabError(f"bad override '{item}'; expected key=value, e.g. train.lr=3e-4")
        key, text = (s.strip() for s in item.split("=", 1))
        path = key.split(".")
        value = parse_value(text, _field_type(type(cfg), path, key), key)
        node = changes
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
        given[key] = f"{key}={text}"
    return _rebuild(cfg, changes, "", given)


def _field_type(root_cls, path: list[str], full_key: str):
    """The declared type of the dotted key ``full_key``; an unknown key names the valid ones."""
    cls = root_cls
    for i, name in enumerate(path):
        if not _is_dataclass_type(cls):
            raise DifflabError(f"config key '{full_key}': '{path[i - 1]}' has no sub-keys")
        types_ = _field_types(cls)
        if name not in types_ or name.startswith("_"):
            keys = valid_keys(root_cls)
            close = difflib.get_close_matches(full_key, keys, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DifflabError(f"unknown config key '{full_key}'{hint}; valid keys: {', '.join(keys)}")
        cls = types_[name]
    if _is_dataclass_type(cls):
        raise DifflabError(f"config key '{full_key}' is a group; set one of its keys, e.g. {full_key}.<key>")
    return cls


def _rebuild(cfg, changes: dict, prefix: str, given: dict[str, str]):
    """``cfg`` with ``changes`` (nested dicts for nested configs), each config rebuilt once."""
    values = {
        name: _rebuild(getattr(cfg, name), value, f"{prefix}{name}.", given) if isinstance(value, dict)
        and dataclasses.is_dataclass(getattr(cfg, name)) else value
        for name, value in changes.items()
    }  # fmt: skip
    try:
        return dataclasses.replace(cfg, **values)
    except (ValueError, TypeError) as err:  # a config's own __post_init__ validation
        mine = [text for key, text in given.items() if key.startswith(prefix)]
        if len(mine) == 1:
            raise DifflabError(f"config key '{mine[0]}' is invalid: {err}") from None
        raise DifflabError(f"config keys {', '.join(repr(m) for m in mine)} are invalid: {err}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict, *, source: str = "config.json", _prefix: str = ""):
    """Rebuild a (nested) config dataclass from ``to_dict`` output; lists become tuples where the field
    is a tuple. Every value is checked against its field's declared type first, and a config's own check
    is reported as this file's, so a hand-edited config.json is refused by name (``config.json:
    train.lr is 'abc' (str); expected a finite float``) rather than failing later in torch. Unknown keys
    are an error (a run made by an incompatible version); missing ones take their defaults (older runs)."""
    where = _prefix[:-1] or "the top level"
    if not isinstance(data, dict):
        raise DifflabError(f"{source}: {where} is {_shown(data)}; expected an object of {cls.__name__} keys")
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise DifflabError(
            f"{source} has unknown keys {sorted(unknown)} for {cls.__name__} (at {where}); made by another version?"
        )
    kwargs = {
        name: _from_json(value, types_[name], f"{_prefix}{name}", source) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # a config's own __post_init__ validation
        # "lr -1.0 is invalid" in train reads "train.lr -1.0 is invalid"; other messages get "train: ..."
        starts_with_field = str(err).split(" ", 1)[0] in types_
        where = _prefix if starts_with_field else f"{_prefix[:-1]}: " if _prefix else ""
        raise DifflabError(f"{source}: {where}{err}") from None


def _shown(value) -> str:
    """A JSON value and its Python type, for error messages: 'abc' (str), null."""
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _from_json(value, tp, key: str, source: str):
    """``value`` as read from JSON, checked against the declared type ``tp`` of ``key`` and converted
    (lists to tuples, ints to floats where a float is declared)."""
    base, optional = _strip_optional(tp)
    bad = DifflabError(f"{source}: {key} is {_shown(value)}; expected {_describe(tp)}")
    if value is None:
        if optional:
            return None
        raise bad
    if _is_dataclass_type(base):
        if not isinstance(value, dict):
            raise bad
        return from_dict(base, value, source=source, _prefix=f"{key}.")
    origin = typing.get_origin(base)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        fixed = _tuple_items(base)
        args = typing.get_args(base)
        if fixed is not None and len(value) != len(fixed):
            raise bad
        elems = fixed or [args[0] if args else typing.Any] * len(value)
        if not all(_scalar_ok(v, e) for v, e in zip(value, elems, strict=True)):
            raise bad
        return tuple(float(v) if e is float else v for v, e in zip(value, elems, strict=True))
    if origin is dict or base is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if not _scalar_ok(value, base):
        raise bad
    return float(value) if base is float else value


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
