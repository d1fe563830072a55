"""A Vision Transformer (Dosovitskiy et al. 2021), the image tower of CLIP (Radford et al. 2021).

    image (B, C, H, W)
      -> patches: a P x P convolution with stride P             (B, D, H/P, W/P) -> (B, N, D), N = HW/P^2
         (or a convolutional stem of stride P, see ``ViTConfig.stem``)
      -> prepend a learned [CLS] token, add learned positions   (B, N + 1, D)
      -> LayerNorm ("ln_pre", as in CLIP's ViT), pre-norm transformer blocks, LayerNorm
      -> pooled: the [CLS] token (or the mean of the patch tokens)            (B, D)

The patch tokens are returned too: a LLaVA-style model feeds them to its language model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_int
from difflab.nn.transformer import Transformer, check_mlp_ratio

POOLING = ("cls", "mean", "max")
STEMS = ("patch", "conv")


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = "cls"
    """'cls' (the [CLS] token, as CLIP), 'mean' (average of the patch tokens) or 'max' (each feature's
    largest value over the patch tokens, which keeps a small object's response from being averaged away
    by the background that fills most of a toy scene)."""
    stem: str = "patch"
    """'patch': one P x P convolution of stride P (Dosovitskiy et al.). 'conv': 3 x 3 convolutions, one of
    stride 1 then log2(P) of stride 2, then a 1 x 1 projection (Xiao et al. 2021, "Early convolutions help
    transformers see better"): on the toy world's small shapes it learns shape far faster."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "width", "depth", "heads"):
            check_int(name, getattr(self, name), 1, MAX_SIZE)
        check_mlp_ratio(self.mlp_ratio, self.width)
        if self.image_size % self.patch_size:
            raise DifflabError(
                f"patch_size {self.patch_size} does not divide image_size {self.image_size}; "
                "expected a divisor such as 4 or 8"
            )
        if self.width % self.heads:
            raise DifflabError(f"ViT width {self.width} is not divisible by heads={self.heads}")
        check_choice("pooling", self.pool, POOLING)
        check_choice("ViT stem", self.stem, STEMS)
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise DifflabError(f"a conv stem needs a power-of-two patch_size; got {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def conv_stem(cfg: ViTConfig) -> nn.Sequential:
    """(B, C, H, W) -> (B, width, H/P, W/P): a 3 x 3 convolution at full resolution (width/4 channels), then
    3 x 3 stride-2 convolutions that double the channels up to ``width``, each followed by GELU, then a 1 x 1
    convolution. Its receptive field overlaps neighbouring patches, which a patchify layer's does not."""
    layers: list[nn.Module] = []
    channels = max(cfg.width // 4, 8)
    layers += [nn.Conv2d(cfg.in_channels, channels, 3, padding=1), nn.GELU()]
    for _ in range(cfg.patch_size.bit_length() - 1):  # log2(P) halvings
        out = min(channels * 2, cfg.width)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GELU()]
        channels = out
    layers.append(nn.Conv2d(channels, cfg.width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """(B, C, H, W) -> (pooled (B, width), tokens (B, 1 + N, width)), after the final LayerNorm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = (
            conv_stem(cfg)
            if cfg.stem == "conv"
            else nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        )
        # Scaled as in CLIP (width^-0.5): unit-variance embeddings next to the patch projections.
        scale = cfg.width**-0.5
        self.cls_token = nn.Parameter(scale * torch.randn(cfg.width))
        self.pos_embed = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.norm_post = nn.LayerNorm(cfg.width)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        size = self.cfg.image_size
        if (h, w) != (size, size):
            raise DifflabError(f"the ViT was built for {size}x{size} images; got {h}x{w}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(b, 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        x = self.norm_post(self.transformer(self.norm_pre(x)))
        if self.cfg.pool == "cls":
            pooled = x[:, 0]
        elif self.cfg.pool == "mean":
            pooled = x[:, 1:].mean(dim=1)
        else:  # each feature's strongest response anywhere in the image
            pooled = x[:, 1:].amax(dim=1)
        return pooled, x
