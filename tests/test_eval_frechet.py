"""Fréchet distance against closed forms."""

import numpy as np
import pytest
import torch

from difflab.eval.frechet import frechet_distance, pixels8_features


def test_identical_sets_have_zero_distance():
    x = np.random.default_rng(0).normal(size=(500, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_mean_shift_adds_squared_norm():
    x = np.random.default_rng(0).normal(size=(400, 5))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx((shift**2).sum(), rel=1e-9)


def test_isotropic_gaussians_closed_form():
    # For N(0, a^2 I) and N(0, b^2 I) in d dimensions: FD = d (a - b)^2, up to sampling error.
    rng = np.random.default_rng(1)
    d, a, b = 4, 1.0, 2.0
    x, y = a * rng.normal(size=(20000, d)), b * rng.normal(size=(20000, d))
    assert frechet_distance(x, y) == pytest.approx(d * (a - b) ** 2, rel=0.05)


def test_matches_scipy_sqrtm_on_non_commuting_covariances():
    import scipy.linalg as scipy_linalg  # an independent sqrtm; scipy comes with the dev extra's scikit-learn

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    y = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_pixels8_features_shape_and_averaging():
    img = torch.zeros(2, 3, 32, 32)
    img[:, 0, :4, :4] = 1.0  # exactly one 8x8 cell (4x4 pixels) of channel 0
    f = pixels8_features(img)
    assert f.shape == (2, 192) and f[0, 0] == 1.0 and f[0, 1:].sum() == 0.0
