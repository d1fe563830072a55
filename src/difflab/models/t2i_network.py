"""The network a text-to-image run trains, per recipe: the UNet (or, for recipe 'mmdit', SD3's MMDiT) with
what a recipe puts in front of it: a text refiner over the frozen encoder's tokens, and for recipe 'layout'
GLIGEN's grounding tokens. What a checkpoint records of it, and what ``difflab info`` builds."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nn.gligen import GroundingTokens
from difflab.nn.mmdit import MMDiT
from difflab.nn.transformer import Transformer
from difflab.nn.unet import UNet, example_inputs
from difflab.world.scene import world_preset


class TextConditionedUNet(nn.Module):
    """The trained network: an optional text refiner over the frozen encoder's tokens, GLIGEN's grounding
    tokens (Eq. 5: phrase embedding and Fourier box -> MLP) for recipe 'layout', then the UNet.
    ``forward(x, t, context, context_mask, pooled, grounding_phrases, grounding_boxes, grounding_mask)``;
    ``.cfg`` is the UNet's config."""

    def __init__(self, cfg):
        super().__init__()
        self.unet = MMDiT(cfg.mmdit) if cfg.recipe == "mmdit" else UNet(cfg.unet)
        self.cfg = cfg.unet
        self.grounding = None
        if cfg.unet.grounding_dim:
            if not cfg.unet.context_dim:
                raise DifflabError("grounding tokens need the UNet's context_dim (set from the text encoder)")
            self.grounding = GroundingTokens(cfg.unet.context_dim, cfg.unet.grounding_dim)
        self.refiner = None
        if cfg.text_refiner_layers:
            if not cfg.unet.context_dim:
                raise DifflabError("a text refiner needs the UNet's context_dim (set from the text encoder)")
            heads = next(h for h in (4, 2, 1) if cfg.unet.context_dim % h == 0)
            self.refiner = Transformer(cfg.unet.context_dim, cfg.text_refiner_layers, heads)

    def forward(self, x, t, **cond):
        return self.unet(x, t, **self.prepare(**cond))

    def prepare(self, context=None, context_mask=None, pooled=None, grounding_phrases=None,
                grounding_boxes=None, grounding_mask=None, **kwargs) -> dict:  # fmt: skip
        """The UNet's keyword arguments for a condition: the refined tokens, the grounding tokens. A
        ControlNet's copy reads the same (:mod:`difflab.nn.controlnet`)."""
        if self.refiner is not None and context is not None:
            context = self.refiner(context, context_mask)  # (B, L, context_dim); padding masked as keys
        if self.grounding is not None and grounding_phrases is not None:
            kwargs["grounding"] = self.grounding(grounding_phrases, grounding_boxes)  # (B, M, grounding_dim)
            kwargs["grounding_mask"], kwargs["grounding_boxes"] = grounding_mask, grounding_boxes
        return dict(context=context, context_mask=context_mask, pooled=pooled, **kwargs)


def _wrapped(cfg) -> bool:
    return bool(cfg.text_refiner_layers or cfg.unet.grounding_dim or cfg.recipe == "mmdit")


def build_network(cfg) -> UNet | TextConditionedUNet:
    """The network a run trains: the UNet alone, or the UNet or MMDiT with a text refiner or grounding
    tokens in front."""
    return TextConditionedUNet(cfg) if _wrapped(cfg) else UNet(cfg.unet)


def network_config(cfg):
    """What a checkpoint records of the network's architecture (a resume must match it)."""
    if not _wrapped(cfg):
        return cfg.unet
    record = {"unet": dataclasses.asdict(cfg.unet), "text_refiner_layers": cfg.text_refiner_layers}
    return record | ({"mmdit": dataclasses.asdict(cfg.mmdit)} if cfg.recipe == "mmdit" else {})


def info_network(cfg):
    """The trained network (the refiner and grounding tokens included) with example inputs (``difflab
    info``): a caption, and for recipe 'layout' the world's most objects, each in the middle of the canvas."""
    b, inputs = cfg.train.batch_size, example_inputs(cfg.unet, cfg.train.batch_size)
    if cfg.recipe == "layout":
        m = world_preset(cfg.data.world).max_objects
        inputs |= {"grounding_phrases": torch.randn(b, m, cfg.unet.context_dim),
                   "grounding_boxes": torch.tensor([0.3, 0.3, 0.7, 0.7]).expand(b, m, 4),
                   "grounding_mask": torch.ones(b, m, dtype=torch.bool)}  # fmt: skip
    return build_network(cfg), inputs, None
