"""Drawing the depth world: shaded solids on a ground plane, seen in perspective (``style='perspective'``).

The flat world's depth is a label with no trace in its pixels, so no estimator could recover it. Here
depth has the cues a photograph has (Marigold, Ke et al. 2024, learns from exactly such cues):

- **a ground plane under a horizon** (:mod:`difflab.world.camera`): its depth rises continuously toward
  the horizon, its checkered tiles shrink with distance, and linear fog fades it into the sky;
- **perspective**: an object's image size and its height in the picture follow its distance;
- **shaded solids**: each shape is the silhouette of a relief that bulges toward the camera by its
  physical radius - a circle is a sphere, a square, diamond or triangle a pyramid, a cross a ridged
  cross (:func:`relief`) - lit by one light from the upper left (Lambert's cosine law), so per-pixel
  depth and brightness vary across its surface;
- **occlusion**: nearer objects hide parts of farther ones (a z-buffer per sub-sample).

The depth map is exact per sub-sample (the surface's distance ``Z`` along the optical axis, stored as
``Z / Z_FAR``), then averaged over each pixel's sub-samples like the image. Shapes keep the flat world's
silhouettes (:mod:`difflab.world.shapes`), so captions, questions and the reader's vocabulary carry over.
"""

from __future__ import annotations

import numpy as np

from difflab.world import camera
from difflab.world.scene import PALETTE, Scene, WorldConfig, object_radius_px
from difflab.world.shapes import _CROSS_ARM, _CROSS_HALF_WIDTH, shape_inside

GROUND_COLOR = (0.17, 0.15, 0.12)
"""The ground near the camera: a dark warm grey, far in colour from every palette colour at every shade."""
FOG_COLOR = (0.52, 0.58, 0.66)
"""The fog, and the sky (which is all fog)."""
TILE, TILE_CONTRAST = 0.5, 0.12
"""Ground tiles of side 0.5 camera heights, alternately 12 % lighter and darker: a texture gradient."""
LIGHT = np.array([-0.45, -0.55, 0.70]) / np.linalg.norm([-0.45, -0.55, 0.70])
"""Direction toward the light (x right, y down, z toward the camera): from the upper left, in front."""
AMBIENT, DIFFUSE = 0.5, 0.5
"""Shade = AMBIENT + DIFFUSE * max(0, n . LIGHT): between half and full of the palette colour."""


