"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 4 and Fig. 2), a denoiser that
takes the same ``(x, t, context, context_mask, pooled)`` as :class:`difflab.nn.unet.UNet`.

Where the UNet *cross*-attends from pixels to text, MMDiT keeps two token streams, image and text, and
lets them meet in one *joint* self-attention over their concatenation:

    image  x (B, C, H, W) -> P x P patches, stride P -> (B, N, D), N = HW / P^2, + fixed 2D sin-cos positions
    text   context (B, L, context_dim)              -> linear -> (B, L, D)   (no positions: the text
                                                                             encoder already put them in)
    c = MLP(sinusoidal(t)) + MLP(pooled)               (B, D)   the conditioning vector of every block

    one block, for each stream s in {text, image} with its own weights:
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear_s(SiLU(c))       (adaLN-Zero, 6 x (B, D))
        q_s, k_s, v_s = qkv_s(LN(h_s) (1 + scale1) + shift1),   q_s <- RMSNorm(q_s), k_s <- RMSNorm(k_s)
    joint attention, queries and keys/values from both streams (padded text tokens masked out as keys):
        [o_text; o_image] = softmax([q_text; q_image] [k_text; k_image]^T / sqrt(d)) [v_text; v_image]
    then each stream again with its own weights:
        h_s <- h_s + gate1 * out_s(o_s)
        h_s <- h_s + gate2 * MLP_s(LN(h_s) (1 + scale2) + shift2)

    image tokens -> LN(h) (1 + scale) + shift -> linear to P^2 C_out -> unpatchify -> (B, C_out, H, W)

