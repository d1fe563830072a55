"""Multi-head attention over feature maps: self-attention between pixels, and cross-attention from
pixels to a context sequence (text tokens), as in Stable Diffusion's spatial transformer
(Rombach et al. 2022, Sec. 3.3).

The projections are plain ``nn.Linear`` layers named ``to_q``, ``to_k``, ``to_v``, ``to_out`` so that
LoRA (Hu et al. 2021) can wrap them by name, and the attention itself is
``F.scaled_dot_product_attention`` so PyTorch picks the fastest kernel for the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError


class MultiHeadAttention(nn.Module):
    """``softmax(Q K^T / sqrt(d)) V`` with ``heads`` heads (Vaswani et al. 2017, Eq. 1).

    Queries come from ``x`` (B, N, dim); keys and values from ``context`` (B, M, context_dim), or from
    ``x`` itself for self-attention. ``mask`` is True where attending is allowed: (B, M) for which context
    tokens every query may see (padding), or (B, N, M) per query (a causal text mask, see
    :mod:`difflab.nn.transformer`).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, *, qkv_bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        context_dim = context_dim or dim
        # Stable Diffusion's q, k, v projections have no bias; GPT-2's fused c_attn has one (``qkv_bias``).
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.probs_hook = None
        """``hook(probs) -> probs | None``, called with the attention probabilities (B, heads, N, M) when
        set: to record them (cross-attention maps, see :class:`difflab.models.attention_maps`) or to
        replace them (Prompt-to-Prompt, Hertz et al. 2022). Unset, the fused kernel runs."""

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, -1, h, d // h).transpose(1, 2)  # (B, heads, tokens, d/heads)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attn_mask = None
        if mask is not None:  # broadcast over heads (and over queries for a (B, M) mask)
            attn_mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]  # (B, 1, 1|N, M)
        if self.probs_hook is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, d/heads)
        else:  # the same softmax(Q K^T / sqrt(d)) V, written out so the hook can see the probabilities
            logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (B, heads, N, M)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            probs = logits.softmax(dim=-1)
            replaced = self.probs_hook(probs)
            out = (probs if replaced is None else replaced) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class SpatialAttention(nn.Module):
    """Attention on a feature map: GroupNorm then self-attention, and, when ``context_dim`` is given,
    LayerNorm then cross-attention to the context; each added back residually.

    ``grounding``: GLIGEN's gated self-attention (:class:`difflab.nn.gligen.GatedSelfAttention`) between
    the two, over the pixels and the ``grounding`` tokens of ``forward``; without tokens it is skipped.

    ``positions`` (H * W): a learned position embedding, added to the normalised pixels before both
    attentions (as ViT and DiT add theirs to patch tokens). Attention alone is blind to where a pixel is;
    Stable Diffusion's UNet has no such embedding and leaves position to the convolutions' padding.

    (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        groups: int,
        context_dim: int | None = None,
        positions: int | None = None,
        grounding: nn.Module | None = None,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.pos = None
        if positions:
            self.pos = nn.Parameter(torch.randn(1, positions, channels) * 0.02)  # (1, H*W, C), ViT's init
        self.self_attn = MultiHeadAttention(channels, heads)
        self.grounding = grounding  # GLIGEN's gated self-attention, between the two attentions
        self.cross_norm = nn.LayerNorm(channels) if context_dim else None
        self.cross_attn = MultiHeadAttention(channels, heads, context_dim) if context_dim else None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        grounding: torch.Tensor | None = None,
        grounding_mask: torch.Tensor | None = None,
        grounding_boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.pos is not None:
            if self.pos.shape[1] != hgt * wid:
                raise DifflabError(
                    f"a {hgt}x{wid} feature map does not fit the position embedding of {self.pos.shape[1]} pixels"
                )
            tokens = tokens + self.pos
        out = x.flatten(2).transpose(1, 2) + self.self_attn(tokens)
        if self.grounding is not None:
            out = self.grounding(out, hgt, grounding, grounding_mask, grounding_boxes)
        if self.cross_attn is not None and context is not None:
            queries = self.cross_norm(out)
            if self.pos is not None:
                queries = queries + self.pos
            out = out + self.cross_attn(queries, context, context_mask)
        return out.transpose(1, 2).reshape(b, c, hgt, wid)
