"""The reader of the depth world: pixels of a perspective scene -> scene (``style='perspective'``).

The flat reader (:mod:`difflab.world.reader`) assumes flat palette colours on a uniform background.
Here objects are shaded (each pixel a palette colour times a shade in [AMBIENT, 1]), stand on a textured
ground, shrink with distance and may hide each other. The reader knows the world's rules, never the
scene:

1. **Background** - the empty world is the same for every scene (:func:`perspective.background_image`),
   so it is subtracted exactly; a pixel is foreground far from it (hysteresis, as the flat reader).
2. **Colour** - each foreground pixel is labelled with the palette colour that explains it best (smoothed
   by a 3x3 majority); objects are the connected components of
   one label, so an occluder and the object it hides are told apart by colour (the world never lets two
   objects of one colour touch).
   A pixel's colour is fitted as a mix ``bg + b (s C - bg)`` (coverage ``b``, shade ``s``), so the
   anti-aliased rim of a dark face is not mistaken for another colour.
3. **Soft mask** - clearly-foreground pixels of the object count 1; its anti-aliased rim counts its
   fitted coverage ``b``.
4. **Shape and size** - template matching over shapes and a range of image radii around the one the area
   implies, ignoring the pixels other objects cover (they may hide part of this one). The *physical* size
   follows from the image radius and the row: ``R = h r / (v - horizon + r)`` (:mod:`camera`), so a far
   large object is not mistaken for a near small one.
5. **Depth** - what an object's row and size say of its distance (``Obj.depth``, as the world stores it).

Its accuracy is measured, as the flat reader's: ``difflab world check --preset depth64``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from difflab.errors import DifflabError
from difflab.world import camera, perspective
from difflab.world.pixels import as_image, components, grown, majority_3x3
from difflab.world.scene import COLORS, PALETTE, SHAPES, Obj, Scene, WorldConfig
from difflab.world.shapes import shape_coverage, shape_inside

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS])  # (K, 3)
_WEAK, _STRONG = 0.08, 0.17
"""Foreground thresholds on the distance from the empty world's colour: the faintest object pixel (the
darkest shade of green on the ground) is 0.24 away."""
_SCALES = (0.85, 0.92, 1.0, 1.08, 1.16, 1.25)
"""Image radii tried around the one an object's visible area implies (more above 1: a hidden part shrinks
the area)."""


_EMPTY: dict[tuple[int, int], np.ndarray] = {}


def _empty(cfg: WorldConfig) -> np.ndarray:
    """The empty world's image, computed once per (resolution, supersample): all it depends on."""
    key = (cfg.resolution, cfg.supersample)
    if key not in _EMPTY:
        _EMPTY[key] = perspective.background_image(cfg)
    return _EMPTY[key]


@lru_cache(maxsize=1)
def _unit_areas() -> dict[str, float]:
    """Area of each shape with radius 1 (measured on a fine grid, by the world's own geometry)."""
    g = (np.arange(400) + 0.5) / 200 - 1.0
    return {s: float(shape_inside(s, g[None, :], g[:, None], 1.0).mean() * 4) for s in SHAPES}


_SHADES = np.linspace(perspective.AMBIENT, 1.0, 11)
"""The shades a pixel's colour is tried at (the world draws AMBIENT..1 times a palette colour)."""


