"""``DataConfig``: which images a run trains on (the toy world, scikit-learn's digits or a folder) and
the held-out images it is judged on. Shared by every image model: pixel and latent diffusion and the
autoencoder read their data through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from difflab.data.registry import DATASETS
from difflab.data.registry import make_dataset as make_registered
from difflab.errors import MAX_COUNT, MAX_SIZE, DifflabError, check_choice, check_int, check_seed
from difflab.world.scene import world_preset


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "toy"
    """'toy' (the toy world), 'digits' (scikit-learn's handwritten digits) or 'folder' (your images)."""
    world: str = "single32"
    """Toy-world preset; class labels (shape x colour) need a one-object world such as single32."""
    n: int = 100_000
    """Toy-world scenes in the training set (rendered on the fly: a large n costs nothing)."""
    seed: int = 0
    folder: str | None = None
    """Image folder for dataset='folder' (resized + centre-cropped to image_size)."""
    skip_bad: bool = False
    """dataset='folder': leave out (and count) files that are not readable images instead of stopping."""
    image_size: int = 32
    conditional: bool = True
    """Class-conditional (toy: shape x colour, digits: 0-9) with a null class for CFG; folders are not."""
    factorized_labels: bool = True
    """Toy world: embed shape and colour separately and add them (``UNetConfig.class_factors``), so every
    red circle also teaches the model about blue circles. False: one embedding per (shape, colour)."""

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        check_int("n", self.n, 1, MAX_COUNT)
        check_seed("seed", self.seed)
        check_int("image_size", self.image_size, 1, MAX_SIZE)
        if self.dataset == "toy":  # rendered at the world's own side: another size would fail in the loader
            side = world_preset(self.world).resolution
            if self.image_size != side:
                raise DifflabError(
                    f"data.image_size {self.image_size} does not match world '{self.world}' ({side}px); "
                    f"expected data.image_size={side}"
                )


def data_channels(data: DataConfig) -> int:
    return 1 if data.dataset == "digits" else 3


def num_classes(data: DataConfig) -> int | None:
    """Classes of a conditional dataset (without the null class), or None when unconditional."""
    if not data.conditional or data.dataset == "folder":
        return None
    if data.dataset == "digits":
        return 10
    return world_preset(data.world).num_classes


def class_factors(data: DataConfig) -> tuple[int, ...]:
    """(shapes, colours) for a factorised toy-world label, else () (one embedding per class)."""
    if data.dataset != "toy" or not data.conditional or not data.factorized_labels:
        return ()
    w = world_preset(data.world)
    return (len(w.shapes), len(w.colors))


HELD_OUT_SEED_OFFSET = 1_000_003
"""Toy scenes that judge a run come from ``data.seed + HELD_OUT_SEED_OFFSET``, a seed no run trains on."""


def held_out(data: DataConfig, n: int | None = None) -> DataConfig:
    """The data a run is judged on: toy scenes from a seed it never trained on (``n`` of them, when given);
    digits and folders as they are (they have no unseen seed to draw from)."""
    if data.dataset != "toy":
        return data
    return dataclasses.replace(
        data, seed=data.seed + HELD_OUT_SEED_OFFSET, n=data.n if n is None else max(n, 1)
    )


def held_out_images(data: DataConfig, n: int) -> torch.Tensor:
    """``n`` real images (N, C, H, W) of :func:`held_out` data, cycled where a dataset has fewer."""
    dataset = make_dataset(held_out(data, n))
    return torch.stack([dataset[i % len(dataset)]["image"] for i in range(n)])


def make_dataset(data: DataConfig, split: str = "train"):
    """The training set (or the digits' test split) of a config."""
    if data.dataset == "toy":
        cfg = world_preset(data.world)
        if cfg.resolution != data.image_size:
            raise DifflabError(
                f"data.image_size {data.image_size} does not match world '{data.world}' ({cfg.resolution}px)"
            )
        fields = ("image", "label") if data.conditional else ("image",)
        return make_registered("toy", cfg=cfg, n=data.n, seed=data.seed, fields=fields)
    if data.dataset == "digits":
        return make_registered("digits", split=split, size=data.image_size, seed=data.seed)
    if data.folder is None:
        raise DifflabError("dataset 'folder' needs data.folder=PATH (e.g. --set data.folder=~/pictures)")
    return make_registered("folder", root=data.folder, size=data.image_size, skip_bad=data.skip_bad)
