"""Checks shared by the text-to-image test modules (every recipe is held to the same one)."""

from __future__ import annotations

from difflab.models import t2i
from difflab.world.reader import read
from difflab.world.scene import world_preset


def colour_accuracy(model, cfg, n_per_prompt: int) -> float:
    """The reader's verdict on 'a <colour> <shape>' for every colour and shape of the run's world: the share
    of images holding an object of the named colour."""
    world = world_preset(cfg.data.world)
    hits = []
    for colour in world.colors:
        for shape in world.shapes:
            images = t2i.generate(model, cfg, [f"a {colour} {shape}"] * n_per_prompt, seed=1)
            hits += [any(o.color == colour for o in read(im, world).objects) for im in images]
    return sum(hits) / len(hits)
