"""Named presets of every model family: ``tiny`` (tests, seconds), ``demo`` (minutes on a CPU),
``base`` (a GPU), and family-specific ones (``digits``, later ``vae_*``, ``ldm_*``, ``clip_*``, ``t2i_*``).

A model module registers its presets at import; ``difflab presets`` lists them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from difflab.errors import check_choice

# Modules that register presets when imported.
PRESET_MODULES = ("difflab.models.pixel",)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    description: str
    build: Callable[[], object]
    """Returns the preset's full config dataclass."""


_PRESETS: dict[str, Preset] = {}


def register_preset(name: str, family: str, description: str, build: Callable[[], object]) -> None:
    if name in _PRESETS:
        raise ValueError(f"preset '{name}' is registered twice")
    _PRESETS[name] = Preset(name, family, description, build)


def all_presets() -> dict[str, Preset]:
    for module in PRESET_MODULES:
        importlib.import_module(module)
    return dict(_PRESETS)


def get_preset(name: str) -> Preset:
    presets = all_presets()
    check_choice("preset", name, presets)
    return presets[name]
