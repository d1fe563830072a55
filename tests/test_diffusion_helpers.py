"""Shared pieces of the tests/test_diffusion_*.py files (this module holds no tests itself).

- ``rel_err``: the relative error used against diffusers, max |ours - ref| / max |ref|.
- ``mixture``: the analytic data most tests sample from.
"""

from __future__ import annotations

import torch

from difflab.diffusion.analytic import GaussianMixture


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def mixture(dim: int = 8, k: int = 3, std: float = 0.3, seed: int = 0) -> GaussianMixture:
    """A k-component Gaussian mixture in ``dim`` dimensions with unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64)
    weights = torch.arange(1, k + 1, dtype=torch.float64)
    return GaussianMixture(means, std, weights / weights.sum())
