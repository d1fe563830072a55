"""The page's pictures: the world's 16-64 pixel images enlarged without blurring, fields in colour."""

from __future__ import annotations

import threading

import numpy as np

FIGURES = threading.Lock()
"""Held while matplotlib draws a figure: the page's events run in threads, and matplotlib's mathtext parser
(pyparsing) fails when two figures with TeX-like titles are drawn at once (seen: a ParseException when the
Schedules and Train tabs drew together as the page opened)."""

SHOWN_SIDE = 192
"""About how many screen pixels a tile's side gets: the browser would smooth a 16-pixel image into a blur,
so tiles are enlarged here by a whole factor, each pixel a block."""


def enlarge(tile: np.ndarray, side: int = SHOWN_SIDE) -> np.ndarray:
    """``tile`` (H, W[, C]) repeated by the whole factor that brings its side nearest ``side`` (at least 1)."""
    k = max(1, round(side / max(tile.shape[:2])))
    return np.repeat(np.repeat(tile, k, axis=0), k, axis=1)


def colormapped(field: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    """A (H, W) field (depth, edges, mask) as (H, W, 3) uint8 in viridis over [0, vmax], as
    ``difflab world preview --field`` draws it."""
    from matplotlib import colormaps

    unit = np.clip(np.asarray(field, dtype=np.float64) / max(vmax, 1e-12), 0.0, 1.0)
    return (colormaps["viridis"](unit)[..., :3] * 255).round().astype(np.uint8)


def rgb(tile: np.ndarray) -> np.ndarray:
    """A (H, W, C) uint8 tile as RGB: a greyscale (C = 1) tile repeated over three channels."""
    return np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile


def strip(rows: list[list[np.ndarray]], gap: int = 1) -> np.ndarray:
    """Equal-sized RGB tiles laid out in rows with a ``gap``-pixel white border between them."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) + gap, ncol * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            out[y : y + h, x : x + w] = rgb(tile)
    return out
