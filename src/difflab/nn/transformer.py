"""The pre-norm transformer of the ViT image tower, CLIP's text tower and GPT-2 (:mod:`difflab.nn.gpt`).

A block is ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (the "pre-LN" ordering of Xiong et al. 2020, used
by GPT-2 and CLIP): the residual stream is never normalised, so a deep stack trains without warmup tricks.
The MLP is Linear(d, r d) -> GELU -> Linear(r d, d) (Vaswani et al. 2017, Eq. 2 with GELU as in BERT and
CLIP). Attention is :class:`difflab.nn.attention.MultiHeadAttention`, so LoRA can wrap the same named
projections here as in the UNet.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.errors import DifflabError, check_float
from difflab.nn.attention import MultiHeadAttention

MAX_MLP_RATIO = 64.0
"""The MLP's hidden width is mlp_ratio * width; transformers use 4 (GPT-2, ViT, CLIP, DiT), a few use 8/3
(SwiGLU): a ratio above 64 is a typo, and 1e30 would be an allocation no machine survives."""


def check_mlp_ratio(mlp_ratio: float, width: int) -> float:
    """A transformer config's ``mlp_ratio``: in (0, 64], and leaving the MLP at least one hidden unit."""
    check_float("mlp_ratio", mlp_ratio, 0.0, MAX_MLP_RATIO, lo_open=True)
    if int(width * mlp_ratio) < 1:
        raise DifflabError(
            f"mlp_ratio {mlp_ratio} leaves no hidden unit at width {width}; expected a larger one"
        )
    return mlp_ratio


class TransformerBlock(nn.Module):
    """One pre-norm block: (B, N, dim) -> (B, N, dim).

    ``qkv_bias`` and ``gelu_approximate='tanh'`` give GPT-2's block (:mod:`difflab.nn.gpt`): biased query,
    key and value projections, and the tanh approximation of GELU that GPT-2 was trained with
    (Hendrycks & Gimpel 2016, Sec. 2; transformers calls it ``gelu_new``). The defaults are CLIP's and
    ViT's exact (erf) GELU and bias-free projections."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, *,
                 qkv_bias: bool = False, gelu_approximate: str = "none"):  # fmt: skip
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate=gelu_approximate), nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )  # fmt: skip
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
