"""Cross-attention maps: where in the image each prompt token is looked at (Hertz et al. 2022, Sec. 3.1-3.2).

In a text-conditioned UNet every cross-attention layer computes, for each pixel p of its feature map and
each prompt token j, a probability ``M[p, j] = softmax_j(Q_p K_j^T / sqrt(d))``. Prompt-to-Prompt reads
the word "circle"'s column as a picture of where the circle is drawn. The map shown here is that column
averaged over heads, over every cross-attention layer (each upsampled bilinearly to the image side), and
over every sampling step, as Hertz et al. average over steps and layers of the 16x16 resolution.

Recording runs the attention with explicit probabilities (``MultiHeadAttention.probs_hook``) instead of
the fused kernel; outside ``recording`` nothing changes. Under classifier-free guidance the batch is
[conditional; unconditional], and only the conditional half (the first ``n``) is kept.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from difflab.errors import DifflabError
from difflab.nn.attention import MultiHeadAttention
from difflab.text.tokenizer import normalize
from difflab.viz import save_figure


class CrossAttentionMaps:
    """Accumulates cross-attention maps; ``maps()`` gives the mean (N, L, size, size) over heads, layers
    and steps, one map per token position of each of the N prompts."""

    def __init__(self, size: int):
        self.size = size
        self.total: torch.Tensor | None = None
        self.count = 0

    def _hook(self, n: int):
        def hook(probs: torch.Tensor) -> None:  # (B, heads, H*W, L); B = n, or 2n under guidance
            b, _, hw, length = probs.shape
            side = int(round(hw**0.5))
            m = probs[:n].mean(dim=1).transpose(1, 2).reshape(n, length, side, side)  # (n, L, h, w)
            m = F.interpolate(m.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
            self.total = m if self.total is None else self.total + m
            self.count += 1

        return hook

    @contextlib.contextmanager
    def recording(self, unet: torch.nn.Module, n: int):
        """Record the cross-attention of ``unet`` for the first ``n`` items of every call inside."""
        layers = [m for name, m in unet.named_modules() if name.endswith("cross_attn")]
        layers = [m for m in layers if isinstance(m, MultiHeadAttention)]
        if not layers:
            raise DifflabError("this network has no cross-attention layers to record (an MMDiT reads the text in "
                               "its joint attention; a UNet needs context_dim)")  # fmt: skip
        for m in layers:
            m.probs_hook = self._hook(n)
        try:
            yield self
        finally:
            for m in layers:
                m.probs_hook = None

    def maps(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no cross-attention was recorded")
        return (self.total / self.count).cpu()

    def set_maps(self, maps: torch.Tensor) -> None:
        """Hold ``maps`` (N, ...) as the recorded means: the maps of a request recorded batch by batch, each
        image's maps its own mean over steps, put side by side."""
        self.total, self.count = maps, 1


def save_attention_overlays(
    images: torch.Tensor, maps: torch.Tensor, prompts: list[str], path: str | Path
) -> Path:
    """One row per prompt: the image, then each word's map over its grey copy (inferno colours: brighter =
    more attention, each map scaled to its own range), titled with the word. The <bos>/<eos>/padding
    positions are left out. images (N, 3, H, W) in [-1, 1]."""
    matplotlib.use("Agg")  # files only, whatever backend the caller's session has

    words = [normalize(p) for p in prompts]  # token j + 1 of a prompt is its word j (0 is <bos>)
    cols = 1 + max(len(w) for w in words)
    fig, axes = plt.subplots(len(prompts), cols, figsize=(1.3 * cols, 1.45 * len(prompts)), squeeze=False)
    for r, (image, m, ws) in enumerate(zip(images, maps, words, strict=True)):
        rgb = ((image.float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
        axes[r, 0].imshow(rgb, interpolation="nearest")
        axes[r, 0].set_title(
            prompts[r] if len(prompts[r]) < 40 else prompts[r][:37] + "...", fontsize=6, loc="left"
        )
        for j, word in enumerate(ws):
            heat = m[j + 1]
            heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
            grey = rgb.mean(-1, keepdims=True)
            axes[r, j + 1].imshow(
                0.3 * grey + 0.7 * plt.cm.inferno(heat.numpy())[..., :3], interpolation="nearest"
            )
            axes[r, j + 1].set_title(word, fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    return save_figure(fig, path)
