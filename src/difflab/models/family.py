"""What a model family is, written down: one record per kind of run (pixel, vae, ldm, clip, t2i).

A family is its config class, its named presets and the handful of things every command does to a run:
resolve a request into a run record, train, load, evaluate, and build its network for ``difflab info``.
The CLI dispatches through :data:`difflab.models.registry.FAMILIES`, a table of these records, never
through an if/elif over kinds; a new model system is one more record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named starting point: ``build()`` returns the family's config as the user's request."""

    name: str
    family: str
    description: str
    build: Callable[[], Any]


@dataclass(frozen=True)
class Family:
    name: str
    """The ``kind`` written in a run's config.json."""
    what: str
    """How errors name one of its runs ('a latent diffusion (ldm) run')."""
    config: type
    presets: tuple[Preset, ...]
    resolve: Callable[..., Any]
    """``resolve(request, *, attach=True) -> record``: derive every field (the network's shapes from the
    data, parent runs' checkpoints and scales when ``attach``) and validate everything a run will need,
    before any work starts. ``attach=False`` resolves what needs no parent run (``difflab info``)."""
    train: Callable[..., Path]
    """``train(cfg, run_dir, *, resume=False) -> run_dir``."""
    load: Callable[..., tuple[Any, Any]]
    """``load(run_dir, *, device="cpu") -> (model, record)``."""
    evaluate: Callable[..., dict]
    """``evaluate(run_dir, n, *, seed, **options) -> report``; options are those in ``eval_options``."""
    network: Callable[[Any], tuple[Any, dict, Callable | None]]
    """``network(record) -> (module, example inputs, loss of its output or None)`` for ``difflab info``."""
    writes: str
    """What ``train`` writes besides metrics.jsonl and checkpoints/ (for its closing line)."""
    eval_n: int = 500
    """``difflab eval``'s default n."""
    eval_options: tuple[str, ...] = ()
    """Keyword options ``evaluate`` takes beyond n and seed (sampler, steps, cfg_scale, progress, plot)."""
    parents: tuple[str, ...] = ()
    """Config fields that name the runs a run is built on and must name (ldm: ``vae``; t2i: ``text_encoder``):
    ``difflab info`` resolves them when they are set, and keeps the preset's shapes when they are not."""
    draws: str | None = None
    """What a user asks a trained run for: 'classes' (``difflab sample``), 'prompts' (``difflab generate``)
    or None (not a generative run)."""