def relief(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """How far the solid's surface bulges toward the camera at (dx, dy) from its centre, as a fraction of
    its radius: 1 at the apex, 0 on the silhouette (values outside the shape are meaningless).

    A circle is a hemisphere, ``sqrt(1 - rho^2 / r^2)`` (a sphere's front). Every convex polygon is a
    pyramid: the distance to the nearest edge over the inradius (one plane per face, so each face has
    one shade). The cross is the union of two bars, each a roof over its own width."""
    if shape == "circle":
        return np.sqrt(np.clip(1.0 - (dx * dx + dy * dy) / (r * r), 0.0, 1.0))
    if shape == "square":
        h = r / np.sqrt(2.0)
        return np.clip((h - np.maximum(np.abs(dx), np.abs(dy))) / h, 0.0, 1.0)
    if shape == "diamond":
        return np.clip((r - np.abs(dx) - np.abs(dy)) / r, 0.0, 1.0)
    if shape == "triangle":  # edges at distance r / 2 (the inradius) along normals (0, 1), (+-sqrt(3)/2, -1/2)
        s = np.sqrt(3.0) / 2
        inner = np.minimum(np.minimum(r / 2 - dy, r / 2 - (s * dx - dy / 2)), r / 2 - (-s * dx - dy / 2))
        return np.clip(inner / (r / 2), 0.0, 1.0)
    if shape == "cross":
        a, w = _CROSS_ARM * r, _CROSS_HALF_WIDTH * r
        ax, ay = np.abs(dx), np.abs(dy)
        bars = np.maximum(np.minimum(a - ax, w - ay), np.minimum(w - ax, a - ay))
        return np.clip(bars / w, 0.0, 1.0)
    return np.zeros_like(dx * dy)  # a shape without a solid (the star): a flat cut-out facing the camera


def subsample_centres(cfg: WorldConfig) -> np.ndarray:
    """Canvas coordinates (fractions) of the sub-sample centres along one axis, (n * S,)."""
    n, s = cfg.resolution, cfg.supersample
    return ((np.arange(n)[:, None] + (np.arange(s)[None, :] + 0.5) / s) / n).reshape(-1)


def background(cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """The empty world at sub-sample resolution: colour (n S, n S, 3) and distance ``Z`` (n S, n S).

    Rows below the horizon see the ground at ``Z = f h / (v - horizon)``, at lateral position
    ``X = (u - 0.5) Z / f``; tiles alternate with ``floor(X / TILE) + floor(Z / TILE)``. Fog mixes in
    linearly from ``FOG_START`` to ``Z_FAR``; the sky and the ground beyond are fog, at ``Z_FAR``."""
    c = subsample_centres(cfg)
    z = np.minimum(camera.ground_distance(c), camera.Z_FAR)[:, None] * np.ones_like(c)[None, :]  # (nS, nS)
    x = (c[None, :] - 0.5) * z / camera.FOCAL
    tiles = (np.floor(x / TILE) + np.floor(z / TILE)) % 2  # 0 or 1
    ground = np.asarray(GROUND_COLOR) * (1 + TILE_CONTRAST * (2 * tiles[..., None] - 1))
    fog = np.clip((z - camera.FOG_START) / (camera.Z_FAR - camera.FOG_START), 0.0, 1.0)[..., None]
    return (1 - fog) * ground + fog * np.asarray(FOG_COLOR), z


def background_image(cfg: WorldConfig) -> np.ndarray:
    """The empty world's (H, W, 3) image: what the reader subtracts (it is the same for every scene)."""
    n, s = cfg.resolution, cfg.supersample
    return background(cfg)[0].reshape(n, s, n, s, 3).mean(axis=(1, 3))


def render_arrays(scene: Scene, cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3), depth (H, W), edges (H, W), mask (H, W) int) of a perspective scene, float64.

    Each object is drawn at sub-sample resolution where its surface is nearer than what is there (a
    z-buffer, so overlapping solids occlude each other by their real surfaces); each pixel is then the
    mean of its ``S x S`` sub-samples, the mask the object (or background, 0) holding most of them."""
    n, s = cfg.resolution, cfg.supersample
    ns = n * s
    image, z = background(cfg)
    ids = np.zeros((ns, ns), dtype=np.int64)
    nearest = np.full((ns, ns), np.inf)  # the z-buffer of objects (the ground is always behind them)
    for i, obj in enumerate(scene.objects):
        radius = cfg.radius[obj.size]
        r = object_radius_px(obj, cfg) * s  # in sub-samples
        cx, cy = obj.x * ns, obj.y * ns
        top, left = max(int(np.floor(cy - r)) - 1, 0), max(int(np.floor(cx - r)) - 1, 0)
        bottom, right = min(int(np.ceil(cy + r)) + 2, ns), min(int(np.ceil(cx + r)) + 2, ns)
        dy, dx = np.mgrid[top:bottom, left:right] + 0.5
        dx, dy = dx - cx, dy - cy
        bulge = relief(obj.shape, dx, dy, r)  # (h, w) in [0, 1]
        surface = camera.object_distance(obj.y, radius) - radius * bulge  # Z of the front surface
        # Lambert shading from the relief's slope: height H = r * bulge (sub-samples), normal (-H_x, -H_y, 1).
        hy, hx = np.gradient(r * bulge)
        normal = np.stack([-hx, -hy, np.ones_like(hx)], axis=-1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        shade = AMBIENT + DIFFUSE * np.clip(normal @ LIGHT, 0.0, None)  # (h, w)
        win = (slice(top, bottom), slice(left, right))
        draw = shape_inside(obj.shape, dx, dy, r) & (surface < nearest[win])
        nearest[win] = np.where(draw, surface, nearest[win])
        z[win] = np.where(draw, surface, z[win])
        ids[win] = np.where(draw, i + 1, ids[win])
        image[win] = np.where(draw[..., None], shade[..., None] * np.asarray(PALETTE[obj.color]), image[win])
    image = image.reshape(n, s, n, s, 3).mean(axis=(1, 3))  # (H, W, 3)
    depth = camera.stored_depth(z).reshape(n, s, n, s).mean(axis=(1, 3))  # (H, W)
    count = np.stack([(ids == k).reshape(n, s, n, s).sum(axis=(1, 3)) for k in range(len(scene.objects) + 1)])
    boundary = np.zeros_like(ids, dtype=bool)
    boundary[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    boundary[:-1, :] |= ids[:-1, :] != ids[1:, :]
    edges = np.clip(boundary.reshape(n, s, n, s).sum(axis=(1, 3)) / s, 0.0, 1.0)
    return image, depth, edges, count.argmax(axis=0).astype(np.int32)
