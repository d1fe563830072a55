"""``difflab eval T2I_RUN``: GenEval-style faithfulness of a text-to-image run, judged by the reader.

For each category of the world's fixed prompt sets (:mod:`difflab.world.geneval`: single object, two
objects, counting, colours, position, attribute binding) the first ``n`` prompts are drawn once each; the
reader reads every image back into a scene and the prompt's own ``holds`` decides. The score of a
category is its fraction of hits and 'overall' is the mean over categories (GenEval's convention).

Prompts that name a (colour, shape) pair the run never saw in training (``data.heldout_pairs``) are
scored apart, as ``heldout_pairs``: compositional generalisation, not recall. ``seen`` is the rest. Every
score carries its n.

``objects_read`` says how the misses look: per category, how many images the reader found 0, 1, 2, ...
objects in. On scene32, whose training scenes hold one or two objects, a '3' there is an object the model
invented (docs/t2i.md: guidance brings the missing second object and an extra third together) - or one
object drawn in two colours, which the reader (rightly) reads as two. ``two_coloured_objects`` tells them
apart: per category, the images in which the reader found such a blend
(:func:`~difflab.world.reader.read_with_blends`).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from difflab.models.conditioners import Layouts
from difflab.models.system import DiffusionSystem, generate
from difflab.world.geneval import (
    MAX_PER_CATEGORY,
    category,
    check_faithfulness,
    eval_prompts,
    mentions_heldout,
)
from difflab.world.language import describe, description
from difflab.world.prompts import Prompt, holds
from difflab.world.reader import read, read_with_blends
from difflab.world.scene import Scene, WorldConfig, scene_at, world_preset


def generate_batched(model, cfg, texts: list[str], *, batch_size: int = 100, seed: int = 0, progress=False,
                     **kwargs) -> torch.Tensor:  # fmt: skip
    """One image per text, ``batch_size`` at a time; batch k uses noise seed ``seed + k`` (each batch is
    one :func:`~difflab.models.system.generate` batch, drawing as it always has)."""
    out = []
    starts = range(0, len(texts), batch_size)
    for k, start in enumerate(tqdm(starts, desc="sampling", disable=not progress, leave=False)):
        batch = texts[start : start + batch_size]
        images = generate(model, cfg, len(batch), batch, seed=seed + k, batch_size=batch_size, **kwargs)
        out.append(images.cpu())
    return torch.cat(out)


def object_counts(prompts: list[Prompt], scenes: list[Scene]) -> dict[str, dict[str, int]]:
    """``{category: {"k": images in which the reader found k objects}}``, each category's counts in
    ascending k; they sum to the category's n."""
    counts: dict[str, Counter] = {}
    for p, s in zip(prompts, scenes, strict=True):
        counts.setdefault(category(p), Counter())[len(s.objects)] += 1
    return {c: {str(k): n for k, n in sorted(h.items())} for c, h in counts.items()}


def two_coloured(prompts: list[Prompt], blends) -> dict[str, int]:
    """``{category: images holding at least one object drawn in two colours}`` (every category, 0s too)."""
    out = {category(p): 0 for p in prompts}
    for p, b in zip(prompts, blends, strict=True):
        out[category(p)] += b > 0
    return out


def score(prompts: list[Prompt], images: torch.Tensor, world: str | WorldConfig, heldout_pairs) -> dict:
    """Faithfulness of ``images`` (one per prompt) by the reader: all prompts, and split into prompts that
    do and do not name a held-out pair; and the number of objects read per category (``objects_read``).
    ``world`` is a preset's name or a config (one whose shapes add an extension's, read as well)."""
    cfg = world_preset(world) if isinstance(world, str) else world
    scenes, blends = zip(*(read_with_blends(image, cfg) for image in images), strict=True)
    report = {"all": check_faithfulness(prompts, list(scenes)), "objects_read": object_counts(prompts, scenes),
              "two_coloured_objects": two_coloured(prompts, blends)}  # fmt: skip
    if heldout_pairs:
        split = [mentions_heldout(p, heldout_pairs) for p in prompts]
        for name, keep in (("seen", False), ("heldout_pairs", True)):
            idx = [i for i, s in enumerate(split) if s == keep]
            if idx:
                report[name] = check_faithfulness([prompts[i] for i in idx], [scenes[i] for i in idx])
    return report


PAINTER_SEED = 4_243
"""Seed of the layouts the painter is measured on (training scenes come from ``data.seed``, 0)."""


def evaluate_painter(system: DiffusionSystem, cfg, n: int, *, seed: int = 0, **kwargs) -> dict:
    """The grounded painter alone (recipe 'layout'): ``n`` scenes of the world are given as layouts with
    their full descriptions, and the reader reads each image back. ``exact``: the description holds (every
    object with its size, colour, shape and cell, and nothing else); ``objects``: the share of given objects
    found with their shape, colour and cell. Keyword arguments as :func:`generate_batched`."""
    world = world_preset(cfg.data.world)
    scenes = [scene_at(world, PAINTER_SEED, i) for i in range(n)]
    layouts = Layouts([describe(s) for s in scenes], scenes)
    # one batch, as always: n is at most six categories of MAX_PER_CATEGORY prompts
    images = generate(system, cfg, n, layouts, seed=seed, batch_size=max(n, 1), **kwargs).cpu()
    read_back = [read(image, world) for image in images]
    exact = [holds(description(s), r) for s, r in zip(scenes, read_back, strict=True)]
    found = [any((o.shape, o.color, o.cell) == (p.shape, p.color, p.cell) for p in r.objects)
             for s, r in zip(scenes, read_back, strict=True) for o in s.objects]  # fmt: skip
    return {"n": n, "exact": sum(exact) / n, "objects": sum(found) / len(found)}


def evaluate(system: DiffusionSystem, cfg, run_dir: str | Path, n: int = MAX_PER_CATEGORY, *, sampler=None,
             steps=None, cfg_scale=None, seed: int = 0, progress: bool = False,
             prompt_seed: int | None = None) -> dict:  # fmt: skip
    """Sample the first ``n`` prompts of every category once with the loaded ``system`` of a run (``cfg``
    its record) and score them (see the module docstring); ``prompt_seed`` draws a fresh prompt set."""
    prompts = eval_prompts(cfg.data.world, n, prompt_seed)
    start = time.perf_counter()
    images = generate_batched(system, cfg, [p.text() for p in prompts], sampler=sampler, steps=steps,
                              cfg_scale=cfg_scale, seed=seed, progress=progress)  # fmt: skip
    seconds = time.perf_counter() - start
    used = cfg.sample.resolve(sampler, steps, cfg_scale)
    return {
        "run": str(run_dir),
        "prompts_per_category": n,
        "prompt_set": "shipped" if prompt_seed is None else f"drawn with seed {prompt_seed}",
        "sampler": used.sampler,
        "steps": used.steps,
        "cfg_scale": used.cfg_scale,
        "judge": "toy-world reader + the prompt's own holds()",
        "heldout_pairs": list(cfg.data.heldout_pairs),
        "faithfulness": score(prompts, images, cfg.data.world, cfg.data.pairs()),
        "sampling_images_per_second": len(prompts) / seconds,
    } | (
        {
            "painter": evaluate_painter(
                system, cfg, len(prompts), seed=seed, sampler=sampler, steps=steps, cfg_scale=cfg_scale
            )
        }
        if getattr(cfg, "recipe", "sd") == "layout"
        else {}
    )
