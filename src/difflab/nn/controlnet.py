r"""ControlNet (Zhang, Rao & Agrawala 2023): steer a frozen diffusion UNet with a spatial condition.

A frozen block F(.; Theta) is joined by a trainable copy of itself, Theta_c, that reads the condition c
through zero-initialised 1x1 convolutions Z (Eq. 2):

.. math:: y_c = F(x; \Theta) + Z(F(x + Z(c; \Theta_{z1}); \Theta_c); \Theta_{z2})

For the UNet (Sec. 3.2, Fig. 3) the copy is the encoder and the middle block. The condition image enters
after the copy's first convolution through a small hint encoder (the paper's E, four strided convolutions;
its last layer zero here, as diffusers does), and each of the copy's outputs, one per skip connection and
one for the middle block, goes through its own zero convolution and is *added* to the frozen UNet's skip
or middle feature (Eq. 3's residuals, :meth:`difflab.nn.unet.UNet.decode`).

Why zeros: at step 0 every residual is exactly 0, so the controlled model is the base model bit for bit
and training starts from what it already draws; yet the gradient into a zero convolution's weight is the
feature it multiplies, not zero, so the zeros move at the first step (Sec. 3.1's argument). The copy starts
from the base's weights: it already understands noisy latents, and learns only where to put them.

:class:`ControlledUNet` runs a frozen base with several ControlNets, each with its own scale, their
residuals summed (Sec. 3.5, "multiple conditions").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nn.unet import UNet, UNetConfig


def zero_conv(width: int) -> nn.Conv2d:
    """A 1x1 convolution whose weight and bias start at 0 (the paper's 'zero convolution')."""
    conv = nn.Conv2d(width, width, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """The condition image c (B, C_hint, S, S) in [0, 1] -> a feature (B, width, S / factor, S / factor) at
    the UNet's input side: 3x3 convolutions with SiLU, one stride-2 stage per halving (a latent UNet on
    f = 2 latents: one), the last convolution zero-initialised (Zhang et al. 2023, Sec. 3.2's E)."""

    def __init__(self, in_channels: int, width: int, factor: int, hidden: tuple[int, ...] = (16, 32)):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise DifflabError(
                f"hint factor {factor} is invalid; expected a power of two (image side / UNet side)"
            )
        halvings = int(math.log2(factor))
        widths = [hidden[min(i, len(hidden) - 1)] for i in range(halvings + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [
                nn.Conv2d(a, a, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(a, b, 3, padding=1, stride=2),
                nn.SiLU(),
            ]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(widths[-1], width, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(hint))


class ControlNet(nn.Module):
    """A trainable copy of a UNet's encoder and middle block that reads a condition image.
    ``forward(x, t, hint, **unet_kwargs)`` -> residuals, one per skip connection of the base and one for
    its middle block (each (B, C_i, H_i, W_i)), all zero at initialisation."""

    def __init__(self, unet_cfg: UNetConfig, hint_channels: int, hint_size: int,
                 hint_hidden: tuple[int, ...] = (16, 32)):  # fmt: skip
        super().__init__()
        if hint_size % unet_cfg.image_size:
            raise DifflabError(f"condition side {hint_size} is not a multiple of the UNet's side "
                               f"{unet_cfg.image_size}")  # fmt: skip
        self.hint_channels = hint_channels
        self.copy = UNet(unet_cfg, encoder_only=True)
        self.hint = HintEncoder(
            hint_channels, unet_cfg.channels, hint_size // unet_cfg.image_size, hint_hidden
        )
        self.zero = nn.ModuleList(zero_conv(w) for w in self.copy.skip_widths)
        self.zero_mid = zero_conv(self.copy.mid_width)

    def copy_base(self, base: UNet) -> ControlNet:
        """Start the copy from the base's weights (Sec. 3.1: Theta_c <- Theta); returns self."""
        missing, _ = self.copy.load_state_dict(base.state_dict(), strict=False)  # the decoder is left out
        if missing:
            raise DifflabError(
                f"the base UNet lacks {missing[:3]}...; expected the architecture of this ControlNet"
            )
        return self

    def forward(self, x, t, hint, class_labels=None, context=None, context_mask=None, pooled=None,
                grounding=None, grounding_mask=None, grounding_boxes=None) -> list[torch.Tensor]:  # fmt: skip
        emb = self.copy.embed(x, t, class_labels, context, context_mask, pooled)
        text = (context, context_mask, grounding, grounding_mask, grounding_boxes)
        h, skips = self.copy.encode(x, emb, text, hint=self.hint(hint))
        return [z(s) for z, s in zip(self.zero, skips, strict=True)] + [self.zero_mid(h)]


def unet_of(network: nn.Module) -> nn.Module:
    """The UNet of a network: itself, or the ``.unet`` a text-conditioned network holds."""
    return getattr(network, "unet", network)


def controlled_forward(base: nn.Module, controlnets, scales, x, t, control_hint=None, **cond) -> torch.Tensor:
    """The base network's output with the ControlNets' residuals, each times its scale, summed (Eq. 3).
    ``base`` is a UNet or a network with a UNet inside (``.unet``) that turns a condition into its
    keyword arguments (``.prepare``: a text refiner, grounding tokens), which the copies read too.
    ``control_hint`` (B, sum of the nets' hint channels, S, S): each net takes its own channels."""
    unet = unet_of(base)
    if not isinstance(unet, UNet):
        raise DifflabError(f"a ControlNet steers a UNet; this base is a {type(unet).__name__}")
    kwargs = base.prepare(**cond) if hasattr(base, "prepare") else cond
    control = None
    if control_hint is not None and controlnets:
        hints = (
            (control_hint,)
            if len(controlnets) == 1
            else control_hint.split([net.hint_channels for net in controlnets], dim=1)
        )  # one net's hint whole: under DDP the net is a wrapper without hint_channels
        for net, scale, hint in zip(controlnets, scales, hints, strict=True):
            residuals = [scale * r for r in net(x, t, hint, **kwargs)]
            control = (
                residuals if control is None else [a + b for a, b in zip(control, residuals, strict=True)]
            )
    return unet(x, t, control=control, **kwargs)


class ControlledUNet(nn.Module):
    """A frozen base network and ControlNets with their conditioning scales, as one denoiser:
    ``forward(x, t, control_hint=None, **cond)``; without a hint it is the base."""

    def __init__(self, base: nn.Module, controlnets: list[ControlNet], scales: list[float]):
        super().__init__()
        if len(controlnets) != len(scales):
            raise DifflabError(
                f"{len(controlnets)} ControlNets and {len(scales)} scales; expected one scale each"
            )
        self.base, self.controlnets, self.scales = base, nn.ModuleList(controlnets), list(scales)

    def forward(self, x, t, control_hint=None, **cond):
        return controlled_forward(self.base, list(self.controlnets), self.scales, x, t, control_hint, **cond)
