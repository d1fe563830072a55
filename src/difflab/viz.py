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
from difflab.outputs import FIGURE_MAX, MAX_PIXELS, picture_problem, save_image, write_file


def grid_shape(n: int, height: int, width: int, nrow: int | None = None, pad: int = 1) -> tuple[int, int]:
    """(rows, columns) of pixels of :func:`grid_array`'s mosaic of ``n`` tiles of ``height`` x ``width``."""
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    return rows * (height + pad) + pad, nrow * (width + pad) + pad


def grid_array(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1], or uint8 tiles (N, H, W, C) as :func:`~difflab.data.images.to_uint8`
    makes them -> one uint8 (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) mosaic, grey-padded."""
    tiles = images if isinstance(images, np.ndarray) else to_uint8(images)  # (N, H, W, C)
    n, h, w, c = tiles.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    out = np.full((*grid_shape(n, h, w, nrow, pad), 3), 128, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = tiles[i]
    return out


def grid_problem(n: int, height: int, width: int) -> str | None:
    """Why ``n`` tiles of ``height`` x ``width`` should not make one grid picture
    (:func:`difflab.outputs.picture_problem`; counted at scale 1, as :func:`grid_scale` shrinks the
    upscale to fit), or None."""
    rows, cols = grid_shape(n, height, width)
    return picture_problem(n, cols, rows)


def grid_scale(height: int, width: int, scale: int = 4) -> int:
    """The nearest-neighbour upscale of a ``height`` x ``width`` mosaic: ``scale``, or less where the
    result would pass PIL's decompression-bomb limit (:data:`difflab.outputs.MAX_PIXELS`); at least 1."""
    while scale > 1 and height * width * scale * scale > MAX_PIXELS:
        scale -= 1
    return scale


def save_grid(
    images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 4
) -> Path:
    """Save a grid of (N, C, H, W) images in [-1, 1] (or uint8 tiles, see :func:`grid_array`) as a picture
    (PNG unless ``path`` says otherwise), upscaled ``scale``x with nearest-neighbour so small images stay
    crisp (less for a mosaic too big for that, :func:`grid_scale`). Written atomically; returns the path."""
    arr = grid_array(images, nrow)
    img = Image.fromarray(arr)
    scale = grid_scale(img.height, img.width, scale)
    return save_image(img.resize((img.width * scale, img.height * scale), Image.NEAREST), path)


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


CAPTIONED_DPI = 120


def save_captioned_grid(
    images: torch.Tensor | np.ndarray,
    captions: list[str],
    path: str | Path,
    ncol: int = 6,
    marks: list[bool] | None = None,
    boxes: list[list[tuple[tuple[float, float, float, float], tuple[float, float, float]]]] | None = None,
) -> Path:
    """Images (N, C, H, W) in [-1, 1] (or uint8 tiles, see :func:`grid_array`), each under its caption (a
    prompt), ``ncol`` per row. ``marks``: a judge's verdict per image, drawn as a green (holds) or red (does
    not) caption. ``boxes``: per image, (x0, y0, x1, y1) in canvas fractions and an RGB colour, drawn as
    dashed outlines (a planned layout). At most :func:`captioned_grid_problem` allows; written atomically."""
    matplotlib.use("Agg")

    n = len(images)
    rows = math.ceil(n / ncol)
    fig, axes = plt.subplots(rows, ncol, figsize=captioned_grid_inches(n, ncol), squeeze=False)
    tiles = images if isinstance(images, np.ndarray) else to_uint8(images)
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
    return save_figure(fig, path, dpi=CAPTIONED_DPI)


def captioned_grid_inches(n: int, ncol: int) -> tuple[float, float]:
    """(width, height) in inches of :func:`save_captioned_grid`'s figure of ``n`` images, ``ncol`` a row;
    times :data:`CAPTIONED_DPI` it is the picture's size in pixels."""
    return 1.6 * ncol, 1.95 * math.ceil(n / ncol)


def captioned_grid_problem(n: int, ncol: int) -> str | None:
    """Why :func:`save_captioned_grid` should not draw ``n`` images ``ncol`` a row, or None."""
    width, height = captioned_grid_inches(n, ncol)
    return picture_problem(n, round(width * CAPTIONED_DPI), round(height * CAPTIONED_DPI), most=FIGURE_MAX)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it atomically (PNG, or the format its suffix names; the folder
    made) and free it; returns the path."""
    fig.tight_layout()
    try:
        return write_file(path, lambda tmp, fmt: fig.savefig(tmp, dpi=dpi, format=fmt), writer="figure")
    finally:
        plt.close(fig)
