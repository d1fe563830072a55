"""The reader: pixels -> scene. The judge of every generative model in difflab.

Given an RGB image in [0, 1], the reader recovers the shape, colour, size and position of every object
from the pixels alone (no access to the scene that made them):

1. **Background** - the median colour of the border pixels (robust to gradients, textures, noise and
   objects touching the border).
2. **Objects** - pixels far from the background colour, grouped into 4-connected components with
   hysteresis (a component must contain at least one clearly-foreground pixel, so isolated noise
   pixels never become objects).
3. **Colour** - the mean of a component's core pixels, snapped to the nearest palette entry.
4. **Soft mask** - each pixel's coverage by that colour, ``<img - bg, C - bg> / |C - bg|^2`` clipped to
   [0, 1]: this undoes anti-aliasing and is independent of the colour's brightness.
5. **Shape and size** - template matching: every (shape, size) template is rendered with the world's
   own geometry (:func:`difflab.world.render.shape_coverage`) at the soft mask's centroid, and the one
   with the smallest squared error wins. All shapes have their centroid at their centre, so the
   centroid is the position.

Its accuracy is measured, not assumed: ``difflab world check`` reports exact-scene and per-attribute
accuracy on clean and noisy renders.
"""

from __future__ import annotations

import numpy as np

from difflab.errors import DifflabError
from difflab.world.perspective_reader import read_perspective
from difflab.world.pixels import as_image as _as_image
from difflab.world.pixels import components as _components
from difflab.world.pixels import grown
from difflab.world.pixels import majority_3x3 as _majority_3x3
from difflab.world.scene import COLORS, PALETTE, SHAPES, SIZES, Obj, Scene, WorldConfig
from difflab.world.shapes import shape_coverage

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS])  # (K, 3)

# Hysteresis thresholds on the distance of a pixel's colour from the background, as fractions of the
# distance of the nearest palette colour from it (the faintest possible object): a pixel is
# foreground above WEAK; a component is an object only if some pixel is above STRONG.
_WEAK, _STRONG = 0.28, 0.6


