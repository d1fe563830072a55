"""A picture of the toy world: a grid of rendered scenes, each with its caption underneath."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from difflab.errors import DifflabError
from difflab.outputs import FIGURE_MAX, largest, picture_problem, write_file
from difflab.world.language import describe
from difflab.world.render import render
from difflab.world.scene import WorldConfig, scene_at

PREVIEW_DPI = 110


def preview_inches(n: int) -> tuple[float, float]:
    """(width, height) in inches of the preview of ``n`` scenes: a near-square grid of cells, each a 2-inch
    image with up to six lines of caption in the 1.3 inches under it. Times :data:`PREVIEW_DPI`: pixels."""
    cols = math.ceil(math.sqrt(n))
    return 2.4 * cols, 3.3 * math.ceil(n / cols)


def preview_problem(n: int) -> str | None:
    """Why ``n`` scenes do not make one preview picture (:func:`difflab.outputs.picture_problem`), or None."""
    width, height = preview_inches(n)
    return picture_problem(n, round(width * PREVIEW_DPI), round(height * PREVIEW_DPI), most=FIGURE_MAX)


def check_preview(n: int) -> None:
    """A named error, before anything is rendered, when ``n`` scenes do not fit one preview picture."""
    problem = preview_problem(n)
    if problem is not None:
        most = largest(lambda k: preview_problem(k) is None, min(n, FIGURE_MAX))
        raise DifflabError(f"--n {n} is too many scenes for one preview: {problem}; expected --n <= {most}")


def save_preview(cfg: WorldConfig, n: int, seed: int, out: str | Path, field: str = "image",
                 progress: bool = False) -> Path:  # fmt: skip
    """Render scenes ``0..n-1`` of ``seed`` and save a captioned grid (PNG, or any format matplotlib
    writes) to ``out``, atomically. ``field`` picks image, depth, edges or mask. At most
    :data:`~difflab.outputs.FIGURE_MAX` scenes and PIL's pixel limit (:func:`check_preview`)."""
    check_preview(n)
    matplotlib.use("Agg")

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=preview_inches(n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in tqdm(range(n), desc="rendering", unit="scene", disable=not progress, leave=False):
        scene = scene_at(cfg, seed, i)
        data = getattr(render(scene, cfg), field)
        ax = axes.flat[i]
        if field == "image":
            ax.imshow(data, interpolation="nearest")
        else:
            vmax = max(len(scene.objects), 1) if field == "mask" else 1.0
            ax.imshow(
                np.asarray(data, dtype=float), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest"
            )
        caption = "\n".join(textwrap.wrap(describe(scene), 32))
        ax.text(0.5, -0.03, caption, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.99, bottom=0.08, wspace=0.08, hspace=0.55)
    try:
        return write_file(
            out, lambda tmp, fmt: fig.savefig(tmp, dpi=PREVIEW_DPI, format=fmt), writer="figure"
        )
    finally:
        plt.close(fig)
