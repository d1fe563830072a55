"""A perceptual distance that needs no downloaded weights: LPIPS over a frozen, randomly initialised
conv net.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
Eq. 1) compares two images through the features of a network:

    d(x, y) = sum_l 1/(H_l W_l) sum_{h,w} || w_l * (f^l_x[h,w] - f^l_y[h,w]) ||_2^2

where ``f^l`` are the layer-``l`` features unit-normalised along channels and ``w_l`` are per-channel
weights learned from human judgements. We keep the normalisation and the spatial mean, set ``w_l = 1``,
and average (rather than sum) over layers so the scale does not grow with depth.

Why random weights are enough: Zhang et al. (2018, Sec. 4, Fig. 4) include randomly initialised
networks among their baselines and find deep features useful across architectures and kinds of
supervision, with trained weights best; Amir & Weiss (2021, "Understanding and Simplifying Perceptual
Distances", CVPR) show that a deep CNN with random filters gives a loss of similar success, and prove
that in the infinitely wide limit its perceptual distance is a maximum mean discrepancy between the
local patch distributions of the two images: the filters need not be learned, only many and varied.
So a seed replaces a VGG download: the net is rebuilt bit for bit from ``seed``, holds no parameters
and adds nothing to a checkpoint. Expect a trained LPIPS to agree with human judgements more closely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError


class RandomFeaturePerceptualLoss(nn.Module):
    """Per-sample LPIPS-style distance (Zhang et al. 2018, Eq. 1, uniform channel weights) through a
    frozen random conv net: ``forward(x, y)`` with x, y (B, C, H, W) -> (B,).

    Stage ``i`` is conv3x3 (``widths[i]`` channels) + ReLU; a 2x average pool sits between stages, so
    the inputs need ``H, W >= 2 ** (len(widths) - 1)``. The compared layers are the input itself and
    each stage's output. Weights are Kaiming-normal (He et al. 2015, Eq. 10: std = sqrt(2 / fan_in))
    drawn from a local ``torch.Generator(seed)``, so building one never moves the global RNG.

    Each layer's term is a mean over pixels of ``||a - b||^2`` for two (at most) unit vectors, so the
    distance lies in [0, 4]. The convs have no bias, so every layer is positively homogeneous and its
    normalised features ignore a global scale: ``d(x, a * x) = 0`` for any ``a > 0`` (up to the eps).
    A decoder trained on this alone could get the contrast wrong for free; pair it with a pixel loss,
    as Esser et al. (2021) and Rombach et al. (2022) pair L1 with LPIPS.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128), seed: int = 0):
        super().__init__()
        if not widths:
            raise DifflabError("RandomFeaturePerceptualLoss needs at least one stage width; got widths=()")
        self.in_channels = in_channels
        self.widths = tuple(widths)
        self.seed = seed
        # A private CPU generator: reproducible from ``seed`` on any device, and the caller's training
        # RNG stream (data order, noise draws) is the same whether or not this loss is built.
        gen = torch.Generator().manual_seed(seed)
        c_in = in_channels
        for i, c_out in enumerate(self.widths):
            fan_in = c_in * 3 * 3
            weight = torch.randn(c_out, c_in, 3, 3, generator=gen) * math.sqrt(2.0 / fan_in)
            # Non-persistent buffers: they follow ``.to(device)`` but are not parameters (nothing to
            # train, nothing for an optimiser to find) and stay out of ``state_dict`` (rebuilt from seed).
            self.register_buffer(f"weight{i}", weight, persistent=False)
            c_in = c_out

    def _weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight{i}") for i in range(len(self.widths))]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The compared layers: ``[x, stage_1(x), ..., stage_n(x)]``, each (B, C_l, H_l, W_l)."""
        feats = [x]
        h = x
        for i, weight in enumerate(self._weights()):
            if i > 0:
                h = F.avg_pool2d(h, 2)  # (B, C, H/2, W/2)
            h = F.relu(F.conv2d(h, weight.to(h.dtype), padding=1))
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise DifflabError(
                f"perceptual loss needs two images of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DifflabError(
                f"perceptual loss expects (B, {self.in_channels}, H, W) images; got {tuple(x.shape)}"
            )
        min_size = 2 ** (len(self.widths) - 1)
        if min(x.shape[-2:]) < min_size:
            raise DifflabError(
                f"perceptual loss with {len(self.widths)} stages needs images of at least "
                f"{min_size}x{min_size}; got {x.shape[-2]}x{x.shape[-1]}"
            )
        # One pass over the concatenated pair: half the kernel launches of two passes.
        feats = self.features(torch.cat([x, y]))  # each (2B, C_l, H_l, W_l)
        per_layer = []
        for f in feats:
            fx, fy = _unit_normalise(f).chunk(2)  # (B, C_l, H_l, W_l) each
            per_layer.append((fx - fy).pow(2).mean(dim=(2, 3)).sum(dim=1))  # (B,)
        return torch.stack(per_layer).mean(dim=0)  # (B,)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, widths={self.widths}, seed={self.seed}"


def _unit_normalise(f: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``f / ||f||_2`` along channels (the hat in Zhang et al. 2018, Eq. 1).

    ``rsqrt(||f||^2 + eps)`` rather than LPIPS's ``f / (||f|| + 1e-10)``: where a pixel's vector is all
    zeros (every channel off after a ReLU, or a mid-grey input pixel in [-1, 1]) the latter's gradient is
    1e10 or, through sqrt, NaN; here it is at most ``eps ** -0.5 = 100``. Typical squared norms are O(1)
    per channel, so the eps does not bias the distance elsewhere.
    """
    return f * torch.rsqrt(f.pow(2).sum(dim=1, keepdim=True) + eps)
