"""The pre-norm transformer encoder shared by the ViT image tower and the text tower of CLIP.

A block is ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (the "pre-LN" ordering of Xiong et al. 2020, used
by GPT-2 and CLIP): the residual stream is never normalised, so a deep stack trains without warmup tricks.
The MLP is Linear(d, r d) -> GELU -> Linear(r d, d) (Vaswani et al. 2017, Eq. 2 with GELU as in BERT and
CLIP). Attention is :class:`difflab.nn.attention.MultiHeadAttention`, so LoRA can wrap the same named
projections here as in the UNet.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.nn.attention import MultiHeadAttention


class TransformerBlock(nn.Module):
    """One pre-norm block: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), mask=mask))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``depth`` blocks of width ``dim``; ``mask`` as in :class:`MultiHeadAttention` ((B, N) or (B, N, N))."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


def causal_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask of a causal text encoder (CLIP's text tower; Radford et al. 2021, Sec. 2.4):
    token i sees tokens j <= i that are not padding. ``mask`` (B, L) is True on real tokens.

    (B, L) -> (B, L, L). Every row keeps its own diagonal, so that a row with no real key before it
    (a padded query, whose output is never read) still attends to something and its softmax stays finite.
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()  # (L, L)
    allowed = causal[None] & mask[:, None, :]  # (B, L, L): query i, key j
    return allowed | torch.eye(length, dtype=torch.bool, device=mask.device)[None]
