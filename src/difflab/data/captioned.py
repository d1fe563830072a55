"""Captioned toy-world scenes: the one dataset CLIP and text-to-image train on.

Item i is scene i of the world with one fixed caption, drawn by a *captioner* (each model says how it
captions: CLIP mixes full descriptions and random true captions and may add a false caption one edit
away; text-to-image adds short GenEval-form captions) from the item's own random stream
``default_rng([seed, i, stream])``. Everything is a pure function of (world, seed, i), so a resumed run
and every DDP rank see the same pairs.

Scenes that show a held-out (colour, shape) pair are redrawn from seed ``seed + k * REDRAW_SEED``
(k = 1, 2, ...), so that no image of such a pair is ever seen; with no held-out pairs scene i is the
toy dataset's own (:class:`difflab.data.toy.ToyWorldDataset`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from difflab.data.toy import scene_image
from difflab.errors import DifflabError
from difflab.world.geneval import mentions_heldout
from difflab.world.prompts import Prompt
from difflab.world.scene import Scene, WorldConfig, scene_at

CLIP_CAPTIONS, T2I_CAPTIONS = 11, 21
"""The random streams of CLIP's and text-to-image's captions (the toy dataset's own fields use 1-3): two,
so that each model keeps the captions it has always drawn for scene i."""
REDRAW_SEED = 7_919
"""Seed step between redraws of a scene that shows a held-out pair."""
SCENE_CACHE = 32_768
"""Scenes a dataset keeps once drawn (a few tens of MB): all of a text-to-image run's 20,000, revisited each
epoch; a planner's 400,000 are each seen once, and it keeps only the last ones."""


class Caption(NamedTuple):
    text: str
    prompt: Prompt
    """What the text says, structured (true of the scene by construction)."""
    negative: str | None = None
    """A false caption one edit away (NegCLIP's hard negative), when the captioner makes one."""


Captioner = Callable[[Scene, np.random.Generator], Caption]


class CaptionedScenes(Dataset):
    """``{"image"}`` (or the cached ``latents`` of item i, e.g. the posterior ``"mean"`` and ``"std"``)
    plus, with a ``tokenizer``, the caption's ``"ids"`` and ``"mask"`` (and ``"neg_ids"``, ``"neg_mask"``
    for a hard negative); ``with_text`` adds the strings (``"caption"``, ``"negative"``)."""

    def __init__(self, world: WorldConfig, n: int, seed: int, captioner: Captioner, *, stream: int,
                 tokenizer=None, heldout=(), latents: dict[str, np.ndarray] | None = None,
                 with_text: bool = False):  # fmt: skip
        self.world, self.n, self.seed = world, int(n), int(seed)
        self.captioner, self.stream, self.tokenizer, self.with_text = captioner, stream, tokenizer, with_text
        self.heldout = set(map(tuple, heldout))
        self.latents = None if latents is None else {k: torch.from_numpy(v) for k, v in latents.items()}
        self._scenes: OrderedDict[int, Scene] = OrderedDict()  # the last SCENE_CACHE scenes drawn

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        if i in self._scenes:  # drawing is a third of an item's cost, and an item asks twice with a layout
            self._scenes.move_to_end(i)
            return self._scenes[i]
        for k in range(1000):
            scene = scene_at(self.world, self.seed + k * REDRAW_SEED, i)
            if not mentions_heldout(scene, self.heldout):
                self._scenes[i] = scene
                if len(self._scenes) > SCENE_CACHE:
                    self._scenes.popitem(last=False)
                return scene
        raise DifflabError(f"could not draw a scene without the held-out pairs {sorted(self.heldout)}")

    def caption(self, i: int, scene: Scene | None = None) -> Caption:
        """The caption of item ``i`` (whose ``scene`` may be passed in when already drawn)."""
        scene = scene if scene is not None else self.scene(i)
        return self.captioner(scene, np.random.default_rng([self.seed, i, self.stream]))

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        if self.latents is None:
            item = {"image": scene_image(scene, self.world)}
        else:
            item = {k: v[i] for k, v in self.latents.items()}
        if self.tokenizer is None:
            return item
        text, _, negative = self.caption(i, scene)
        ids, mask = self.tokenizer.encode(text)
        item |= {"ids": ids[0], "mask": mask[0]}
        if negative is not None:
            ids, mask = self.tokenizer.encode(negative)
            item |= {"neg_ids": ids[0], "neg_mask": mask[0]}
        if self.with_text:
            item["caption"] = text
            if negative is not None:
                item["negative"] = negative
        return item
