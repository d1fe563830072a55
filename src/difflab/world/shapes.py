"""Shape geometry of the toy world: which points lie inside a circle, square, triangle, diamond, cross or
star, and the anti-aliased coverage of one shape on the pixel grid.

Everything that draws or reads a shape uses these two functions - the flat renderer, the perspective
renderer of the depth world and both readers - so none of them can disagree about what a "triangle" is.
"""

from __future__ import annotations

import numpy as np

from difflab.errors import check_choice
from difflab.world.scene import ALL_SHAPES

# Cross (plus sign) proportions, relative to the bounding-circle radius r: arms of half-length 0.92 r and
# half-width 0.36 r, so the arm corners (0.92, 0.36) stay inside the bounding circle (0.92^2 + 0.36^2 < 1).
_CROSS_ARM, _CROSS_HALF_WIDTH = 0.92, 0.36

# Five-pointed star: tips on the bounding circle, the five inner corners at 0.5 r. A regular pentagram's
# 0.38 r leaves arms a pixel wide at the small size (4 px at 32x32); 0.5 keeps them readable there.
_STAR_POINTS, _STAR_INNER = 5, 0.5


def shape_inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of points (dx, dy) (pixels from the centre, y down) inside ``shape`` whose
    bounding circle has radius ``r``. Every shape is centred so its centroid is the centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":  # inscribed in the bounding circle: half-side r / sqrt(2)
        h = r / np.sqrt(2.0)
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":  # the same square turned by 45 degrees: vertices at distance r
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        # Equilateral, pointing up, inscribed in the bounding circle: each edge is at distance r/2
        # (the inradius) from the centre along its outward normal (0, 1), (+-sqrt(3)/2, -1/2).
        s = np.sqrt(3.0) / 2
        return (dy <= r / 2) & (s * dx - dy / 2 <= r / 2) & (-s * dx - dy / 2 <= r / 2)
    if shape == "cross":
        a, w = _CROSS_ARM * r, _CROSS_HALF_WIDTH * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= a) & (ay <= w)) | ((ax <= w) & (ay <= a))
    if shape == "star":
        return _inside_star(dx, dy, r)
    check_choice("shape", shape, ALL_SHAPES)
    raise AssertionError("unreachable")


def _inside_star(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """A five-pointed star pointing up. It is symmetric under turns of 72 degrees and reflection about each
    tip's axis, so a point is folded into the sector between a tip (angle 0) and the next inner corner
    (36 degrees), where the outline is one straight edge: inside is the centre's side of that edge."""
    sector = 2 * np.pi / _STAR_POINTS
    theta = np.mod(np.arctan2(dx, -dy), sector)  # angle from the upward tip, clockwise (y is down)
    phi = np.minimum(theta, sector - theta)  # folded into [0, sector / 2]
    rho = np.hypot(dx, dy)
    px, py = rho * np.cos(phi), rho * np.sin(phi)  # the point, the tip's axis along x
    tip = np.array([r, 0.0])
    corner = _STAR_INNER * r * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    ex, ey = corner - tip
    # the cross product (corner - tip) x (p - tip) has the centre's sign (ey * r > 0) on the inside
    return ex * (py - tip[1]) - ey * (px - tip[0]) >= 0


def shape_coverage(
    shape: str, cx: float, cy: float, r: float, height: int, width: int, supersample: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Anti-aliased coverage in [0, 1] of a shape centred at pixel coordinates (cx, cy).

    Returns ``(coverage, (top, left))``: coverage is a ``(h, w)`` window of the image (only the shape's
    bounding box, for speed) whose top-left pixel is ``(top, left)``.
    """
    top, left = max(int(np.floor(cy - r)) - 1, 0), max(int(np.floor(cx - r)) - 1, 0)
    bottom, right = min(int(np.ceil(cy + r)) + 1, height), min(int(np.ceil(cx + r)) + 1, width)
    s = supersample
    offsets = (np.arange(s) + 0.5) / s
    ys = (np.arange(top, bottom)[:, None] + offsets[None, :]).reshape(-1)  # (h*S,)
    xs = (np.arange(left, right)[:, None] + offsets[None, :]).reshape(-1)  # (w*S,)
    inside = shape_inside(shape, xs[None, :] - cx, ys[:, None] - cy, r)  # (h*S, w*S)
    h, w = bottom - top, right - left
    coverage = inside.reshape(h, s, w, s).mean(axis=(1, 3))  # (h, w)
    return coverage, (top, left)
