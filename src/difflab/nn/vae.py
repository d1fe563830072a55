"""The KL-regularised autoencoder of latent diffusion's first stage (Rombach et al. 2022, Sec. 3.1 and
Appendix G): an encoder to a diagonal Gaussian posterior q(z|x) over a latent f times smaller per side,
and a decoder back to pixels.

Latent diffusion trains its UNet on z instead of x: with f = 4 and c = 4 a 32x32x3 image becomes an
8x8x4 latent, 12x fewer numbers, and every UNet layer runs on a 16x smaller feature map. The KL term
(weighted ~1e-6 in the paper) only keeps the latent from drifting to arbitrary scales; the
reconstruction loss decides what is kept. ``difflab.models.vae`` trains it; ``difflab.models.ldm``
diffuses in its latent space.

Two layouts (``AutoencoderConfig.layout``), both ending in GroupNorm, SiLU, conv to 2c (mean,
log-variance); the decoder mirrors the encoder from c channels:
- 'pyramid', the paper's (f = 4): conv_in -> [res x N] -> down -> [res x N] -> down -> [res x N] ->
  middle (res, optional attention, res);
- 'patch' (the default here): pixel_unshuffle by f -> 1x1 conv -> [res x N], all at H/f, no middle
  blocks but the optional attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_int, check_ints
from difflab.nn.attention import SpatialAttention
from difflab.nn.resblock import Downsample, ResBlock, Upsample

LAYOUTS = ("patch", "pyramid")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of a KL autoencoder with downsampling factor f and c latent channels."""

    in_channels: int = 3
    image_size: int = 32
    downsample_factor: int = 4
    """f: one latent position stands for an f x f patch of pixels (a power of two, >= 2)."""
    latent_channels: int = 4
    """c: channels of the latent (Stable Diffusion: 4 at f = 8)."""
    layout: str = "patch"
    """'pyramid': the paper's encoder, convolutions at every resolution from H down to H/f (widths
    ``channels * channel_mult[i]``). 'patch': space-to-depth by f (``F.pixel_unshuffle``) and every block
    at the latent resolution, the decoder ending in ``F.pixel_shuffle`` (Shi et al. 2016): on a CPU it
    trains several times more steps per second (measured: docs/ldm.md), and toy scenes need no
    full-resolution features."""
    channels: int = 64
    """Width of the blocks (pyramid: of the first, full-resolution level)."""
    channel_mult: tuple[int, ...] = ()
    """Pyramid only: width multiplier per level, log2(f) + 1 of them; () means (1, 2, 2, ...)."""
    num_res_blocks: int = 2
    """Residual blocks per level. Pyramid: plus two in the middle, and the decoder has one more per level,
    as in the paper. Patch: exactly this many in the encoder and in the decoder."""
    mid_attention: bool = False
    """Self-attention between the middle blocks (the paper has it; at 8x8 and below it costs little)."""
    heads: int = 1
    norm_groups: int = 8

    def __post_init__(self) -> None:
        check_choice("autoencoder layout", self.layout, LAYOUTS)
        for name in ("in_channels", "image_size", "channels", "heads", "norm_groups"):
            check_int(name, getattr(self, name), 1, MAX_SIZE)
        check_ints("channel_mult", self.channel_mult, 1, MAX_SIZE)
        check_int("num_res_blocks", self.num_res_blocks, 0, MAX_SIZE)
        f = self.downsample_factor
        if not isinstance(f, int) or isinstance(f, bool) or f > MAX_SIZE:
            raise DifflabError(f"downsample_factor {f!r} is invalid; expected a power of two >= 2 (2, 4, 8)")
        if f < 2 or f & (f - 1):
            raise DifflabError(f"downsample_factor {f} is invalid; expected a power of two >= 2 (2, 4, 8)")
        if self.image_size % f:
            raise DifflabError(f"image_size {self.image_size} is not divisible by downsample_factor {f}")
        levels = f.bit_length()  # log2(f) + 1
        if self.layout == "pyramid" and self.channel_mult and len(self.channel_mult) != levels:
            raise DifflabError(
                f"channel_mult {self.channel_mult} has {len(self.channel_mult)} levels; downsample_factor {f} "
                f"needs {levels} (one per resolution from {self.image_size} down to {self.latent_size})"
            )
        for width in self.widths:
            if width % self.norm_groups:
                raise DifflabError(f"width {width} is not divisible by norm_groups={self.norm_groups}")
        if self.mid_attention and self.widths[-1] % self.heads:
            raise DifflabError(
                f"heads {self.heads} does not divide the middle attention width {self.widths[-1]}"
            )
        check_int("latent_channels", self.latent_channels, 1, MAX_SIZE)

    @property
    def widths(self) -> tuple[int, ...]:
        """Block width per resolution level, full resolution first (one level for 'patch')."""
        if self.layout == "patch":
            return (self.channels,)
        mult = self.channel_mult or (1,) + (2,) * (self.downsample_factor.bit_length() - 1)
        return tuple(self.channels * m for m in mult)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, H/f, W/f)."""
        return (self.latent_channels, self.latent_size, self.latent_size)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from the encoder's (B, 2c, h, w) output."""

    def __init__(self, params: torch.Tensor):
        self.mean, logvar = params.chunk(2, dim=1)  # (B, c, h, w) each
        # The paper's clamp: exp(+-) of an untrained encoder's output must not overflow.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterisation trick, Kingma & Welling 2014, Sec. 2.4)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over the latent (Kingma & Welling 2014, Appendix B):
        0.5 * sum(mean^2 + var - 1 - logvar). (B,)"""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


def _middle(width: int, cfg: AutoencoderConfig) -> list[nn.Module]:
    """The pyramid's middle at the latent resolution: res, (attention), res. The patch layout works at
    that resolution throughout, so its middle is only the attention (if any)."""
    attention = [SpatialAttention(width, cfg.heads, cfg.norm_groups)] if cfg.mid_attention else []
    if cfg.layout == "patch":
        return attention
    return [
        ResBlock(width, width, None, cfg.norm_groups),
        *attention,
        ResBlock(width, width, None, cfg.norm_groups),
    ]


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, 2c, H/f, W/f): the posterior's mean and log-variance."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        f, groups, widths = cfg.downsample_factor, cfg.norm_groups, cfg.widths
        layers: list[nn.Module] = []
        if cfg.layout == "patch":
            # (B, C, H, W) -> (B, C f^2, H/f, W/f): each f x f patch becomes one position's channels.
            layers += [nn.PixelUnshuffle(f), nn.Conv2d(cfg.in_channels * f * f, widths[0], 1)]
            width = widths[0]
            layers += [ResBlock(width, width, None, groups) for _ in range(cfg.num_res_blocks)]
        else:
            layers.append(nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1))
            width = widths[0]
            for level, w in enumerate(widths):
                for _ in range(cfg.num_res_blocks):
                    layers.append(ResBlock(width, w, None, groups))
                    width = w
                if level < len(widths) - 1:
                    layers.append(Downsample(width))
        layers += _middle(width, cfg)
        layers += [
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, 2 * cfg.latent_channels, 3, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """(B, c, H/f, W/f) -> (B, C, H, W)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        f, groups, widths = cfg.downsample_factor, cfg.norm_groups, cfg.widths
        width = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, width, 3, padding=1), *_middle(width, cfg)]
        if cfg.layout == "patch":
            layers += [ResBlock(width, width, None, groups) for _ in range(cfg.num_res_blocks)]
            # (B, C f^2, H/f, W/f) -> (B, C, H, W): each position paints its own f x f patch.
            out = [nn.Conv2d(width, cfg.in_channels * f * f, 3, padding=1), nn.PixelShuffle(f)]
        else:
            for level, w in reversed(list(enumerate(widths))):
                for _ in range(cfg.num_res_blocks + 1):
                    layers.append(ResBlock(width, w, None, groups))
                    width = w
                if level > 0:
                    layers.append(Upsample(width))
            out = [nn.Conv2d(width, cfg.in_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers, nn.GroupNorm(groups, width), nn.SiLU())
        self.conv_out, self.to_pixels = out[0], nn.Sequential(*out[1:])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_pixels(self.conv_out(self.layers(z)))


class KLAutoencoder(nn.Module):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``; ``forward(x, generator)`` reconstructs
    through a posterior sample and returns ``(reconstruction, posterior)``."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check(self, x: torch.Tensor, what: str, expected: tuple[int, int, int]) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise DifflabError(
                f"{what} of shape {tuple(x.shape)} is invalid; expected (B, {', '.join(map(str, expected))})"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        c, s = self.cfg.in_channels, self.cfg.image_size
        self._check(x, "image batch", (c, s, s))
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, "latent batch", self.cfg.latent_shape)
        return self.decoder(z)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output kernel: the adaptive GAN weight balances gradients here (Esser et al. 2021)."""
        return self.decoder.conv_out.weight

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
