"""Rendering a toy-world scene to pixels: image, depth, edges and instance mask.

Anti-aliasing is by supersampling: each pixel is the mean of ``S x S`` point samples at
``(j + (k + 0.5) / S, i + (l + 0.5) / S)``. Objects are composited back to front (painter's order).
Everything is plain float arithmetic on numpy arrays with no randomness except the background's,
which is seeded by the scene itself, so the same scene gives the same bytes on every run.

Shape geometry lives in :mod:`difflab.world.shapes` only; the reader renders its templates with the same
functions, so reader and renderer can never disagree about what a "triangle" is. A world of style
'perspective' (the depth world) is drawn by :mod:`difflab.world.perspective` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difflab.errors import check_choice
from difflab.world import perspective
from difflab.world.scene import ALL_SHAPES, PALETTE, Scene, WorldConfig, object_radius_px
from difflab.world.shapes import shape_coverage

# Bump when a change alters rendered pixels: disk caches of rendered scenes are keyed by it, and the
# pinned hash in tests/test_world_render.py must be updated with it.
RENDERER_VERSION = 1


def background_image(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """The (H, W, 3) background: plain, a gentle linear gradient, or a smooth low-frequency texture,
    each within ``cfg.background_amplitude`` of ``cfg.background_color``."""
    n = cfg.resolution
    base = np.asarray(cfg.background_color, dtype=np.float64)
    img = np.broadcast_to(base, (n, n, 3)).copy()
    if scene.background == "plain":
        return img
    rng = np.random.default_rng(scene.background_seed)
    coords = (np.arange(n) + 0.5) / n - 0.5  # pixel centres in [-0.5, 0.5]
    if scene.background == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # (H, W) in [-0.71, 0.71]
        return img + (cfg.background_amplitude / 0.71) * ramp[..., None]
    # 'texture': bilinear upsampling of a 5x5 grid of random values -> smooth blotches.
    grid = rng.uniform(-1, 1, size=(5, 5))
    pos = (coords + 0.5) * 4  # in grid units, [0, 4]
    i0 = np.clip(np.floor(pos).astype(int), 0, 3)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (H, 5)
    tex = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]  # (H, W)
    return img + cfg.background_amplitude * tex[..., None]


@dataclass(frozen=True)
class Rendering:
    """What the world draws for one scene (or a batch, with a leading batch axis)."""

    image: np.ndarray
    """float32 (H, W, 3) RGB in [0, 1]."""
    depth: np.ndarray
    """float32 (H, W): distance from the camera, background 1.0, objects their ``depth`` (anti-aliased)."""
    edges: np.ndarray
    """float32 (H, W) in [0, 1]: object outlines (where the instance id changes), anti-aliased."""
    mask: np.ndarray
    """int32 (H, W): 0 for background, i + 1 where object i of the scene covers most of the pixel."""


def render(scene: Scene, cfg: WorldConfig) -> Rendering:
    """Draw ``scene`` at ``cfg.resolution`` with ``cfg.supersample``-fold anti-aliasing (a perspective
    world by :func:`difflab.world.perspective.render_arrays`)."""
    if cfg.style == "perspective":
        image, depth, edges, mask = perspective.render_arrays(scene, cfg)
        return Rendering(np.clip(image, 0.0, 1.0).astype(np.float32), depth.astype(np.float32),
                         edges.astype(np.float32), mask)  # fmt: skip
    n, s = cfg.resolution, cfg.supersample
    image = background_image(scene, cfg)
    depth = np.ones((n, n))
    # Per-pixel coverage of what is visible: index 0 is the background, i + 1 is object i.
    visible = np.zeros((len(scene.objects) + 1, n, n))
    visible[0] = 1.0
    for i, obj in enumerate(scene.objects):  # back to front
        check_choice("colour", obj.color, PALETTE)
        cov, (top, left) = shape_coverage(obj.shape, obj.x * n, obj.y * n, cfg.radius_px(obj.size), n, n, s)
        h, w = cov.shape
        win = (slice(top, top + h), slice(left, left + w))
        c = cov[..., None]
        image[win] = image[win] * (1 - c) + np.asarray(PALETTE[obj.color]) * c
        depth[win] = depth[win] * (1 - cov) + obj.depth * cov
        visible[(slice(None), *win)] *= 1 - cov  # what was visible is occluded by this object
        visible[(i + 1, *win)] += cov
    mask = visible.argmax(axis=0).astype(np.int32)
    return Rendering(
        image=np.clip(image, 0.0, 1.0).astype(np.float32),
        depth=depth.astype(np.float32),
        edges=_edges(scene, cfg).astype(np.float32),
        mask=mask,
    )


def _edges(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """Outlines: the fraction of each pixel's sub-samples that sit on an instance boundary, scaled so
    a straight 1-sub-sample-wide boundary crossing a pixel gives 1."""
    n, s = cfg.resolution, cfg.supersample
    ids = np.zeros((n * s, n * s), dtype=np.int32)  # supersampled instance ids, painter's order
    for i, obj in enumerate(scene.objects):
        r = cfg.radius_px(obj.size)
        cov_hi, (top, left) = shape_coverage(obj.shape, obj.x * n * s, obj.y * n * s, r * s, n * s, n * s, 1)
        h, w = cov_hi.shape
        region = ids[top : top + h, left : left + w]
        region[cov_hi > 0.5] = i + 1
    boundary = np.zeros_like(ids, dtype=bool)
    boundary[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    boundary[:-1, :] |= ids[:-1, :] != ids[1:, :]
    per_pixel = boundary.reshape(n, s, n, s).sum(axis=(1, 3)) / s  # (H, W)
    return np.clip(per_pixel, 0.0, 1.0)


def _boxes(scene: Scene, cfg: WorldConfig, field: str) -> np.ndarray:
    """A layout, (H, W, C): each object's bounding square (its centre +- its radius, the box a layout planner
    writes), each pixel the exact fraction of its area inside the box times the box's fill (the channel-wise
    largest, where boxes meet). The fill is what the planner's slot says of the object, one field more at each
    step: 'boxes' 1 (where it goes, how large); 'shapes' its shape's grey level (k + 1) / K for shape k of
    :data:`ALL_SHAPES` (as ControlNet's segmentation maps paint each region in its class's colour: what it is);
    'layout' its palette colour and that level, RGBA (which colour too)."""
    n = cfg.resolution
    edges = np.arange(n + 1, dtype=np.float64)  # pixel boundaries, in pixels

    def cover(centre: float, r: float) -> np.ndarray:  # (n,): each pixel's overlap with [centre-r, centre+r]
        return np.clip(np.minimum(edges[1:], centre + r) - np.maximum(edges[:-1], centre - r), 0.0, 1.0)

    out = np.zeros((n, n, condition_channels(field)), dtype=np.float64)
    for obj in scene.objects:
        r = object_radius_px(obj, cfg)
        level = (ALL_SHAPES.index(obj.shape) + 1) / len(ALL_SHAPES)
        fill = {"boxes": (1.0,), "shapes": (level,), "layout": (*PALETTE[obj.color], level)}[field]
        area = np.outer(cover(obj.y * n, r), cover(obj.x * n, r))  # (H, W): rows are y
        out = np.maximum(out, area[..., None] * np.asarray(fill))  # (H, W, C)
    return out


CONDITION_FIELDS = ("edges", "depth", "mask", "boxes", "shapes", "layout")
"""The fields a ControlNet can be conditioned on (:func:`condition`)."""
PLANNED_FIELDS = ("boxes", "shapes", "layout")
"""The fields drawn from a layout (a scene's boxes and what its planner says of them), no pixels rendered."""


def condition_channels(field: str) -> int:
    """Channels of a condition image: 4 for 'layout' (RGBA: colour, shape level), 1 for the others."""
    return 4 if field == "layout" else 1


def condition(scene: Scene, cfg: WorldConfig, field: str) -> np.ndarray:
    """A condition image of ``scene``, float32 in [0, 1]: (H, W), or (H, W, 4) for 'layout'. 'edges': the
    outlines; 'depth': nearness, 1 - depth (the background, at depth 1, is 0; as MiDaS maps show
    disparity); 'mask': 1 where an object covers most of the pixel; 'boxes', 'shapes', 'layout': the
    objects' bounding boxes, filled with 1, their shape's grey level, or their colour and that level
    (:func:`_boxes`)."""
    check_choice("condition field", field, CONDITION_FIELDS)
    if field in PLANNED_FIELDS:
        boxes = _boxes(scene, cfg, field)
        return np.ascontiguousarray(boxes[..., 0] if boxes.shape[-1] == 1 else boxes, dtype=np.float32)
    r = render(scene, cfg)
    img = {"edges": lambda: r.edges, "depth": lambda: 1.0 - r.depth, "mask": lambda: r.mask > 0}[field]()
    return np.ascontiguousarray(img, dtype=np.float32)


def render_batch(scenes: list[Scene], cfg: WorldConfig) -> Rendering:
    """Render several scenes and stack each field along a new leading batch axis."""
    parts = [render(sc, cfg) for sc in scenes]
    return Rendering(*(np.stack([getattr(p, f) for p in parts]) for f in ("image", "depth", "edges", "mask")))


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian pixel noise of standard deviation ``sigma`` (pixels in [0, 1]), clipped back
    to [0, 1]: the 'mild noise' the reader must be robust to."""
    noisy = image + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)
