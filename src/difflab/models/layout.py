"""Layouts as grounding: what a grounded painter (GLIGEN, Li et al. 2023) is told about each object.

A layout is a scene's list of objects, each read as a *phrase* ('large red circle', the object's size,
colour and shape) and a *box* (its bounding square, corners in canvas fractions). In training the
layout is the training scene's own (every object, as GLIGEN grounds every annotated box); at sampling
time it is the planner's (:mod:`difflab.models.planner`). The painter reads a phrase through the frozen
text encoder, as GLIGEN reads it through CLIP's text encoder: the masked mean of its token features,
computed once for every phrase the world can say (:func:`phrase_embeddings`).

Per item, fixed shapes for batching (M = the world's ``max_objects``):

    g_phrase (M,) long   index into phrases(world)        g_box (M, 4) float   x0, y0, x1, y1
    g_mask   (M,) bool   True on real objects (the rest is padding, masked out of the gated attention)
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from difflab.data.captioned import CaptionedScenes
from difflab.models.text_encoder import FrozenTextEncoder
from difflab.world.scene import PALETTE, Obj, Scene, WorldConfig


def phrases(world: WorldConfig) -> list[str]:
    """Every object phrase of the world, 'size colour shape', in a fixed order (sizes, colours, shapes)."""
    return [f"{z} {c} {s}" for z in world.sizes for c in world.colors for s in world.shapes]


def phrase_index(obj: Obj, world: WorldConfig) -> int:
    """Index of ``obj``'s phrase in :func:`phrases`."""
    z, c, s = world.sizes.index(obj.size), world.colors.index(obj.color), world.shapes.index(obj.shape)
    return (z * len(world.colors) + c) * len(world.shapes) + s


def object_box(obj: Obj, world: WorldConfig) -> tuple[float, float, float, float]:
    """The square around ``obj``'s bounding circle, (x0, y0, x1, y1) in canvas fractions."""
    r = world.radius[obj.size]
    return (obj.x - r, obj.y - r, obj.x + r, obj.y + r)


def outlines(scene: Scene, world: WorldConfig) -> list[tuple[tuple[float, float, float, float], tuple]]:
    """Each object's box and palette colour, for drawing a layout over an image (``save_captioned_grid``)."""
    return [(object_box(o, world), PALETTE[o.color]) for o in scene.objects]


def layout_fields(scene: Scene, world: WorldConfig) -> dict[str, torch.Tensor]:
    """``g_phrase``, ``g_box``, ``g_mask`` of a scene's objects, padded to ``world.max_objects``."""
    m = world.max_objects
    phrase = torch.zeros(m, dtype=torch.long)
    box = torch.zeros(m, 4)
    mask = torch.zeros(m, dtype=torch.bool)
    for i, obj in enumerate(scene.objects[:m]):
        phrase[i], box[i], mask[i] = phrase_index(obj, world), torch.tensor(object_box(obj, world)), True
    return {"g_phrase": phrase, "g_box": box, "g_mask": mask}


@torch.no_grad()
def phrase_embeddings(encoder: FrozenTextEncoder, world: WorldConfig) -> torch.Tensor:
    """(len(phrases), width): each phrase's masked mean token feature in the frozen text encoder."""
    enc = encoder(phrases(world))
    keep = enc.mask.float()[..., None]  # (P, L, 1)
    return (enc.tokens * keep).sum(1) / keep.sum(1)


class WithLayout(Dataset):
    """A captioned-scenes dataset whose items also carry their scene's layout (:func:`layout_fields`), its
    phrases indexed in ``world`` (default: the scenes' own; a concept's world adds a shape,
    :mod:`difflab.models.adapt_layout`)."""

    def __init__(self, scenes: CaptionedScenes, world: WorldConfig | None = None):
        self.scenes, self.world = scenes, world or scenes.world

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        return self.scenes[i] | layout_fields(self.scenes.scene(i), self.world)
