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
from difflab.world.scene import Obj, Scene, WorldConfig, scene_at

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


class ReadTally:
    """Running scores of read scenes against the true ones: exact-scene, object-count and per-attribute
    accuracy (attributes per true object; a missed object counts as wrong on every attribute)."""

    def __init__(self) -> None:
        self.scenes = self.exact = self.count_ok = self.objects = 0
        self.attr_ok = dict.fromkeys(ATTRIBUTES, 0)

    def add(self, truth: Scene, got: Scene) -> bool:
        """Score one reading; returns whether it was exact."""
        exact = got.keys() == truth.keys()
        self.scenes += 1
        self.exact += exact
        self.count_ok += len(got.objects) == len(truth.objects)
        for t, f in match_objects(truth.objects, got.objects):
            self.objects += 1
            for a in ATTRIBUTES:
                self.attr_ok[a] += f is not None and getattr(t, a) == getattr(f, a)
        return exact

    def report(self) -> dict:
        n = max(self.scenes, 1)
        return {
            "exact_scene_accuracy": self.exact / n,
            "object_count_accuracy": self.count_ok / n,
            "attribute_accuracy": {a: ok / max(self.objects, 1) for a, ok in self.attr_ok.items()},
            "objects": self.objects,
        }


def check_reader(cfg: WorldConfig, n: int, seed: int = 0, noise: float = 0.0, progress: bool = False) -> dict:
    """Render ``n`` scenes of ``cfg`` (seed ``seed``), optionally add N(0, noise^2) pixel noise, read them
    back, and report exact-scene, object-count and per-attribute accuracies (attributes are scored per
    true object; a missed object counts as wrong on every attribute)."""
    tally = ReadTally()
    failures = []
    start = time.perf_counter()
    for i in tqdm(range(n), desc="reading", disable=not progress, unit="scene"):
        scene = scene_at(cfg, seed, i)
        image = render(scene, cfg).image
        if noise > 0:
            image = add_noise(image, noise, np.random.default_rng([seed, i, 7]))
        got = read(image, cfg)
        if not tally.add(scene, got) and len(failures) < 5:
            failures.append({"index": i, "truth": scene.keys(), "read": got.keys()})
    seconds = time.perf_counter() - start
    return {
        "n": n,
        "seed": seed,
        "resolution": cfg.resolution,
        "background": cfg.background,
        "noise_sigma": noise,
        **tally.report(),
        "scenes_per_second": n / seconds,
        "first_failures": failures,
    }
