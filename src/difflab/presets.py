"""Named presets of every model family: ``tiny`` (tests, seconds), ``demo`` (minutes on a CPU),
``base`` (a GPU), and family-specific ones (``digits``, later ``vae_*``, ``ldm_*``, ``clip_*``, ``t2i_*``).

A model module registers its presets at import; ``difflab presets`` lists them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from difflab.errors import check_choice

# The module of each model family: it registers the family's presets when imported and provides
# ``train(cfg, run_dir, resume=...)`` and ``load_config(run_dir)``.
FAMILY_MODULES = {
    "pixel": "difflab.models.pixel",
    "vae": "difflab.models.vae",
    "ldm": "difflab.models.ldm",
    "clip": "difflab.models.clip",
    "t2i": "difflab.models.t2i",
}
PRESET_MODULES = tuple(FAMILY_MODULES.values())


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


def family_module(family: str):
    """The module of a model family (``check_choice`` on the name)."""
    return importlib.import_module(FAMILY_MODULES[check_choice("model family", family, FAMILY_MODULES)])
