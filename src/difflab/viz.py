"""Pictures people would rather look at than read: sample grids and denoising trajectories."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from difflab.data.images import to_uint8


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) mosaic, grey-padded."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    tiles = to_uint8(images)  # (N, H, W, C)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = tiles[i]
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Save a grid of (N, C, H, W) images in [-1, 1] as a PNG, upscaled ``scale``x with nearest-neighbour
    so small images stay crisp."""
    arr = grid_array(images, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
    return path


class TrajectoryRecorder:
    """A sampler callback that keeps ``x_t`` and the model's ``x0_hat`` at ``frames`` evenly spaced steps
    of the first ``keep`` samples, for the strip that shows noise turning into a picture."""

    def __init__(self, total_steps: int, frames: int = 8, keep: int = 4):
        self.at = set(np.linspace(0, total_steps - 1, min(frames, total_steps)).round().astype(int).tolist())
        self.keep = keep
        self.xs: list[torch.Tensor] = []
        self.x0s: list[torch.Tensor] = []
        self.ts: list[int] = []

    def __call__(self, i: int, x: torch.Tensor, t: int, x0: torch.Tensor) -> None:
        if i in self.at:
            self.xs.append(x[: self.keep].detach().float().cpu().clamp(-1, 1))
            self.x0s.append(x0[: self.keep].detach().float().cpu().clamp(-1, 1))
            self.ts.append(int(t))

    def save(self, path: str | Path) -> Path:
        """Rows: for each kept sample, x_t over the recorded steps, then x0_hat over the same steps."""
        rows = []
        for j in range(self.xs[0].shape[0]):
            rows.append(torch.stack([x[j] for x in self.xs]))
            rows.append(torch.stack([x0[j] for x0 in self.x0s]))
        return save_grid(torch.cat(rows), path, nrow=len(self.xs))


def save_captioned_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | Path,
    ncol: int = 6,
    marks: list[bool] | None = None,
    boxes: list[list[tuple[tuple[float, float, float, float], tuple[float, float, float]]]] | None = None,
) -> Path:
    """Images (N, C, H, W) in [-1, 1], each under its caption (a prompt), ``ncol`` per row. ``marks``:
    a judge's verdict per image, drawn as a green (holds) or red (does not) caption. ``boxes``: per image,
    (x0, y0, x1, y1) in canvas fractions and an RGB colour, drawn as dashed outlines (a planned layout)."""
    matplotlib.use("Agg")

    n = len(images)
    rows = math.ceil(n / ncol)
    fig, axes = plt.subplots(rows, ncol, figsize=(1.6 * ncol, 1.95 * rows), squeeze=False)
    tiles = to_uint8(images)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(tiles[i].squeeze(-1) if tiles.shape[-1] == 1 else tiles[i], interpolation="nearest",
                  cmap="gray" if tiles.shape[-1] == 1 else None)  # fmt: skip
        side = tiles.shape[1]
        for (x0, y0, x1, y1), rgb in boxes[i] if boxes is not None else ():
            ax.add_patch(matplotlib.patches.Rectangle((x0 * side - 0.5, y0 * side - 0.5), (x1 - x0) * side,
                                                      (y1 - y0) * side, fill=False, linestyle="--",
                                                      linewidth=0.8, edgecolor=rgb))  # fmt: skip
        color = "black" if marks is None else ("tab:green" if marks[i] else "tab:red")
        ax.set_title("\n".join(textwrap.wrap(captions[i], 22)), fontsize=6.5, color=color)
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it as PNG (making the folder) and free it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
