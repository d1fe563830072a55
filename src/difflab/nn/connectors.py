"""Connectors: what turns a frozen vision encoder's patch features into tokens a language model reads.

    patch features (B, N, d_vision)   a CLIP ViT's penultimate layer; N = 64 patches of a 32x32 image
      -> connector                     (B, K, d_out)

    linear     LLaVA (Liu et al. 2023, "Visual Instruction Tuning", Sec. 4.1, Eq. 1): H_v = W Z_v
    mlp        LLaVA-1.5 (Liu et al. 2023b, "Improved Baselines with Visual Instruction Tuning", Sec. 3.1):
               a two-layer MLP with GELU in place of W
    perceiver  Flamingo's Perceiver Resampler (Alayrac et al. 2022, Sec. 2.1, Fig. 5): K learned latents
               read the patches by cross-attention
    qformer    BLIP-2's Q-Former (Li et al. 2023, Sec. 3.1; :mod:`difflab.nn.qformer`): K learned queries,
               pretrained with three objectives of their own

LLaVA's projectors keep one token per patch (K = N). A controlled comparison of connectors needs the same
number of visual tokens from each, so :class:`TokenPool` first averages the patch grid down to K tokens
for the two projectors, while the resampler and the Q-Former are built with K latents or queries.
:data:`CONNECTORS` builds any of the four by name with that K (:func:`build_connector`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_int
from difflab.nn.attention import MultiHeadAttention
from difflab.nn.flamingo import FeedForward, check_heads
from difflab.nn.qformer import QFormer


class LinearProjector(nn.Module):
    """LLaVA's projection, Eq. 1: H_v = W Z_v, one trainable matrix (with a bias) applied to every patch.
    (B, N, d_vision) -> (B, N, d_lm)."""

    def __init__(self, d_vision: int, d_lm: int):
        super().__init__()
        self.proj = nn.Linear(
            check_int("d_vision", d_vision, 1, MAX_SIZE), check_int("d_lm", d_lm, 1, MAX_SIZE)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class MLPProjector(nn.Module):
    """LLaVA-1.5's projection (Sec. 3.1): Linear(d_vision, d_lm) -> GELU -> Linear(d_lm, d_lm), its hidden
    width that of the LM as in the released ``mlp2x_gelu``. (B, N, d_vision) -> (B, N, d_lm)."""

    def __init__(self, d_vision: int, d_lm: int):
        super().__init__()
        check_int("d_vision", d_vision, 1, MAX_SIZE)
        check_int("d_lm", d_lm, 1, MAX_SIZE)
        self.net = nn.Sequential(nn.Linear(d_vision, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def _square_side(name: str, n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise DifflabError(f"{name} {n} is not a square number; expected one such as 4, 16 or 64")
    return side


class TokenPool(nn.Module):
    """Average-pool a square grid of patch features to ``tokens`` tokens: (B, N, D) -> (B, tokens, D).

    The N patches are a sqrt(N) x sqrt(N) grid in row-major order (a ViT flattens its patch map so);
    ``tokens`` must be a square number whose side divides the grid's, and each output token is the mean of
    one (sqrt(N / tokens))^2 window: 64 -> 16 by 2 x 2 windows, as ``F.avg_pool2d`` on the grid.
    """

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = check_int("tokens", tokens, 1, MAX_SIZE)
        self.side = _square_side("tokens", tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        grid = _square_side("number of patches", n)
        if grid % self.side:
            raise DifflabError(
                f"tokens {self.tokens} do not tile a {grid}x{grid} patch grid; expected a square whose side "
                f"divides {grid}"
            )
        k, w = self.side, grid // self.side  # k x k windows of w x w patches
        windows = features.reshape(b, k, w, k, w, d)  # (B, window row, row in window, window col, col, D)
        return windows.mean(dim=(2, 4)).reshape(b, self.tokens, d)  # (B, k*k, D)


class _ResamplerLayer(nn.Module):
    """One layer of Fig. 5: latents attend to [features; latents], then a feed-forward, each residual."""

    def __init__(self, width: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        self.ffw = FeedForward(width, ff_mult)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)  # (B, R, W)
        # The latents are keys too (Fig. 5's concat([x_f, x])): each latent also sees the other latents,
        # which Flamingo reports works slightly better than reading the features alone.
        kv = torch.cat([self.norm_media(features), q], dim=1)  # (B, N + R, W)
        latents = latents + self.attn(q, kv)
        return latents + self.ffw(latents)


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler (Sec. 2.1, Fig. 5; after Jaegle et al. 2021's Perceiver):
    (B, N, d_vision) -> (B, num_latents, width): as many visual tokens as latents, chosen apart from N.

    The features are mapped to ``width`` by a linear layer (Flamingo's resampler works at the vision width;
    the latents must match the features to be concatenated with them as keys) and a learned position
    embedding of the ``num_patches`` patches is added (Flamingo adds learned embeddings of each video frame's
    time; one image here has only places, and attention alone is blind to them). ``depth`` layers of
    :class:`_ResamplerLayer` update ``num_latents`` learned latents; a final LayerNorm ends the pre-norm
    stack, so the tokens a gated cross-attention reads are normalised.
    """

    def __init__(self, d_vision: int, width: int, num_latents: int, depth: int, heads: int, ff_mult: int = 4,
                 *, num_patches: int = 64):  # fmt: skip
        super().__init__()
        check_int("d_vision", d_vision, 1, MAX_SIZE)
        check_int("width", width, 1, MAX_SIZE)
        check_int("num_latents", num_latents, 1, MAX_SIZE)
        check_int("depth", depth, 1, MAX_SIZE)
        check_int("num_patches", num_patches, 1, MAX_SIZE)
        check_heads("resampler", width, heads)
        self.d_vision, self.num_patches = d_vision, num_patches
        self.proj_in = nn.Linear(d_vision, width)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches, width))  # (1, N, W), ViT's init
        self.latents = nn.Parameter(0.02 * torch.randn(num_latents, width))  # (R, W)
        self.layers = nn.ModuleList(_ResamplerLayer(width, heads, ff_mult) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[1:] != (self.num_patches, self.d_vision):
            raise DifflabError(
                f"patch features of shape {tuple(features.shape)} do not fit the resampler; expected "
                f"(B, {self.num_patches}, {self.d_vision})"
            )
        x = self.proj_in(features) + self.pos_embed  # (B, N, W)
        latents = self.latents.expand(len(x), -1, -1)  # (B, R, W)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm_out(latents)


# ------------------------------------------------------------------------------------------------ registry


SIZES = {"depth": 2, "heads": 4, "num_patches": 64, "vocab_size": None, "context_length": None}
"""The sizes a builder of :data:`CONNECTORS` takes by keyword, with their defaults."""


def _sizes(given: dict) -> dict:
    """``given`` over the defaults; a misspelt size is an error rather than silently ignored."""
    for name in given:
        check_choice("connector size", name, SIZES)
    return {**SIZES, **given}


def _linear(d_vision: int, d_lm: int, tokens: int, **sizes) -> nn.Module:
    _sizes(sizes)
    return nn.Sequential(TokenPool(tokens), LinearProjector(d_vision, d_lm))


def _mlp(d_vision: int, d_lm: int, tokens: int, **sizes) -> nn.Module:
    _sizes(sizes)
    return nn.Sequential(TokenPool(tokens), MLPProjector(d_vision, d_lm))


def _perceiver(d_vision: int, d_lm: int, tokens: int, **sizes) -> nn.Module:
    s = _sizes(sizes)
    return PerceiverResampler(d_vision, d_lm, tokens, s["depth"], s["heads"], num_patches=s["num_patches"])


def _qformer(d_vision: int, d_lm: int, tokens: int, **sizes) -> nn.Module:
    s = _sizes(sizes)
    if s["vocab_size"] is None or s["context_length"] is None:
        raise DifflabError(
            f"a Q-Former reads text; expected vocab_size and context_length, got {s['vocab_size']} and "
            f"{s['context_length']}"
        )
    return QFormer(tokens, d_lm, s["depth"], s["heads"], d_vision, s["vocab_size"], s["context_length"])


CONNECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": _linear,
    "mlp": _mlp,
    "perceiver": _perceiver,
    "qformer": _qformer,
}
"""Name -> ``builder(d_vision, d_lm, tokens, **sizes)``, ``sizes`` from :data:`SIZES` (depth=2, heads=4,
num_patches=64, vocab_size=None, context_length=None); sizes a connector has no use for are ignored, so one
call builds any of them.

- 'linear', 'mlp': ``module(features (B, N, d_vision)) -> (B, tokens, d_lm)``, the grid pooled first.
- 'perceiver': the same call and shapes, ``tokens`` latents of width d_lm.
- 'qformer': a :class:`~difflab.nn.qformer.QFormer` of width d_lm with ``tokens`` queries; its visual
  tokens are ``encode_image(features) -> (B, tokens, d_lm)``, which the VLM passes through its own
  ``nn.Linear(width, d_lm)`` into the LM (BLIP-2's fully-connected layer, Fig. 3)."""


def build_connector(name: str, d_vision: int, d_lm: int, tokens: int, **sizes) -> nn.Module:
    """The connector called ``name`` (see :data:`CONNECTORS`); an unknown name lists the known ones."""
    return CONNECTORS[check_choice("connector", name, CONNECTORS)](d_vision, d_lm, tokens, **sizes)
