"""Handwritten digits (scikit-learn's copy of the UCI optical digits: 1,797 images, 8x8, values 0..16).

The smallest *real* class-conditional image set there is, and it ships inside scikit-learn, so pixel
diffusion can be tried on real data with no download. Images are upsampled to ``size`` (default 32,
the toy world's side) by ``torch.nn.functional.interpolate`` with ``align_corners=False``:

- ``bilinear`` (default): smooth strokes, the look a generative model can match;
- ``bicubic``: smoother, clipped back to the value range (bicubic overshoots);
- ``nearest``: the original 8x8 blocks (torch's ``nearest-exact``, which samples pixel centres as PIL
  does; plain ``nearest`` is off by half a pixel at non-integer scales).

``image`` is float32 ``(channels, size, size)`` in [-1, 1] (0 -> -1, 16 -> 1); ``channels=3`` repeats
the grey channel for models built for RGB. ``label`` is the digit, 0..9.

The split is fixed and stratified: in every class, ``test_fraction`` of its images (rounded) chosen by a
permutation from ``numpy.random.default_rng(seed)`` are the test set and the rest train; the two never
overlap and depend on nothing but ``seed``. The pixel-diffusion experiments train a separate classifier
on ``train`` and report its accuracy on ``test`` before trusting it to judge generated digits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from difflab.errors import DifflabError, check_choice

SPLITS = ("train", "test", "all")
INTERPOLATIONS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}
NUM_CLASSES = 10
_MAX_VALUE = 16.0  # load_digits pixels are counts of set pixels in 4x4 blocks: 0..16


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float64 in 0..16, labels (1797,) int)`` from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DifflabError(
            "the digits dataset needs scikit-learn, which is not installed; "
            "run: pip install 'difflab[digits]'"
        ) from None
    d = load_digits()
    return d.images, d.target


def split_indices(labels: np.ndarray, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``split``: per class, the first ``round(test_fraction * count)`` of a seeded
    permutation are test, the others train."""
    check_choice("split", split, SPLITS)
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: int(round(test_fraction * len(members)))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits, upsampled, as ``{"image": (C, size, size) in [-1, 1], "label": int}``.

    All images are prepared once at construction (1,797 x 32 x 32 floats is 7 MB); ``images`` and
    ``labels`` hold the whole split as tensors for code that wants it in one piece (a classifier).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        interpolation: str = "bilinear",
        channels: int = 1,
        test_fraction: float = 0.1,
        seed: int = 0,
    ):
        check_choice("split", split, SPLITS)
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
            raise DifflabError(f"digit image size {size!r} is invalid; expected an integer in 8..1024 pixels")
        if channels not in (1, 3):
            raise DifflabError(f"channels={channels!r} is invalid; expected 1 (grey) or 3 (grey as RGB)")
        if not 0.0 < test_fraction < 1.0:
            raise DifflabError(f"test_fraction={test_fraction!r} is invalid; expected a fraction in (0, 1)")
        self.split, self.size, self.interpolation, self.channels = split, size, interpolation, channels
        self.test_fraction, self.seed = test_fraction, seed

        images, labels = load_digits_arrays()
        self.indices = split_indices(labels, split, test_fraction, seed)
        x = torch.from_numpy(images[self.indices]).to(torch.float32)[:, None] / _MAX_VALUE  # (N, 1, 8, 8)
        if size != x.shape[-1]:
            mode = INTERPOLATIONS[interpolation]
            corners = {} if mode == "nearest-exact" else {"align_corners": False}
            x = F.interpolate(x, size=(size, size), mode=mode, **corners).clamp(0.0, 1.0)
        self.images = (x * 2.0 - 1.0).expand(-1, channels, -1, -1).contiguous()  # (N, C, size, size)
        self.labels = torch.from_numpy(labels[self.indices]).to(torch.int64)

    num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index].clone(), "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return (
            f"DigitsDataset(split={self.split!r}, n={len(self)}, size={self.size}, "
            f"interpolation={self.interpolation!r}, channels={self.channels})"
        )
