"""Timestep embeddings: how a network is told *how noisy* its input is."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal position embedding of Vaswani et al. (2017, Sec. 3.5), used for diffusion timesteps by
    Ho et al. (2020, Appendix B): ``[cos(t w_0), ..., cos(t w_{d/2-1}), sin(t w_0), ...]`` with
    ``w_i = max_period^(-i / (d/2))``. ``t`` may be fractional (continuous-time samplers).

    (B,) -> (B, dim)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features followed by a 2-layer MLP (Ho et al. 2020): (B,) -> (B, emb_dim)."""

    def __init__(self, base_dim: int, emb_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.base_dim))
