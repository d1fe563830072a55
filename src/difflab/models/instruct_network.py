"""The InstructPix2Pix editor's network (Brooks, Holynski & Efros 2023, Sec. 3.2.1): a trained text-to-image
network whose first convolution also reads the input image's latents, zero at the start, so that the untrained
editor is the base exactly; and the changes to the base an editor may ask for (:class:`InstructConfig
<difflab.models.instruct.InstructConfig>`), each starting from the base too:

- :func:`add_attention`: self- and cross-attention at sides where the base has none (``added_attention``);
- :func:`add_positions`: a position embedding in every attention layer (``attention_positions``);
- :func:`drop_global_text`: the instruction through cross-attention alone (``global_text=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nn.attention import SpatialAttention
from difflab.nn.controlnet import unet_of
from difflab.nn.resblock import Downsample, Upsample
from difflab.nn.unet import UNet


class InstructNet(nn.Module):
    """The base network with its first convolution taking ``image_channels`` more input channels, zero at
    the start (Sec. 3.2.1: "weights that operate on the newly added input channels are initialized to
    zero"), so that ``forward(x, t, edit_image, **cond)`` = the base's ``forward(x, t, **cond)`` before
    training, whatever the image. A missing image is the null image, zeros."""

    def __init__(self, base: nn.Module, image_channels: int, added_attention: tuple[int, ...] = (),
                 global_text: bool = True, null_text=None, positions: bool = False):  # fmt: skip
        super().__init__()
        self.net = base
        unet = unet_of(base)
        add_attention(unet, added_attention)
        if positions:
            add_positions(unet)
        if not global_text:  # null_text: the text encoder's output for "" (None: the constant is loaded)
            drop_global_text(unet, None if null_text is None else _null_condition(base, null_text))
        old = unet.conv_in
        wide = nn.Conv2d(
            old.in_channels + image_channels, old.out_channels, old.kernel_size, padding=old.padding
        )
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, : old.in_channels] = old.weight
            wide.bias.copy_(old.bias)
        unet.conv_in = wide

    def forward(self, x: torch.Tensor, t: torch.Tensor, edit_image: torch.Tensor | None = None, **cond):
        image = torch.zeros_like(x) if edit_image is None else edit_image.to(x.dtype)
        if image.shape[0] == 1 and x.shape[0] > 1:
            image = image.expand(x.shape[0], -1, -1, -1)
        return self.net(torch.cat([x, image], dim=1), t, **cond)  # (B, 2c, h, w) into the widened conv


def _pairs(unet: UNet):
    """Each (resblock, attention or Identity) pair of the down and up paths with the side it works at."""
    cfg = unet.cfg
    for layers, side, resample, scale in (
        (unet.down, cfg.image_size, Downsample, 0.5),
        (unet.up, cfg.image_size // 2 ** (len(cfg.channel_mult) - 1), Upsample, 2),
    ):
        for layer in layers:
            if isinstance(layer, resample):
                side = int(side * scale)
            else:
                yield layer, side


def add_attention(unet: UNet, sides: tuple[int, ...]) -> None:
    """Give each residual block of ``unet`` that works at a side in ``sides`` and has no attention layer
    one: self-attention, then cross-attention to the text, as the base's own layers are built
    (:class:`difflab.nn.attention.SpatialAttention`). Both output projections start at zero, so each new
    layer adds nothing until trained (the same zero start as ControlNet's convolutions and the editor's new
    input channels): the untrained editor stays the base exactly."""
    cfg = unet.cfg
    free = sorted({cfg.image_size // 2**level for level in range(len(cfg.channel_mult))}
                  - set(cfg.attention_resolutions))  # fmt: skip
    for side in sides:
        if side not in free:
            raise DifflabError(f"added_attention {side} is not a side of this UNet's feature maps without "
                               f"attention; expected one of {free}")  # fmt: skip
    for layer, side in _pairs(unet):
        if side in sides and isinstance(layer[1], nn.Identity):
            width = layer[0].conv2.out_channels
            attention = SpatialAttention(width, cfg.heads_at(width), cfg.norm_groups, cfg.context_dim)
            for projection in (attention.self_attn, attention.cross_attn):
                if projection is not None:
                    nn.init.zeros_(projection.to_out.weight)
                    nn.init.zeros_(projection.to_out.bias)
            layer[1] = attention


def add_positions(unet: UNet) -> None:
    """A learned position embedding in every attention layer of ``unet`` that has none, zero at the start
    (so the editor starts as the base). Self-attention alone cannot tell where a pixel is, so it cannot
    carry an object one cell 'to the left'; with positions, a query can find the key one cell away. (Measured:
    it did not help the editor learn moves, docs/editing.md.)"""
    lowest = unet.cfg.image_size // 2 ** (len(unet.cfg.channel_mult) - 1)
    layers = [(layer[1], side) for layer, side in _pairs(unet) if isinstance(layer[1], SpatialAttention)]
    for attention, side in [*layers, (unet.mid_attn, lowest)]:
        if attention.pos is None:
            width = attention.norm.num_channels
            attention.pos = nn.Parameter(torch.zeros(1, side * side, width))  # (1, H*W, C)


def _null_condition(network: nn.Module, null_text) -> dict:
    """The UNet's keyword arguments for an encoded empty prompt, through ``network``'s text refiner if any."""
    cond = {"context": null_text.tokens, "context_mask": null_text.mask, "pooled": null_text.pooled}
    return network.prepare(**cond) if hasattr(network, "prepare") else cond


class _Shifted(nn.Module):
    """A time embedding plus a learned constant: what the removed sentence paths added for the empty prompt."""

    def __init__(self, embed: nn.Module, width: int):
        super().__init__()
        self.embed, self.shift = embed, nn.Parameter(torch.zeros(width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.embed(t) + self.shift  # (B, 4C)


def drop_global_text(unet: UNet, null_text: dict | None = None) -> None:
    """Remove the paths that add the whole sentence to every residual block's embedding (the pooled
    embedding and the mean of the token features; UNet.embed skips a path whose layer is None), leaving the
    instruction its cross-attention alone. In their place a learned constant, set from ``null_text`` (the
    UNet's keyword arguments for the empty prompt) when given: so the editor starts as the base does for the
    empty prompt."""
    shifted = _Shifted(unet.time_embed, unet.time_embed.mlp[-1].out_features)
    if null_text is not None:
        with torch.no_grad():  # UNet.embed's two sentence terms, without the time embedding
            t, x = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 1, 1)
            shifted.shift.copy_((unet.embed(x, t, **null_text) - unet.time_embed(t))[0])
    unet.pooled_embed = unet.context_pool = None
    unet.time_embed = shifted