Every residual branch is ``h + gate * f(LN(h) (1 + scale) + shift)``, DiT's adaLN-Zero (Peebles & Xie 2023,
Sec. 3.2): the linear layers that produce shift/scale/gate start at zero, so every block starts as the
identity, and the final layer starts at zero, so the untrained network predicts 0 (as the UNet's conv_out).

Why separate weights per modality: text embeddings and image latents have different statistics (scale,
dynamic range, what a direction means), so SD3 gives each its own norms, modulation, projections and MLP
and shares only the attention operation, "equivalent to having two independent transformers for each
modality, but joining the sequences of the two modalities for the attention operation" (Sec. 4). Unlike
cross-attention, the text tokens are updated by the image too, layer after layer.

QK-normalisation (RMSNorm on queries and keys per head, Sec. 5.3.2) keeps the attention logits from
growing without bound, which SD3 found to destabilise training of large models at high resolution.

Timesteps are read on DDPM's 0..1000 scale; a rectified-flow caller with t in [0, 1] passes ``1000 t``
as SD3 does, so that the sinusoidal features see distinct values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_int
from difflab.nn.embeddings import TimestepEmbedding, sinusoidal_embedding
from difflab.nn.transformer import check_mlp_ratio

TIMESTEP_FEATURES = 256
"""Sinusoidal features fed to the timestep MLP (DiT's ``frequency_embedding_size``)."""


@dataclass(frozen=True)
class MMDiTConfig:
    """Shape of an MMDiT. The defaults are a small model for 16x16x4 latents (an 8x downsampled 128 px
    image) and 128-wide text tokens."""

    in_channels: int = 4
    out_channels: int = 4
    image_size: int = 16
    """Input side in pixels (latent pixels for a latent model); the position embedding is built for it."""
    patch_size: int = 2
    """Side of a patch; attention costs O((N + L)^2) with N = (image_size / patch_size)^2 image tokens."""
    width: int = 128
    """Token width D of both streams (they must agree to be concatenated for joint attention)."""
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context_dim: int = 128
    """Width of the text tokens given as ``context``."""
    pooled_dim: int | None = 64
    """Width of the pooled text embedding added to the timestep embedding (SD3 Fig. 2a's "y" from CLIP's
    pooled outputs); None: not used."""
    qk_norm: bool = True
    """RMSNorm on queries and keys per head (SD3 Sec. 5.3.2)."""

    def __post_init__(self) -> None:
        sizes = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "depth": self.depth,
            "heads": self.heads,
            "context_dim": self.context_dim,
        }
        if self.pooled_dim is not None:
            sizes["pooled_dim"] = self.pooled_dim
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DifflabError(f"MMDiT {name} {value!r} is not a positive integer")
            check_int(f"MMDiT {name}", value, 1, MAX_SIZE)
        if not self.mlp_ratio > 0:
            raise DifflabError(f"MMDiT mlp_ratio {self.mlp_ratio!r} is not a positive number")
        check_mlp_ratio(self.mlp_ratio, self.width)
        if self.image_size % self.patch_size:
            raise DifflabError(
                f"MMDiT patch_size {self.patch_size} does not divide image_size {self.image_size}; "
                "expected a divisor such as 2 or 4"
            )
        if self.width % self.heads:
            raise DifflabError(f"MMDiT width {self.width} is not divisible by heads={self.heads}")
        if self.width % 4:
            raise DifflabError(
                f"MMDiT width {self.width} is not divisible by 4, as the 2D sine-cosine position "
                "embedding needs (a sine and a cosine for each of the two axes)"
            )

    @property
    def grid(self) -> int:
        """Patches along each side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


def sincos_2d_position_embedding(side: int, dim: int) -> torch.Tensor:
    """The fixed 2D sine-cosine position embedding of ViT-MAE (He et al. 2022) used by DiT (Peebles & Xie
    2023, Sec. 3.2): the first half of the channels is the 1D sinusoidal embedding (Vaswani et al. 2017,
    Sec. 3.5) of the patch's row, the second half that of its column.

    -> (side * side, dim), patches in row-major order (as a patchify convolution's output flattens).
    """
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # (side, side) each
    return torch.cat(
        [sinusoidal_embedding(rows.flatten(), dim // 2), sinusoidal_embedding(cols.flatten(), dim // 2)],
        dim=1,
    )


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's ``h (1 + scale) + shift`` (DiT Sec. 3.2); ``1 +`` so that a zero scale leaves ``h``.
    (B, T, D), (B, D), (B, D) -> (B, T, D)."""
    return h * (1 + scale[:, None]) + shift[:, None]


class Stream(nn.Module):
    """One modality's weights in a joint block: the adaLN-Zero modulation, norms, qkv and output projections
    and MLP around the shared attention. ``pre_only``: only the half before attention, for the text stream
    of the last block, whose output nobody reads (SD3 drops it too); unused weights would also stall
    DistributedDataParallel, which waits for every parameter's gradient."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        head_dim = width // heads
        # No affine: the per-sample shift and scale from c replace LayerNorm's learned ones.
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, (2 if pre_only else 6) * width))
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        if not pre_only:
            hidden = int(width * mlp_ratio)
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = nn.Sequential(
                nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
            )

    def attention_inputs(
        self, h: torch.Tensor, mod: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q, k, v, each (B, heads, T, D / heads)."""
        b, n, d = h.shape
        qkv = self.qkv(modulate(self.norm1(h), mod[0], mod[1]))  # (B, T, 3D)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d/h)
        return self.q_norm(q), self.k_norm(k), v

    def finish(self, h: torch.Tensor, attended: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The two gated residual branches after attention: (B, T, D), (B, T, D) -> (B, T, D)."""
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod
        h = h + gate_attn[:, None] * self.proj(attended)
        return h + gate_mlp[:, None] * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """An MMDiT block (SD3 Fig. 2b): two streams, one joint attention.
    (B, N, D) image, (B, L, D) text, (B, D) c -> (B, N, D), (B, L, D) (text None in the last block)."""

    def __init__(self, cfg: MMDiTConfig, last: bool = False):
        super().__init__()
        args = (cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)
        self.image = Stream(*args)
        self.text = Stream(*args, pre_only=last)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mod_img = self.image.modulation(c).chunk(6, dim=-1)  # 6 x (B, D)
        mod_txt = self.text.modulation(c).chunk(2 if self.text.pre_only else 6, dim=-1)
        q_i, k_i, v_i = self.image.attention_inputs(img, mod_img)
        q_t, k_t, v_t = self.text.attention_inputs(txt, mod_txt)
        # Text first, then image: [text; image] along the token axis, (B, h, L+N, d/h) each.
        q, k, v = (torch.cat(pair, dim=2) for pair in ((q_t, q_i), (k_t, k_i), (v_t, v_i)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, h, L+N, d/h)
        b, length, n, d = txt.shape[0], txt.shape[1], img.shape[1], img.shape[2]
        out_txt, out_img = out.transpose(1, 2).reshape(b, length + n, d).split([length, n], dim=1)
        img = self.image.finish(img, out_img, mod_img)
        return img, None if self.text.pre_only else self.text.finish(txt, out_txt, mod_txt)


class FinalLayer(nn.Module):
    """adaLN (shift and scale from c, no gate) then a linear map to the pixels of each patch:
    (B, N, D), (B, D) -> (B, N, P^2 C_out)."""

    def __init__(self, width: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_values)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))


class MMDiT(nn.Module):
    """``forward(x, t, context=None, context_mask=None, pooled=None)``: (B, C_in, H, W), (B,) ->
    (B, C_out, H, W). ``context`` (B, L, context_dim) text tokens, ``context_mask`` (B, L) True on real
    tokens, ``pooled`` (B, pooled_dim). Without ``context`` the image tokens attend only to each other."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_channels, w, cfg.patch_size, stride=cfg.patch_size)
        # Fixed, not learned (DiT): not saved in checkpoints, rebuilt from the config.
        self.register_buffer("pos_embed", sincos_2d_position_embedding(cfg.grid, w)[None], persistent=False)
        self.context_embed = nn.Linear(cfg.context_dim, w)
        self.time_embed = TimestepEmbedding(TIMESTEP_FEATURES, w)
        self.pooled_embed = (
            nn.Sequential(nn.Linear(cfg.pooled_dim, w), nn.SiLU(), nn.Linear(w, w))
            if cfg.pooled_dim
            else None
        )
        self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.final = FinalLayer(w, cfg.patch_size**2 * cfg.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation (Peebles & Xie 2023, Sec. 3.2 and its code): Xavier-uniform linear layers,
        the patchify convolution initialised as the linear map it is, N(0, 0.02) timestep MLP, and zeros for
        every adaLN modulation and the output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.cfg.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.time_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        zeroed = [block.image.modulation[-1] for block in self.blocks]
        zeroed += [block.text.modulation[-1] for block in self.blocks]
        zeroed += [self.final.modulation[-1], self.final.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, P^2 C) -> (B, C, H, W), the inverse of cutting the image into row-major P x P patches."""
        b, g, p = tokens.shape[0], self.cfg.grid, self.cfg.patch_size
        x = tokens.view(b, g, g, p, p, -1)  # (B, grid_row, grid_col, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, g * p, g * p)  # (B, C, grid_row P, grid_col P)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cfg = self.cfg
        given = sorted(name for name, value in kwargs.items() if value is not None)
        if given:  # e.g. class labels passed as to the UNet would otherwise be dropped without a word
            raise DifflabError(
                f"MMDiT takes no {', '.join(given)}; its conditioning is context, context_mask and pooled"
            )
        b = x.shape[0]
        if tuple(x.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise DifflabError(
                f"MMDiT input of shape {tuple(x.shape)}; expected (B, {cfg.in_channels}, {cfg.image_size}, "
                f"{cfg.image_size}) as its config says"
            )
        if t.ndim == 0:
            t = t.expand(b)
        c = self.time_embed(t)  # (B, D)
        if pooled is not None:
            if self.pooled_embed is None:
                raise DifflabError("MMDiT got a pooled text embedding but was built with pooled_dim=None")
            if pooled.shape != (b, cfg.pooled_dim):
                raise DifflabError(f"pooled of shape {tuple(pooled.shape)}; expected ({b}, {cfg.pooled_dim})")
            c = c + self.pooled_embed(pooled)

        if context is None:  # unconditional: zero text tokens, so only the image attends
            context, context_mask = x.new_zeros(b, 0, cfg.context_dim), None
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise DifflabError(
                f"context of shape {tuple(context.shape)}; expected ({b}, L, {cfg.context_dim})"
            )
        img = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        txt = self.context_embed(context)  # (B, L, D)
        key_mask = None
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise DifflabError(
                    f"context_mask of shape {tuple(context_mask.shape)}; expected {tuple(context.shape[:2])}"
                )
            # Image keys are always allowed, so no query's row is all masked (which would give NaN).
            image_keys = torch.ones(b, img.shape[1], dtype=torch.bool, device=x.device)
            key_mask = torch.cat([context_mask.bool(), image_keys], dim=1)[:, None, None, :]  # (B, 1, 1, L+N)

        for block in self.blocks:
            img, txt = block(img, txt, c, key_mask)
        return self.unpatchify(self.final(img, c))


def example_inputs(cfg: MMDiTConfig, batch: int, context_length: int = 24) -> dict[str, torch.Tensor]:
    """Random inputs of every kind ``cfg`` takes, for counting FLOPs and timing (as
    :func:`difflab.nn.unet.example_inputs`): noisy latents, timesteps, a caption of ``context_length``
    tokens with its mask, and the pooled text embedding when the config takes one."""
    g = torch.Generator().manual_seed(0)
    side = cfg.image_size
    inputs = {
        "x": torch.randn(batch, cfg.in_channels, side, side, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
        "context": torch.randn(batch, context_length, cfg.context_dim, generator=g),
        "context_mask": torch.ones(batch, context_length, dtype=torch.bool),
    }
    if cfg.pooled_dim:
        inputs["pooled"] = torch.randn(batch, cfg.pooled_dim, generator=g)
    return inputs
