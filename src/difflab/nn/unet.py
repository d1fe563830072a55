"""The one UNet every diffusion system in difflab uses (Ronneberger et al. 2015, as adapted for
diffusion by Ho et al. 2020 and Dhariwal & Nichol 2021; cross-attention as in Rombach et al. 2022).

Seams built in from the start, so later systems need no second network:
- ``class_labels``: a learned class embedding added to the time embedding; index ``num_classes`` is the
  *null class* that classifier-free guidance (Ho & Salimans 2022) trains by label dropout;
- ``context``: a token sequence that every attention block cross-attends to (text conditioning);
- ``control``: additive residuals, one per skip connection plus one for the middle, which is how a
  ControlNet (Zhang et al. 2023) steers a frozen UNet;
- attention projections are ``nn.Linear`` named to_q/to_k/to_v/to_out, for LoRA.

Layout (``channel_mult=(1, 2, 2)``, 32x32 input): conv_in -> [res x N (+attn)] -> down -> ... -> middle
(res, attn, res) -> mirrored up path whose blocks each take one skip -> GroupNorm, SiLU, conv_out
(zero-initialised, so the untrained network predicts 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from difflab.errors import (
    MAX_SIZE,
    DifflabError,
    check_float,
    check_int,
    check_ints,
    check_optional_int,
)
from difflab.nn.attention import SpatialAttention
from difflab.nn.embeddings import TimestepEmbedding
from difflab.nn.gligen import GatedSelfAttention, GroundingMap
from difflab.nn.resblock import Downsample, ResBlock, Upsample


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a UNet. Field docs say what each one trades off."""

    in_channels: int = 3
    out_channels: int = 3
    image_size: int = 32
    """Input side in pixels; used to place attention by resolution and to count FLOPs."""
    channels: int = 64
    """Width of the first level; level i has ``channels * channel_mult[i]``."""
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    """Feature-map sides (in pixels) at which blocks get self-attention; attention costs O((H W)^2)."""
    heads: int = 4
    """Attention heads in every attention layer (unless ``head_dim`` is set)."""
    head_dim: int | None = None
    """Width of each attention head: a layer of width C then gets C // head_dim heads (diffusers'
    ``attention_head_dim`` meaning, SD 2's 64). It overrides ``heads``. The split changes neither the
    parameters nor the FLOPs, but wide heads run much faster on a CPU (docs/benchmarks.md)."""
    norm_groups: int = 8
    dropout: float = 0.0
    num_classes: int | None = None
    """Number of classes for class conditioning; one more embedding row is the CFG null class."""
    class_factors: tuple[int, ...] = ()
    """Factorised class embedding: a label is read as mixed-radix digits (e.g. (5, 8): shape * 8 + colour)
    and the embedding is the sum of one learned embedding per digit, so what is learned about "circle"
    from red circles serves blue ones too. Empty: one embedding per class."""
    context_dim: int | None = None
    """Width of the cross-attention context (text token embeddings); None disables cross-attention."""
    pooled_dim: int | None = None
    """Width of a pooled text embedding added (through a linear map) to the time embedding, as SDXL adds
    CLIP's pooled text embedding (Podell et al. 2023, Sec. 2.1); None disables it."""
    context_pool: bool = False
    """Also add the masked mean of the context tokens (through a linear map) to the time embedding, as
    Imagen adds a pooled text embedding (Saharia et al. 2022, Sec. 2.2): a global summary of the prompt
    in every residual block, learned with the UNet. Needs ``context_dim``."""
    grounding_dim: int | None = None
    """Width of GLIGEN grounding tokens (Li et al. 2023): every attention layer gets a gated self-attention
    over its pixels and the tokens (:mod:`difflab.nn.gligen`); None: none."""
    grounding_box_attention: bool = False
    """Let a pixel attend to an object's grounding token only inside its box (:class:`~difflab.nn.gligen.
    GatedSelfAttention`); off: GLIGEN as published, the routing learned."""
    grounding_gate: float = 0.0
    """Initial gamma of the gates, tanh(gamma) the share of the grounding update: 0 (GLIGEN) makes the
    network at initialisation exactly the one without grounding."""
    grounding_map: bool = False
    """Also paint the grounding tokens into their boxes at the input resolution, added after the first
    convolution (:class:`~difflab.nn.gligen.GroundingMap`, zero at initialisation). Needs ``grounding_dim``."""
    grounding_map_coords: bool = False
    """What the map paints also depends on where in the box a pixel sits (a small field over the token and
    the pixel's in-box coordinates, :class:`~difflab.nn.gligen.GroundingMap`). Needs ``grounding_map``."""
    attention_positions: bool = False
    """A learned position embedding in every attention layer (:class:`difflab.nn.attention.SpatialAttention`),
    so that attention knows where each pixel is: what 'to the left of' needs. Off: Stable Diffusion's UNet.
    On the text-to-image demo it did not help, position prompts included (docs/t2i.md)."""

    def __post_init__(self) -> None:
        # Ranges first, so that the divisibility checks below never divide by zero.
        for name in ("in_channels", "out_channels", "image_size", "channels", "heads", "norm_groups"):
            check_int(name, getattr(self, name), 1, MAX_SIZE)
        check_ints("channel_mult", self.channel_mult, 1, MAX_SIZE, nonempty=True)
        check_int("num_res_blocks", self.num_res_blocks, 0, MAX_SIZE)  # 0: the up path still has one
        check_ints("attention_resolutions", self.attention_resolutions, 1, MAX_SIZE)
        for name in ("head_dim", "num_classes", "context_dim", "pooled_dim", "grounding_dim"):
            check_optional_int(name, getattr(self, name), 1, MAX_SIZE)
        check_ints("class_factors", self.class_factors, 1, MAX_SIZE)
        check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_float("grounding_gate", self.grounding_gate)
        if self.grounding_map and self.grounding_dim is None:
            raise DifflabError(
                "grounding_map is set but grounding_dim is None; expected grounding tokens to paint"
            )
        if self.grounding_map_coords and not self.grounding_map:
            raise DifflabError(
                "grounding_map_coords is set but grounding_map is off; expected a map to shape"
            )
        if self.context_pool and self.context_dim is None:
            raise DifflabError("context_pool is set but context_dim is None; expected a context to pool")
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise DifflabError(
                f"image_size {self.image_size} is not divisible by 2^{levels - 1}, "
                f"as channel_mult {self.channel_mult} needs"
            )
        for m in self.channel_mult:
            if (self.channels * m) % self.norm_groups:
                raise DifflabError(
                    f"width {self.channels * m} is not divisible by norm_groups={self.norm_groups}"
                )
        # Every attention layer (at attention_resolutions and in the middle) splits its width into heads.
        for res in (*self.attention_resolutions, self.image_size // 2 ** (levels - 1)):
            level = int(math.log2(self.image_size // res)) if res <= self.image_size else 0
            width = self.channels * self.channel_mult[min(level, levels - 1)]
            if self.head_dim is not None and width % self.head_dim:
                raise DifflabError(
                    f"head_dim {self.head_dim} does not divide the attention width {width} at {res}px"
                )
            if self.head_dim is None and width % self.heads:
                raise DifflabError(
                    f"heads {self.heads} does not divide the attention width {width} at {res}px"
                )
        if self.class_factors and math.prod(self.class_factors) != self.num_classes:
            raise DifflabError(
                f"class_factors {self.class_factors} do not multiply to num_classes={self.num_classes}"
            )

    def heads_at(self, width: int) -> int:
        """Heads of an attention layer of ``width`` channels."""
        return width // self.head_dim if self.head_dim is not None else self.heads


class ClassEmbedding(nn.Module):
    """Class label -> (B, emb_dim). Label ``num_classes`` is the null class of classifier-free guidance.

    With ``factors`` (f_1, ..., f_k), label y = ((d_1 f_2 + d_2) f_3 + ...) + d_k is split into its digits
    and the embedding is ``sum_i E_i[d_i]``; the null class uses each table's extra null row.
    """

    def __init__(self, num_classes: int, emb_dim: int, factors: tuple[int, ...] = ()):
        super().__init__()
        self.num_classes = num_classes
        self.factors = tuple(factors) or (num_classes,)
        self.tables = nn.ModuleList(nn.Embedding(f + 1, emb_dim) for f in self.factors)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        null = labels == self.num_classes
        rest = labels.clamp(max=self.num_classes - 1)
        out = 0
        for f, table in reversed(list(zip(self.factors, self.tables, strict=True))):
            digit = torch.where(null, torch.full_like(rest, f), rest % f)
            out = out + table(digit)
            rest = rest // f
        return out


class UNet(nn.Module):
    """``forward(x, t, class_labels=None, context=None, context_mask=None, control=None, pooled=None,
    grounding=None, grounding_mask=None, grounding_boxes=None)``:
    (B, C_in, H, W), (B,) -> (B, C_out, H, W)."""

    def __init__(self, cfg: UNetConfig, *, encoder_only: bool = False):
        """``encoder_only``: build the embeddings, the down path and the middle block alone (a ControlNet's
        trainable copy, :mod:`difflab.nn.controlnet`); :meth:`forward` then has no decoder to run."""
        super().__init__()
        self.cfg = cfg
        ch, groups, emb_dim = cfg.channels, cfg.norm_groups, 4 * cfg.channels
        self.time_embed = TimestepEmbedding(ch, emb_dim)
        self.class_embed = (
            ClassEmbedding(cfg.num_classes, emb_dim, cfg.class_factors) if cfg.num_classes else None
        )
        self.pooled_embed = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        self.context_pool = (
            nn.Linear(cfg.context_dim, emb_dim) if cfg.context_pool and cfg.context_dim else None
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.grounding_map = (
            GroundingMap(cfg.grounding_dim, ch, coords=cfg.grounding_map_coords)
            if cfg.grounding_map
            else None
        )

        def positions(res: int) -> int | None:  # rows of an attention layer's position embedding at side res
            return res * res if cfg.attention_positions else None

        def gated(width: int) -> nn.Module | None:
            if not cfg.grounding_dim:
                return None
            return GatedSelfAttention(width, cfg.heads_at(width), cfg.grounding_dim, gate=cfg.grounding_gate,
                                      box_attention=cfg.grounding_box_attention)  # fmt: skip

        def attn(width: int, res: int) -> nn.Module | None:
            if res not in cfg.attention_resolutions:
                return None
            return SpatialAttention(width, cfg.heads_at(width), groups, cfg.context_dim, positions(res),
                                    gated(width))  # fmt: skip

        self.down = nn.ModuleList()  # entries: (resblock, attention or None) pairs, or a Downsample
        skip_widths = [ch]
        width, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = ResBlock(width, ch * mult, emb_dim, groups, cfg.dropout)
                width = ch * mult
                self.down.append(nn.ModuleList([block, attn(width, res) or nn.Identity()]))
                skip_widths.append(width)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(width))
                skip_widths.append(width)
                res //= 2

        self.mid1 = ResBlock(width, width, emb_dim, groups, cfg.dropout)
        self.mid_attn = SpatialAttention(width, cfg.heads_at(width), groups, cfg.context_dim, positions(res),
                                         gated(width))  # fmt: skip
        self.mid2 = ResBlock(width, width, emb_dim, groups, cfg.dropout)
        self.skip_widths = tuple(skip_widths)
        self.mid_width = width
        if encoder_only:
            return

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = ResBlock(width + skip_widths.pop(), ch * mult, emb_dim, groups, cfg.dropout)
                width = ch * mult
                self.up.append(nn.ModuleList([block, attn(width, res) or nn.Identity()]))
            if level > 0:
                self.up.append(Upsample(width))
                res *= 2

        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _apply_pair(self, pair: nn.ModuleList, h, emb, text: tuple):
        block, att = pair
        h = block(h, emb)
        return h if isinstance(att, nn.Identity) else att(h, *text)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
        pooled: torch.Tensor | None = None,
        grounding: torch.Tensor | None = None,
        grounding_mask: torch.Tensor | None = None,
        grounding_boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(x, t, class_labels, context, context_mask, pooled)
        text = (context, context_mask, grounding, grounding_mask, grounding_boxes)  # every attention layer's
        h, skips = self.encode(x, emb, text)
        return self.decode(h, skips, emb, text, control)

    def embed(self, x, t, class_labels=None, context=None, context_mask=None, pooled=None) -> torch.Tensor:
        """The embedding every residual block reads: time, plus class, pooled text and mean context. (B, 4C)"""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t)  # (B, 4C)
        if self.class_embed is not None:
            if class_labels is None:  # unconditional call: the null class
                class_labels = torch.full(
                    (x.shape[0],), self.cfg.num_classes, device=x.device, dtype=torch.long
                )
            emb = emb + self.class_embed(class_labels)
        if self.pooled_embed is not None and pooled is not None:
            emb = emb + self.pooled_embed(pooled)  # (B, 4C)
        if self.context_pool is not None and context is not None:
            keep = (
                torch.ones(context.shape[:2], device=x.device)
                if context_mask is None
                else context_mask.float()
            )
            mean = (context * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(
                min=1
            )  # (B, context_dim)
            emb = emb + self.context_pool(mean)
        return emb

    def encode(self, x, emb, text: tuple, hint: torch.Tensor | None = None):
        """The down path and the middle block: (h (B, C_mid, h, w), skips, one per down block and one for
        conv_in). ``hint`` (B, C, H, W) is added after the first convolution: ControlNet's copy reads its
        condition there (Zhang et al. 2023, Eq. 2)."""
        h = self.conv_in(x)
        if self.grounding_map is not None:
            h = self.grounding_map(h, *text[2:])  # (grounding, mask, boxes) -> (B, C, H, W)
        if hint is not None:
            h = h + hint
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else self._apply_pair(layer, h, emb, text)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), *text), emb)
        return h, skips

    def decode(self, h, skips: list, emb, text: tuple, control: list[torch.Tensor] | None = None):
        """The up path from the middle block's output, each block taking one skip, then the output layer.
        ``control``: a ControlNet's residuals, one per skip and one for the middle (Eq. 3's y_c terms)."""
        if control is not None:  # ControlNet: one residual per skip, then one for the middle
            if len(control) != len(skips) + 1:
                raise ValueError(f"control has {len(control)} residuals; this UNet takes {len(skips) + 1}")
            skips = [s + c for s, c in zip(skips, control[:-1], strict=True)]
            h = h + control[-1]
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = self._apply_pair(layer, torch.cat([h, skips.pop()], dim=1), emb, text)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_inputs(cfg: UNetConfig, batch: int, context_length: int = 24) -> dict[str, torch.Tensor]:
    """Random inputs of every kind ``cfg`` takes, for counting FLOPs and timing: noisy images, timesteps,
    class labels, and for text conditioning a caption of ``context_length`` tokens (clip_t2i's)."""
    g = torch.Generator().manual_seed(0)
    side = cfg.image_size
    inputs = {"x": torch.randn(batch, cfg.in_channels, side, side, generator=g),
              "t": torch.randint(0, 1000, (batch,), generator=g)}  # fmt: skip
    if cfg.num_classes:
        inputs["class_labels"] = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    if cfg.context_dim:
        inputs["context"] = torch.randn(batch, context_length, cfg.context_dim, generator=g)
        inputs["context_mask"] = torch.ones(batch, context_length, dtype=torch.bool)
    if cfg.pooled_dim:
        inputs["pooled"] = torch.randn(batch, cfg.pooled_dim, generator=g)
    return inputs


def training_step_flops(model: nn.Module, example_inputs: dict, loss_fn=None) -> int:
    """FLOPs of one forward + backward pass, counted by ``torch.utils.flop_counter`` (a multiply-add is
    2 FLOPs; convolutions, matmuls and attention are counted, elementwise ops are not)."""
    with FlopCounterMode(display=False) as counter:
        out = model(**example_inputs)
        (out.float().square().mean() if loss_fn is None else loss_fn(out)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
