"""Fréchet distance between two sets of feature vectors (Heusel et al. 2017, Eq. 6):

    FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

FID is this distance in the feature space of an Inception network trained on ImageNet. difflab never
downloads weights, so it reports the same distance in a *stated* feature space instead, always with
its sample count (FD is biased upwards at small n, so only compare numbers with the same n and space).

Feature space ``pixels8``: images area-averaged to 8x8 and flattened (64 values per channel, in
[-1, 1]). It needs no trained network, so it cannot drift between releases; it sees colour, layout and
coarse shape, which is what the toy world and 8x8 digits are made of.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pixels8_features(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, C * 64): area-average to 8x8, flatten."""
    small = F.adaptive_avg_pool2d(images.float(), 8)  # (N, C, 8, 8)
    return small.flatten(1).cpu().double().numpy()


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via the symmetric form (S1^(1/2) S2 S1^(1/2))^(1/2),
    which has the same eigenvalues as S1 S2 and is symmetric, so ``eigh`` is exact and stable."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature arrays."""
    mu1, mu2 = feats1.mean(axis=0), feats2.mean(axis=0)
    s1, s2 = np.cov(feats1, rowvar=False), np.cov(feats2, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _sqrtm_trace(s1, s2))
