"""Measuring the reader: how often does pixels -> scene give back the scene that was drawn?

The reader judges every generative model in difflab, so its own accuracy is a reported number:
exact-scene accuracy (every object's shape, colour, size and grid position right, and nothing extra)
and per-attribute accuracy, on clean renders and with additive Gaussian noise.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from difflab.world.reader import read
from difflab.world.render import add_noise, render
from difflab.world.scene import Obj, WorldConfig, scene_at

ATTRIBUTES = ("shape", "color", "size", "position")


def match_objects(truth: tuple[Obj, ...], found: tuple[Obj, ...]) -> list[tuple[Obj, Obj | None]]:
    """Pair each true object with the nearest unclaimed read object (by centre), or None if none is left.
    Greedy on distance; exact for the toy world, whose objects never share a grid cell."""
    pairs = sorted(
        ((np.hypot(t.x - f.x, t.y - f.y), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)),
    )
    claimed_t, claimed_f, match = set(), set(), {}
    for _, i, j in pairs:
        if i not in claimed_t and j not in claimed_f:
            claimed_t.add(i)
            claimed_f.add(j)
            match[i] = found[j]
    return [(t, match.get(i)) for i, t in enumerate(truth)]


def check_reader(cfg: WorldConfig, n: int, seed: int = 0, noise: float = 0.0, progress: bool = False) -> dict:
    """Render ``n`` scenes of ``cfg`` (seed ``seed``), optionally add N(0, noise^2) pixel noise, read them
    back, and report exact-scene, object-count and per-attribute accuracies (attributes are scored per
    true object; a missed object counts as wrong on every attribute)."""
    exact = count_ok = 0
    attr_ok = dict.fromkeys(ATTRIBUTES, 0)
    total_objects = 0
    failures = []
    start = time.perf_counter()
    for i in tqdm(range(n), desc="reading", disable=not progress, unit="scene"):
        scene = scene_at(cfg, seed, i)
        image = render(scene, cfg).image
        if noise > 0:
            image = add_noise(image, noise, np.random.default_rng([seed, i, 7]))
        got = read(image, cfg)
        exact += got.keys() == scene.keys()
        count_ok += len(got.objects) == len(scene.objects)
        for t, f in match_objects(scene.objects, got.objects):
            total_objects += 1
            for a in ATTRIBUTES:
                attr_ok[a] += f is not None and getattr(t, a) == getattr(f, a)
        if got.keys() != scene.keys() and len(failures) < 5:
            failures.append({"index": i, "truth": scene.keys(), "read": got.keys()})
    seconds = time.perf_counter() - start
    return {
        "n": n,
        "seed": seed,
        "resolution": cfg.resolution,
        "background": cfg.background,
        "noise_sigma": noise,
        "exact_scene_accuracy": exact / n,
        "object_count_accuracy": count_ok / n,
        "attribute_accuracy": {a: attr_ok[a] / max(total_objects, 1) for a in ATTRIBUTES},
        "objects": total_objects,
        "scenes_per_second": n / seconds,
        "first_failures": failures,
    }