def estimate_background(image: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border of an (H, W, 3) image."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border, axis=0)


def _object_components(img: np.ndarray, bg: np.ndarray):
    """The foreground components of ``img`` that can be objects: each as (pixels (n, 2), their distance
    from the background (n,), which of them are clearly foreground (n,) bool). A pixel is foreground above
    WEAK; a component with no pixel above STRONG is noise or a faint smudge, and is left out."""
    faintest = np.linalg.norm(_PALETTE_RGB - bg, axis=1).min()
    dist = np.linalg.norm(img - bg, axis=-1)  # (H, W)
    for pix in _components(dist > _WEAK * faintest):
        d = dist[pix[:, 0], pix[:, 1]]
        strong = d >= _STRONG * faintest
        if strong.any():
            yield pix, d, strong


def _core_colour(img: np.ndarray, pix: np.ndarray, d: np.ndarray) -> int:
    """The palette index nearest the mean colour of a component's core (its pixels within 80 % of its
    largest distance from the background)."""
    core = d >= 0.8 * d.max()
    mean_rgb = img[pix[core, 0], pix[core, 1]].mean(axis=0)
    return int(np.argmin(np.linalg.norm(_PALETTE_RGB - mean_rgb, axis=1)))


def read(image, cfg: WorldConfig) -> Scene:
    """Read the scene in ``image`` ((H, W, 3) in [0, 1] or uint8, or a (3, H, W) tensor in [-1, 1]).

    ``cfg`` gives the world's object radii in fractions of the image side; shapes and colours are read
    over the whole vocabulary (not only ``cfg``'s), so a model that draws an unrequested colour is caught.
    Depth cannot be seen in a flat render; every read object gets depth 0.5.
    """
    return read_with_blends(image, cfg)[0]


def read_with_blends(image, cfg: WorldConfig) -> tuple[Scene, int]:
    """:func:`read`, and how many of its components were **one object drawn in two colours** (a blend).

    A component that several palette colours share is split into one object per colour, as two touching
    objects of different colours must be (the scene then holds both, and a prompt of one object fails,
    rightly). The world itself never draws touching objects (``scene.fits`` keeps a gap), so in a
    generated image such a component is either a real pair drawn too close, or one shape painted in two
    colours. The two differ in geometry: one (shape, size) template fitted to the whole component's
    coverage explains a two-coloured object better than the per-colour templates explain its halves,
    while two real objects are each explained by their own. A blend is a component where the single
    template's squared error is below the sum of the parts'. The scene is the same either way; the count
    only says how the misses look (``objects_read`` in :mod:`difflab.models.t2i_eval`).
    """
    if cfg.style == "perspective":  # shaded solids on a ground: the depth world's own reader, no blends
        return read_perspective(image, cfg), 0
    img = _as_image(image)
    h, w, _ = img.shape
    bg = estimate_background(img)
    objects, blends = [], 0
    min_pixels = 0.25 * (3 * np.sqrt(3) / 4) * (min(cfg.radius.values()) * h) ** 2
    for pix, d, strong in _object_components(img, bg):
        rows, cols = pix[:, 0], pix[:, 1]
        # Two touching objects of different colours form one component: split it by colour when more
        # than one palette colour owns a sizeable share of the clearly-foreground pixels.
        labels = _majority_3x3(_colour_labels(img[rows, cols], bg), pix, (h, w))
        present = [k for k in np.unique(labels[strong]) if (labels[strong] == k).sum() >= min_pixels]
        if len(present) <= 1:
            parts = [(_core_colour(img, pix, d), pix)]
        else:
            labels = _majority_3x3(_colour_labels(img[rows, cols], bg, candidates=present), pix, (h, w))
            parts = [(k, pix[labels == k]) for k in present]
        fits = [(COLORS[k], _fit(_soft_mask(img, bg, part, COLORS[k]), cfg)) for k, part in parts]
        found = [(color, fit) for color, fit in fits if fit is not None]
        for color, (shape, size, cx, cy, _) in found:
            objects.append(Obj(shape, color, size, float(cx / w), float(cy / h), 0.5))
        if len(found) > 1:
            whole = sum(_soft_mask(img, bg, part, COLORS[k]) for k, part in parts)
            one = _fit(np.clip(whole, 0.0, 1.0), cfg)
            blends += one is not None and one[4] < sum(fit[4] for _, fit in found)
    objects.sort(key=lambda o: (o.cell, o.x, o.y))
    return Scene(tuple(objects)), blends


def read_silhouettes(image, cfg: WorldConfig) -> Scene:
    """The objects as a colour-blind detector sees them: each foreground component fitted as *one* (shape,
    size) template, whatever colours it is painted in (its coverage is the most of the reader's per-colour
    soft masks over the colours it holds). An object drawn in two colours is one object here, where
    :func:`read` splits it. Each object's colour is that of its component's core. What re-detects a
    condition that shows no colour (a ControlNet's edges, depth or mask)."""
    if cfg.style == "perspective":
        raise DifflabError("read_silhouettes reads flat worlds; a perspective world's conditions are not read back")
    img = _as_image(image)
    h, w, _ = img.shape
    bg = estimate_background(img)
    objects = []
    for pix, d, _ in _object_components(img, bg):
        labels = _colour_labels(img[pix[:, 0], pix[:, 1]], bg)
        soft = np.max([_soft_mask(img, bg, pix, COLORS[k]) for k in np.unique(labels)], axis=0)  # (H, W)
        fit = _fit(soft, cfg)
        if fit is not None:
            shape, size, cx, cy, _ = fit
            objects.append(
                Obj(shape, COLORS[_core_colour(img, pix, d)], size, float(cx / w), float(cy / h), 0.5)
            )
    objects.sort(key=lambda o: (o.cell, o.x, o.y))
    return Scene(tuple(objects))


def _colour_labels(rgb: np.ndarray, bg: np.ndarray, candidates=None) -> np.ndarray:
    """For (n, 3) pixel colours, the palette index whose segment background -> colour passes closest:
    an anti-aliased pixel is a mix ``bg + c (C - bg)`` and lies on its colour's segment at any coverage."""
    ks = np.arange(len(COLORS)) if candidates is None else np.asarray(candidates)
    dirs = _PALETTE_RGB[ks] - bg  # (K, 3)
    rel = rgb - bg  # (n, 3)
    cov = np.clip(rel @ dirs.T / (dirs * dirs).sum(axis=1), 0.0, 1.0)  # (n, K)
    residual = np.linalg.norm(rel[:, None, :] - cov[..., None] * dirs[None], axis=-1)  # (n, K)
    return ks[residual.argmin(axis=1)]


def _soft_mask(img, bg, pix, color: str) -> np.ndarray:
    """Each pixel's coverage by ``color`` over the component ``pix`` grown by one pixel (so the faint
    anti-aliased rim below the threshold counts too): ``<img - bg, C - bg> / |C - bg|^2`` in [0, 1]."""
    h, w, _ = img.shape
    direction = np.asarray(PALETTE[color]) - bg
    region = np.zeros((h, w), dtype=bool)
    region[pix[:, 0], pix[:, 1]] = True
    return np.clip((img - bg) @ direction / (direction @ direction), 0.0, 1.0) * grown(region)  # (H, W)


def _fit(soft: np.ndarray, cfg: WorldConfig) -> tuple[str, str, float, float, float] | None:
    """``(shape, size, cx, cy, squared error)`` of the (shape, size) template that best matches the soft
    mask at its centroid (pixels); None when the mask is too small to be an object."""
    h, w = soft.shape
    area = soft.sum()
    smallest = min(cfg.radius.values()) * h
    # Half the area of the smallest object the world draws (a small triangle, (3 sqrt(3) / 4) r^2): a
    # blob of a few noisy pixels that passed the thresholds is far below it.
    if area < 0.5 * (3 * np.sqrt(3) / 4) * smallest**2:
        return None
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cy, cx = (soft * ys).sum() / area, (soft * xs).sum() / area
    best, best_err = None, np.inf
    for size in SIZES:
        r = cfg.radius[size] * h
        for shape in dict.fromkeys((*SHAPES, *cfg.shapes)):  # the base shapes, and any extension the world draws
            cov, (top, left) = shape_coverage(shape, cx, cy, r, h, w, cfg.supersample)
            template = np.zeros((h, w))
            template[top : top + cov.shape[0], left : left + cov.shape[1]] = cov
            err = ((soft - template) ** 2).sum()
            if err < best_err:
                best, best_err = (shape, size), err
    assert best is not None
    return best[0], best[1], float(cx), float(cy), float(best_err)
