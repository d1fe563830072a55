"""Does a class-conditional sample show the class it was asked for?

Two judges, both independent of the model being judged:
- toy world: the world's reader (pixels -> scene). A sample passes when the reader finds exactly one
  object and it has the requested shape and colour.
- digits: a support-vector classifier (scikit-learn's ``SVC``, RBF kernel) trained on the *real* training
  digits, seen through the same 8x8 area-average as the samples; its accuracy on the real held-out
  digits is reported next to every score it gives, so the judge is measured too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from difflab.data.digits import DigitsDataset
from difflab.world.reader import read
from difflab.world.scene import WorldConfig


def toy_class_hits(images: torch.Tensor, labels: torch.Tensor, cfg: WorldConfig) -> np.ndarray:
    """For (N, 3, H, W) samples in [-1, 1] and their requested class labels: a boolean per sample, true
    when the reader sees exactly one object with the requested shape and colour."""
    hits = []
    for image, label in zip(images, labels.tolist(), strict=True):
        shape, color = cfg.class_name(int(label))
        objs = read(image, cfg).objects
        hits.append(len(objs) == 1 and objs[0].shape == shape and objs[0].color == color)
    return np.array(hits, dtype=bool)


def _digit_features(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, 64): grey, area-averaged to the digits' native 8x8."""
    grey = images.float().mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, 8).flatten(1).cpu().numpy()


@dataclass
class DigitsJudge:
    """An SVC trained on real training digits at the given size; ``heldout_accuracy`` is its accuracy
    on the real test split (the judge's own error rate)."""

    size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        from sklearn.svm import SVC

        train = DigitsDataset("train", size=self.size, seed=self.seed)
        test = DigitsDataset("test", size=self.size, seed=self.seed)
        self.svc = SVC(kernel="rbf", C=10.0, gamma="scale").fit(
            _digit_features(train.images), train.labels.numpy()
        )
        self.heldout_accuracy = float((self.predict(test.images) == test.labels.numpy()).mean())
        self.heldout_n = len(test)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svc.predict(_digit_features(images))
