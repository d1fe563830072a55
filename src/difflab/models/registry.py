"""The table of model families and their presets, imported the ordinary way: the one place the CLI and
the demo look a family up (by a preset's family or a run's ``kind``)."""

from __future__ import annotations

from pathlib import Path

from difflab.errors import check_choice
from difflab.models import adapt, clip, control, depth, instruct, ldm, lm, pixel, planner, t2i, vae, vlm
from difflab.models.family import Family, Preset
from difflab.models.runs import read_run_config

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (pixel.FAMILY, vae.FAMILY, ldm.FAMILY, clip.FAMILY, planner.FAMILY, t2i.FAMILY, control.FAMILY,
              adapt.FAMILY, instruct.FAMILY, depth.FAMILY, lm.FAMILY, vlm.FAMILY)
}

PRESETS: dict[str, Preset] = {}
for _family in FAMILIES.values():
    for _preset in _family.presets:
        if _preset.name in PRESETS or _preset.family != _family.name:
            raise ValueError(f"preset '{_preset.name}' is registered twice or under another family")
        PRESETS[_preset.name] = _preset


def get_preset(name: str) -> Preset:
    return PRESETS[check_choice("preset", name, PRESETS)]


def get_family(name: str) -> Family:
    return FAMILIES[check_choice("model family", name, FAMILIES)]


def family_of_run(run_dir: str | Path) -> Family:
    """The family of a run directory, named by its config.json's ``kind``."""
    return get_family(read_run_config(run_dir)[0])
