"""Grounding tokens and gated self-attention: GLIGEN (Li et al. 2023, "GLIGEN: Open-Set Grounded
Text-to-Image Generation", Sec. 3).

A *grounding token* says "this phrase, in this box". GLIGEN's Eq. 5 builds it from the phrase's text
embedding and a Fourier embedding of the box corners (Mildenhall et al. 2020's positional encoding):

    h^e = MLP([ f_text(phrase), Fourier(x0, y0, x1, y1) ])                                    (Eq. 5)

and every transformer block of the UNet gets a new layer between its self-attention and its
cross-attention, self-attention over the visual tokens *and* the grounding tokens, of which only the
visual tokens are kept (the token selection TS), added back through a gate:

    v = v + tanh(gamma) * TS(SelfAttn([v, h^e]))                                                  (Eq. 8)

``gamma`` starts at 0, so at initialisation the grounded UNet computes *exactly* what the base UNet
computes (``tanh(0) = 0``; a test checks bitwise equality): grounding is added to a model without first
breaking it. GLIGEN freezes the pretrained base and trains only the new layers; here base and grounding
layers train together from the start (the toy world has no pretrained base worth keeping), and the gate
still lets the network find the base model's solution first.

One addition, said plainly: each visual token enters this attention with the Fourier embedding of *its
own* box (the pixel's square) through a learned linear map. Stable Diffusion's UNet has no position
embedding (position comes from the convolutions' zero padding); a grounding box can only be matched to
pixels that know where they are, and at 8x8 in a few thousand steps the padding signal is too weak to
learn it from. With both sides embedded the same way, "is this pixel inside the box" is a dot product.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nn.attention import MultiHeadAttention

FOURIER_FREQS = 8
"""Frequencies per box coordinate: 2^0 pi .. 2^7 pi, enough to tell 1/32 of the canvas apart."""


def fourier_boxes(boxes: torch.Tensor, freqs: int = FOURIER_FREQS) -> torch.Tensor:
    """(..., 4) box corners (x0, y0, x1, y1) in canvas fractions -> (..., 8 * freqs): sin and cos of
    2^k pi c for every corner coordinate c and k < freqs (NeRF's encoding, GLIGEN Eq. 5)."""
    scales = math.pi * 2.0 ** torch.arange(freqs, device=boxes.device, dtype=boxes.dtype)  # (F,)
    angles = boxes[..., None] * scales  # (..., 4, F)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)  # (..., 4 * 2F)


def pixel_boxes(side: int, device=None) -> torch.Tensor:
    """(side * side, 4): the square of every pixel of a side x side map, row-major, in canvas fractions."""
    edges = torch.arange(side, device=device, dtype=torch.float32) / side
    y0, x0 = torch.meshgrid(edges, edges, indexing="ij")  # (side, side) each
    return torch.stack([x0, y0, x0 + 1 / side, y0 + 1 / side], -1).reshape(side * side, 4)


class GroundingTokens(nn.Module):
    """Eq. 5: phrase embeddings (B, M, phrase_dim) and boxes (B, M, 4) -> grounding tokens (B, M, dim)."""

    def __init__(self, phrase_dim: int, dim: int, hidden: int | None = None, freqs: int = FOURIER_FREQS):
        super().__init__()
        hidden = hidden or 2 * dim
        self.freqs = freqs
        self.mlp = nn.Sequential(
            nn.Linear(phrase_dim + 8 * freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )  # fmt: skip

    def forward(self, phrases: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([phrases, fourier_boxes(boxes, self.freqs)], -1))


class GatedSelfAttention(nn.Module):
    """Eq. 8 on the visual tokens of one attention block: ``forward(v, side, grounding, mask, boxes)`` with
    v (B, side*side, C), grounding tokens (B, M, grounding_dim), mask (B, M) True on real objects and their
    boxes (B, M, 4). Padded objects are masked out as keys; with no grounding the tokens pass unchanged.

    ``box_attention``: a pixel may attend to an object's token only where the pixel's square overlaps the
    object's box (other pixels and absent objects aside). GLIGEN leaves that routing to be learned; from
    scratch in a few thousand steps it was not (docs/t2i.md), so the box is also applied as an attention
    mask, as region-restricted attention does in later layout-to-image work. Off: GLIGEN as published."""

    def __init__(self, channels: int, heads: int, grounding_dim: int, freqs: int = FOURIER_FREQS,
                 gate: float = 0.0, box_attention: bool = False):  # fmt: skip
        super().__init__()
        self.freqs, self.box_attention = freqs, box_attention
        self.proj = nn.Linear(grounding_dim, channels)  # grounding tokens to the visual width
        self.where = nn.Linear(8 * freqs, channels)  # each pixel's own box (see the module docstring)
        self.norm = nn.LayerNorm(channels)
        self.attn = MultiHeadAttention(channels, heads)
        self.gate = nn.Parameter(torch.full((1,), float(gate)))  # gamma of Eq. 8: tanh(0) = 0, the base model

    def forward(self, v: torch.Tensor, side: int, grounding: torch.Tensor | None, mask: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if grounding is None:
            return v
        b, n, _ = v.shape
        pixels = pixel_boxes(side, v.device).to(v.dtype)  # (N, 4)
        where = self.where(fourier_boxes(pixels, self.freqs))  # (N, C)
        tokens = self.norm(torch.cat([v + where, self.proj(grounding)], 1))  # (B, N + M, C)
        if mask is None:
            mask = torch.ones(grounding.shape[:2], dtype=torch.bool, device=v.device)
        objects = mask.bool()[:, None, :].expand(b, n, -1)  # (B, N, M): query pixel, key object
        if self.box_attention:
            if boxes is None:
                raise DifflabError("box attention needs the objects' boxes; expected boxes (B, M, 4)")
            objects = objects & overlaps(pixels, boxes)
        keys = torch.cat(
            [torch.ones(b, n, n, dtype=torch.bool, device=v.device), objects], 2
        )  # (B, N, N + M)
        return v + torch.tanh(self.gate) * self.attn(
            tokens[:, :n], tokens, mask=keys
        )  # TS: visual queries only


class GroundingMap(nn.Module):
    """The grounding tokens painted into their boxes at the UNet's input resolution: every pixel gets the
    tokens of the objects that cover it, weighted by the share of its square each box covers, through a
    zero-initialised linear map, added to the first convolution's output.

    GLIGEN (Sec. 3.2, "spatially-aligned conditions") feeds dense conditions such as keypoint or depth maps
    to the UNet's first layer rather than through attention. A box is such a condition once drawn: the
    gated self-attention layers sit only at the UNet's coarse levels (8x8 of a 16x16 latent in the demo),
    and the full-resolution level, where an object's outline is drawn, learns what lies where only through
    them. Painted in, colour and shape reach every pixel of the box from the first layer. Zero at
    initialisation, so a grounded UNet with a closed gate is still exactly the base model.

    With ``coords`` (an addition of ours, not GLIGEN's) a pixel also learns *where in the box* it sits:
    what it gets from object m is a small field

        f(token_m, u, v) = W_o SiLU(A token_m + B phi(u, v)),   (u, v) the pixel's centre in the box's own
                                                                 frame, -1..1 edge to edge

    (``phi``: :func:`box_coordinates`), so "a red cross in this box" can become "red here, background
    there" from the first layer on, the same way for any box's place and size. W_o starts at zero."""

    def __init__(self, grounding_dim: int, channels: int, coords: bool = False, hidden: int | None = None):
        super().__init__()
        self.coords = coords
        if coords:  # a small field over (token, the pixel's place in the box): SiLU, then a zero map
            hidden = hidden or channels
            self.token = nn.Linear(grounding_dim, hidden)
            self.place = nn.Linear(BOX_COORD_FEATURES, hidden, bias=False)
            self.proj = nn.Linear(hidden, channels)
        else:
            self.proj = nn.Linear(grounding_dim, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, grounding: torch.Tensor | None, mask: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if grounding is None:
            return h
        if boxes is None:
            raise DifflabError("a grounding map needs the objects' boxes; expected boxes (B, M, 4)")
        b, c, side, _ = h.shape
        pixels, boxes = pixel_boxes(side, h.device).to(h.dtype), boxes.to(h.dtype)
        cover = coverage(pixels, boxes)  # (B, N, M)
        if mask is not None:
            cover = cover * mask[:, None, :].to(h.dtype)  # padded objects paint nothing
        if self.coords:
            place = self.place(box_coordinates(pixels, boxes))  # (B, N, M, hidden)
            field = self.proj(nn.functional.silu(self.token(grounding)[:, None] + place))  # (B, N, M, C)
            painted = (cover[..., None] * field).sum(2)  # (B, N, C)
        else:
            painted = cover @ self.proj(grounding)  # (B, N, C)
        return h + painted.transpose(1, 2).reshape(b, c, side, side)


BOX_COORD_FREQS = 4
"""Frequencies of a pixel's in-box coordinates: 2^0 pi/2 .. 2^3 pi/2, down to 1/8 of a box."""
BOX_COORD_FEATURES = 2 + 4 * BOX_COORD_FREQS


def box_coordinates(pixels: torch.Tensor, boxes: torch.Tensor, freqs: int = BOX_COORD_FREQS) -> torch.Tensor:
    """(N, 4) pixel squares and (B, M, 4) boxes -> (B, N, M, 2 + 4 * freqs): each pixel centre's place in
    each box's own frame, (u, v) = -1 .. 1 from the box's left (top) edge to its right (bottom) one, with
    sin and cos of 2^k pi/2 u and v (k < freqs)."""
    centre = (pixels[:, :2] + pixels[:, 2:]) / 2  # (N, 2)
    size = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-6)  # (B, M, 2); a padded box may be empty
    uv = 2 * (centre[None, :, None, :] - boxes[:, None, :, :2]) / size[:, None] - 1  # (B, N, M, 2)
    scales = math.pi / 2 * 2.0 ** torch.arange(freqs, device=uv.device, dtype=uv.dtype)  # (F,)
    angles = (uv[..., None] * scales).flatten(-2)  # (B, N, M, 2F)
    return torch.cat([uv, angles.sin(), angles.cos()], -1)


def coverage(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) pixel squares and (B, M, 4) boxes -> (B, N, M): the share of each pixel's square inside
    each box, in [0, 1]."""
    p, q = pixels[None, :, None, :], boxes[:, None, :, :]  # (1, N, 1, 4), (B, 1, M, 4)
    w = (torch.minimum(p[..., 2], q[..., 2]) - torch.maximum(p[..., 0], q[..., 0])).clamp(min=0)
    h = (torch.minimum(p[..., 3], q[..., 3]) - torch.maximum(p[..., 1], q[..., 1])).clamp(min=0)
    return w * h / ((p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1]))


def overlaps(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) pixel squares and (B, M, 4) boxes -> (B, N, M): whether they intersect (area > 0)."""
    p, q = pixels[None, :, None, :], boxes[:, None, :, :]  # (1, N, 1, 4), (B, 1, M, 4)
    return (
        (p[..., 0] < q[..., 2]) & (q[..., 0] < p[..., 2]) & (p[..., 1] < q[..., 3]) & (q[..., 1] < p[..., 3])
    )
