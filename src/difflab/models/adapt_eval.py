"""``difflab eval ADAPTER_RUN``: did the base learn the concept, and what did it forget?

Both goals are read by the world's reader, over the base world's shapes *and* the concept's, so a star
drawn where a circle was asked is caught as a star:

- **concept**: ``n`` prompts naming the concept, in the forms people type ('a star', 'a red star', 'a large
  red star', 'a star at the top left', 'a red star in the center'), drawn from their own seed (never the
  training images' scenes). ``found``: the reader finds the concept in the sample; ``holds``: the prompt
  holds (its colour, size and cell too).
- **old**: the base world's GenEval-style prompt sets (:mod:`difflab.models.t2i_eval`), ``n`` per category,
  sampled with the same seeds by the adapted model and by the base: overall faithfulness of each and the
  difference, per category too.

Both are measured beside the base on the same prompts and seeds; the report also counts the parameters
the adapter trained, as a share of the base network's, and the adapter file's size.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from difflab.models.t2i_eval import generate_batched, score
from difflab.train.metrics import log_curve_point
from difflab.world.geneval import MAX_PER_CATEGORY, eval_prompts
from difflab.world.prompts import Exists, ObjectSpec, Prompt
from difflab.world.reader import read
from difflab.world.scene import POSITIONS, WorldConfig, world_preset

EVAL_SEED = 70_001
"""Seed of the concept prompts ``difflab eval`` draws (``--prompt-seed`` draws others)."""
GRID_SEED = 70_002
"""Seed of the concept prompts of the training grids."""
FORMS = (("shape",), ("shape", "color"), ("shape", "color", "size"), ("shape", "position"),
         ("shape", "color", "position"))  # fmt: skip
"""The attributes a concept prompt names, one form drawn per prompt."""


def reading_world(world: WorldConfig, concept: str) -> WorldConfig:
    """The world the reader reads samples in: its shapes and the concept's."""
    return dataclasses.replace(world, shapes=tuple(dict.fromkeys((*world.shapes, concept))))


def concept_prompts(concept: str, world: WorldConfig, n: int, seed: int) -> list[Prompt]:
    """``n`` prompts naming the concept, each in a form of :data:`FORMS` with its colour, size and cell drawn
    from the world's."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        form = FORMS[rng.integers(len(FORMS))]
        spec = {"shape": concept, "color": str(rng.choice(world.colors)), "size": str(rng.choice(world.sizes)),
                "position": str(rng.choice(POSITIONS))}  # fmt: skip
        prompts.append(Exists(ObjectSpec(**{a: spec[a] for a in form})))
    return prompts


def concept_score(prompts: list[Prompt], images: torch.Tensor, world: WorldConfig, concept: str) -> dict:
    """``found``: the share of images in which the reader finds the concept; ``holds``: of prompts that hold."""
    scenes = [read(image, reading_world(world, concept)) for image in images]
    found = [any(o.shape == concept for o in s.objects) for s in scenes]
    holds = [p.holds(s) for p, s in zip(prompts, scenes, strict=True)]
    return {"n": len(prompts), "found": sum(found) / len(found), "holds": sum(holds) / len(holds)}


def grid_report(images: torch.Tensor, concept: list[Prompt], old: list[Prompt], world: WorldConfig,
                name: str) -> dict:  # fmt: skip
    """One point of the learning curve from a training grid: the concept prompts' scores (the grid's first
    images) and the share of the old prompts (the rest) that hold."""
    k = len(concept)
    report = concept_score(concept, images[:k], world, name)
    reader_world = reading_world(world, name)
    old_holds = [p.holds(read(image, reader_world)) for p, image in zip(old, images[k:], strict=True)]
    return {"concept_found": report["found"], "concept_holds": report["holds"],
            "old_holds": sum(old_holds) / max(len(old_holds), 1)}  # fmt: skip


def write_curve(run_dir: Path, step: int, report: dict) -> None:
    log_curve_point(Path(run_dir) / "concept.jsonl", step, report)


def evaluate(adapted, base, cfg, base_cfg, run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None,
             cfg_scale=None, progress: bool = False, prompt_seed: int | None = None, old: bool = True,
             trained: int, total: int) -> dict:  # fmt: skip
    """The report of the module docstring, for the ``adapted`` system beside the ``base`` (both loaded, the
    base's text encoder knowing the concept's words too)."""
    world = world_preset(cfg.data.world)
    kw = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "seed": seed, "progress": progress}
    prompts = concept_prompts(cfg.concept, world, n, EVAL_SEED if prompt_seed is None else prompt_seed)
    texts = [p.text() for p in prompts]
    start = time.perf_counter()
    images = generate_batched(adapted, cfg, texts, **kw)
    seconds = time.perf_counter() - start
    base_images = generate_batched(base, cfg, texts, **kw)
    used = cfg.sample.resolve(sampler, steps, cfg_scale)
    adapter = Path(run_dir) / "adapter.safetensors"
    report = {
        "run": str(run_dir),
        "base": cfg.base,
        "method": cfg.method,
        "rank": cfg.rank if cfg.method == "lora" else None,
        "sampler": used.sampler,
        "steps": used.steps,
        "cfg_scale": used.cfg_scale,
        "judge": f"toy-world reader over the world's shapes and '{cfg.concept}'",
        "concept": concept_score(prompts, images, world, cfg.concept),
        "concept_base": concept_score(prompts, base_images, world, cfg.concept),
        "parameters": {
            "trained": trained,
            "network": total,
            "share": trained / total,
            "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
        },  # fmt: skip
        "sampling_images_per_second": len(texts) / seconds,
    }
    if old:
        k = min(n, MAX_PER_CATEGORY)
        old_prompts = eval_prompts(cfg.data.world, k, prompt_seed)
        old_texts = [p.text() for p in old_prompts]
        reader_world = reading_world(world, cfg.concept)
        pairs = base_cfg.data.pairs()
        ours = score(old_prompts, generate_batched(adapted, cfg, old_texts, **kw), reader_world, pairs)["all"]
        theirs = score(old_prompts, generate_batched(base, cfg, old_texts, **kw), reader_world, pairs)["all"]
        report["old"] = {"prompts_per_category": k, "adapted": ours, "base": theirs,
                         "overall_change": ours["overall"]["score"] - theirs["overall"]["score"]}  # fmt: skip
    return report