def _coverages(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """For every pixel and palette colour k, how well the pixel is explained as a mix of the empty world
    and ``s C_k``: ``p = bg + b (s C_k - bg)`` for a coverage ``b`` in [0, 1] (anti-aliasing) and the best of
    the shades ``s``. Returns (H, W, K, 2): the residual and the coverage ``b`` of colour k's best shade."""
    rel = (img - bg)[:, :, None, None, :]  # (H, W, 1, 1, 3)
    dirs = _SHADES[None, :, None] * _PALETTE_RGB[:, None, :] - bg[:, :, None, None, :]  # (H, W, K, S, 3)
    b = np.clip((rel * dirs).sum(-1) / (dirs**2).sum(-1), 0.0, 1.0)  # (H, W, K, S)
    residual = np.linalg.norm(rel - b[..., None] * dirs, axis=-1)  # (H, W, K, S)
    best = residual.argmin(axis=-1)[..., None]  # (H, W, K, 1)
    return np.stack([np.take_along_axis(residual, best, -1)[..., 0], np.take_along_axis(b, best, -1)[..., 0]], -1)


def _box3(x: np.ndarray) -> np.ndarray:
    """A 3x3 mean over each pixel's neighbourhood (edges replicated), (H, W, C): pixel noise of standard
    deviation s falls to s / 3, while an object's interior, wider than a pixel, keeps its contrast."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    return sum(p[1 + dr : h + 1 + dr, 1 + dc : w + 1 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)) / 9


def read_perspective(image, cfg: WorldConfig) -> Scene:
    """Read the scene in a picture of the perspective world ``cfg`` (any of the reader's image formats)."""
    img = as_image(image)
    h, w, _ = img.shape
    if (h, w) != (cfg.resolution, cfg.resolution):
        raise DifflabError(f"image of {h}x{w} pixels does not match the {cfg.resolution}x{cfg.resolution} world")
    bg = _empty(cfg)
    dist = np.linalg.norm(img - bg, axis=-1)  # (H, W)
    smooth = np.linalg.norm(_box3(img - bg), axis=-1)  # (H, W): pixel noise averaged down, objects kept
    fg = (dist > _WEAK) & (smooth > _WEAK)
    pix = np.argwhere(fg)  # (n, 2)
    if not len(pix):
        return Scene(())
    fits = _coverages(img, bg)  # (H, W, K, 2)
    labels = majority_3x3(fits[fg][:, :, 0].argmin(axis=1), pix, (h, w))
    label_map = np.full((h, w), -1)
    label_map[fg] = labels
    r_min = min(camera.image_radius(camera.CENTRE_ROWS[0], r) for r in cfg.radius.values()) * h
    min_area = 0.35 * _unit_areas()["triangle"] * r_min**2
    found = []  # (colour index, component pixels)
    for k in np.unique(labels):
        for comp in components(label_map == k):
            if (smooth[comp[:, 0], comp[:, 1]] >= _STRONG).sum() >= max(min_area / 2, 1):
                found.append((int(k), comp))
    owner = np.zeros((h, w), dtype=int)  # which found component (1-based) holds each pixel
    for j, (_, comp) in enumerate(found):
        owner[comp[:, 0], comp[:, 1]] = j + 1
    objects = []
    for j, (k, comp) in enumerate(found):
        soft = _soft_mask(fits[..., k, 1], dist, comp)
        others = (owner > 0) & (owner != j + 1)
        fit = _fit(soft, ~others, cfg, min_area)
        if fit is None:
            continue
        shape, r_px, cx, cy = fit
        y = cy / h
        if y <= camera.HORIZON:
            continue
        radius = camera.physical_radius(r_px / h, y)
        size = min(cfg.radius, key=lambda z: abs(np.log(cfg.radius[z] / radius)))
        depth = float(camera.stored_depth(camera.object_distance(y, cfg.radius[size])))
        objects.append(Obj(shape, COLORS[k], size, float(cx / w), float(y), depth))
    objects.sort(key=lambda o: (o.cell, o.x, o.y))
    return Scene(tuple(objects))


def _soft_mask(coverage: np.ndarray, dist: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """The object's coverage (H, W): 1 on its clearly-foreground pixels; on its rim (the component grown by
    one pixel, less those), the pixel's coverage by the object's colour (:func:`_coverages`)."""
    h, w = coverage.shape
    region = np.zeros((h, w), dtype=bool)
    region[comp[:, 0], comp[:, 1]] = True
    solid = region & (dist >= _STRONG)
    return np.where(solid, 1.0, coverage * grown(region))


def _fit(soft: np.ndarray, seen: np.ndarray, cfg: WorldConfig, min_area: float):
    """``(shape, image radius px, cx, cy)`` of the template that best matches ``soft`` on the ``seen``
    pixels, at the soft mask's centroid; None when the mask is too small to be an object."""
    h, w = soft.shape
    area = soft.sum()
    if area < min_area:
        return None
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cy, cx = (soft * ys).sum() / area, (soft * xs).sum() / area
    best, best_err = None, np.inf
    for shape in cfg.shapes:
        r0 = np.sqrt(area / _unit_areas().get(shape, np.pi))
        for scale in _SCALES:
            cov, (top, left) = shape_coverage(shape, cx, cy, r0 * scale, h, w, cfg.supersample)
            template = np.zeros((h, w))
            template[top : top + cov.shape[0], left : left + cov.shape[1]] = cov
            err = (((soft - template) ** 2) * seen).sum()
            if err < best_err:
                best, best_err = (shape, r0 * scale), err
    assert best is not None
    return best[0], float(best[1]), float(cx), float(cy)
