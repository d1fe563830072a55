"""The captioned scenes text-to-image systems train on: which world, how captions are drawn, which
(colour, shape) pairs are held out. The SD-style model, its layout planner and its grounded painter
(:mod:`difflab.models.t2i`, :mod:`difflab.models.planner`) all read one :class:`TextDataConfig`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difflab.data.captioned import T2I_CAPTIONS, Caption, CaptionedScenes, Captioner
from difflab.errors import MAX_COUNT, DifflabError, check_int, check_seed
from difflab.world.geneval import HELDOUT_PAIRS
from difflab.world.language import caption, description, short_caption
from difflab.world.scene import Scene, WorldConfig, world_preset


@dataclass(frozen=True)
class TextDataConfig:
    world: str = "scene32"
    """Toy-world preset of the training scenes (scene32: one or two objects; scene64: one to four)."""
    n: int = 100_000
    seed: int = 0
    describe_prob: float = 0.25
    """Probability that a caption is the scene's full description."""
    short_prob: float = 0.0
    """Probability that a caption is a short form ('a red circle and a blue square', the forms people type
    and GenEval asks: :func:`difflab.world.language.short_caption`); the rest are random partial captions
    that name sizes and positions at random (:func:`difflab.world.language.caption`)."""
    heldout_pairs: tuple[str, ...] = tuple(f"{c} {s}" for c, s in HELDOUT_PAIRS)
    """'colour shape' pairs no training scene contains (--set 'data.heldout_pairs=' for none)."""
    min_objects: int | None = None
    """At least this many objects in every training scene (None: the world's own range). On scene32,
    2 trains on two-object scenes only, where every composition (position, binding, counting) is learned;
    single objects are still named by the partial captions ('a circle' of a two-object scene). What it did
    on the demo is in docs/t2i.md."""

    def __post_init__(self) -> None:
        check_int("n", self.n, 1, MAX_COUNT)
        check_seed("seed", self.seed)
        if not 0.0 <= self.describe_prob <= 1.0:
            raise DifflabError(
                f"describe_prob {self.describe_prob} is invalid; expected a probability in [0, 1]"
            )
        if not 0.0 <= self.short_prob <= 1.0 - self.describe_prob:
            raise DifflabError(
                f"short_prob {self.short_prob} is invalid; expected a probability in [0, 1 - describe_prob "
                f"= {1.0 - self.describe_prob:g}]"
            )
        world = world_preset(self.world)
        if self.min_objects is not None and not world.min_objects <= self.min_objects <= world.max_objects:
            raise DifflabError(
                f"min_objects {self.min_objects} is invalid; the '{self.world}' world has "
                f"{world.min_objects} to {world.max_objects} objects per scene"
            )
        for pair in self.heldout_pairs:
            words = pair.split()
            if len(words) != 2 or words[0] not in world.colors or words[1] not in world.shapes:
                raise DifflabError(
                    f"held-out pair '{pair}' is invalid; expected 'colour shape' with a colour of "
                    f"{', '.join(world.colors)} and a shape of {', '.join(world.shapes)}"
                )

    @property
    def image_size(self) -> int:
        return world_preset(self.world).resolution

    def world_config(self) -> WorldConfig:
        """The world the training scenes are drawn from: the preset, with ``min_objects`` if set."""
        if self.min_objects is None:
            return world_preset(self.world)
        return world_preset(self.world, min_objects=self.min_objects)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The held-out pairs as (colour, shape) tuples."""
        return tuple(tuple(p.split()) for p in self.heldout_pairs)


def captioner(data: TextDataConfig) -> Captioner:
    """Text-to-image captions: the full description with probability ``describe_prob``, a short
    GenEval-form caption with probability ``short_prob``, else a random partial caption."""

    def caption_of(scene: Scene, rng: np.random.Generator) -> Caption:
        u = rng.random()  # one draw picks the kind, so short_prob = 0 keeps earlier runs' captions
        if u < data.describe_prob:
            prompt = description(scene)
            return Caption(prompt.text(), prompt)
        if u < data.describe_prob + data.short_prob:
            return Caption(*short_caption(scene, rng))
        return Caption(*caption(scene, rng))

    return caption_of


def captioned_scenes(data: TextDataConfig, tokenizer=None, latents: dict[str, np.ndarray] | None = None):
    """Scene i of the world (redrawn while it shows a held-out pair) with one fixed true caption,
    tokenized (``{"ids", "mask"}``, with a ``tokenizer``), and either ``"image"`` or, given cached
    ``latents``, the posterior ``"mean"`` and ``"std"``."""
    return CaptionedScenes(data.world_config(), data.n, data.seed, captioner(data), stream=T2I_CAPTIONS,
                           tokenizer=tokenizer, heldout=data.pairs(), latents=latents)  # fmt: skip
