"""A picture of the toy world: a grid of rendered scenes, each with its caption underneath."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from difflab.world.language import describe
from difflab.world.render import render
from difflab.world.scene import WorldConfig, scene_at


def save_preview(cfg: WorldConfig, n: int, seed: int, out: str | Path, field: str = "image") -> Path:
    """Render scenes ``0..n-1`` of ``seed`` and save a captioned grid (PNG, or any format matplotlib
    writes) to ``out``. ``field`` picks image, depth, edges or mask."""
    matplotlib.use("Agg")

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # Each cell: a 2-inch image with up to six lines of caption in the 1.3 inches under it.
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
