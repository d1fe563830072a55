"""Gated cross-attention between a language model's layers: Flamingo (Alayrac et al. 2022, "Flamingo: a
Visual Language Model for Few-Shot Learning", Sec. 2.2 and Fig. 4).

Flamingo keeps a pretrained LM frozen and inserts a new block before some of its layers, GATED
XATTN-DENSE: the text tokens read the visual tokens by cross-attention, then a feed-forward, each added
back through a tanh gate

    y = x + tanh(alpha_xattn) * XAttn(LN(x), visual)                                         (Fig. 4)
    y = y + tanh(alpha_dense) * FFW(LN(y))

with scalar alphas initialised at 0: ``tanh(0) = 0``, so at initialisation every block returns its input
exactly and the model *is* the LM it was built on (a test checks ``torch.equal``). This is the zero gate
of GLIGEN's gated self-attention (:class:`difflab.nn.gligen.GatedSelfAttention`), put in front of an LM.

Which visual tokens a text token may read. Flamingo interleaves several images with text and lets each
token attend only to the visual tokens of the last image before it (Sec. 2.3, Fig. 7), the "per-image
media masking". Here a sequence has exactly one image, placed before all of its text, so that rule reduces
to: every text token attends to all of its image's visual tokens, and no mask is needed.

Where the blocks go: :class:`FlamingoLayers` puts one before LM blocks 0, every, 2 every, ... (Flamingo
inserts them between the frozen LM layers, Sec. 2.2, and ablates how often in Sec. 3.3), and hands the
LM a ``hook(i, x) -> x`` it calls on the residual stream before block ``i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_int
from difflab.nn.attention import MultiHeadAttention

MAX_FF_MULT = 64
"""The feed-forward's hidden width is ff_mult x width; Flamingo, BLIP-2 and GPT-2 use 4."""


def check_heads(name: str, width: int, heads: int) -> None:
    """A width that splits into ``heads`` heads; raised here, as a DifflabError, before attention is built."""
    check_int(f"{name} heads", heads, 1, MAX_SIZE)
    if width % heads:
        raise DifflabError(
            f"{name} width {width} is not divisible by heads={heads}; expected a divisor of it"
        )


class FeedForward(nn.Module):
    """Flamingo's FFW (Fig. 4 and 5), the transformer's position-wise MLP with its pre-norm:
    LN -> Linear(d, mult d) -> GELU -> Linear(mult d, d) (Vaswani et al. 2017, Eq. 2, with BERT's GELU).
    The residual and any gate are the caller's. (B, N, d) -> (B, N, d)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        check_int("width", dim, 1, MAX_SIZE)
        check_int("ff_mult", mult, 1, MAX_FF_MULT)
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE (Fig. 4): text x (B, L, d_lm) and visual tokens (B, K, d_visual) -> (B, L, d_lm).

    Every text token attends to all K visual tokens (one image per sequence; see the module docstring).
    The visual tokens enter the keys and values as they are: a Perceiver Resampler ends in a LayerNorm.
    """

    def __init__(self, d_lm: int, d_visual: int, heads: int, ff_mult: int = 4):
        super().__init__()
        check_int("d_lm", d_lm, 1, MAX_SIZE)
        check_int("d_visual", d_visual, 1, MAX_SIZE)
        check_heads("cross-attention", d_lm, heads)
        self.d_visual = d_visual
        self.norm = nn.LayerNorm(d_lm)
        self.attn = MultiHeadAttention(d_lm, heads, context_dim=d_visual)
        self.ffw = FeedForward(d_lm, ff_mult)
        # Scalars at 0: tanh(0) = 0 closes both branches, so the LM is untouched until training opens them.
        self.alpha_xattn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        if visual.ndim != 3 or visual.shape[-1] != self.d_visual or len(visual) != len(x):
            raise DifflabError(
                f"visual tokens of shape {tuple(visual.shape)} do not fit; expected ({len(x)}, K, {self.d_visual})"
            )
        x = x + torch.tanh(self.alpha_xattn) * self.attn(self.norm(x), visual)  # (B, L, d_lm)
        return x + torch.tanh(self.alpha_dense) * self.ffw(x)


class FlamingoLayers(nn.Module):
    """The gated blocks of a ``lm_depth``-block LM: one before LM block i for i = 0, every, 2 every, ...

    ``hook(visual)`` returns the function the LM calls on its residual stream before each block
    (``GPT.forward(..., hook=...)``): block i's gated cross-attention where there is one, the identity
    elsewhere.
    """

    def __init__(self, d_lm: int, d_visual: int, lm_depth: int, every: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.lm_depth = check_int("lm_depth", lm_depth, 1, MAX_SIZE)
        check_int("every", every, 1, MAX_SIZE)
        # Keyed by the LM block the gated block precedes (state-dict names blocks.0, blocks.2, ...).
        self.blocks = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(d_lm, d_visual, heads, ff_mult)
                for i in range(0, lm_depth, every)
            }
        )

    @property
    def layers(self) -> tuple[int, ...]:
        """The LM blocks that get a gated block before them."""
        return tuple(int(i) for i in self.blocks)

    def hook(self, visual: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``hook(i, x) -> x`` for the LM: x (B, L, d_lm) before LM block i, with ``visual`` (B, K, d_visual)."""

        def apply(i: int, x: torch.Tensor) -> torch.Tensor:
            if not 0 <= i < self.lm_depth:
                raise DifflabError(
                    f"LM block {i} is outside the {self.lm_depth} blocks these Flamingo layers were built for; "
                    f"expected 0 <= i < {self.lm_depth}"
                )
            block = self.blocks[str(i)] if str(i) in self.blocks else None
            return x if block is None else block(x, visual)

        return apply
