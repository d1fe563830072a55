"""The renderer: determinism, geometry against closed forms, and the fields it returns."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from difflab.errors import DifflabError
from difflab.world.render import RENDERER_VERSION, add_noise, render, render_batch, shape_coverage
from difflab.world.scene import ALL_SHAPES, Obj, Scene, scene_at, world_preset

# sha256 of the uint8 images of scenes 0..7 of seed 0 in scene32 (renderer version 1). Pixel changes
# must come with a RENDERER_VERSION bump, which invalidates rendered-scene caches.
PINNED_DIGESTS = {1: "b0d8d678ab1933e7c04fd9de4dc1c3f3bafdcfb66c50dd1b8636ed15ebb41e70"}


def _batch_digest(preset="scene32", seed=0, n=8) -> str:
    cfg = world_preset(preset)
    images = render_batch([scene_at(cfg, seed, i) for i in range(n)], cfg).image
    return hashlib.sha256((images * 255).round().astype(np.uint8).tobytes()).hexdigest()


def test_same_seed_same_bytes_in_another_process():
    code = "from tests.test_world_render import _batch_digest; print(_batch_digest())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == _batch_digest()


def test_pinned_digest_for_this_renderer_version():
    assert RENDERER_VERSION in PINNED_DIGESTS
    assert _batch_digest() == PINNED_DIGESTS[RENDERER_VERSION]


def test_different_seeds_differ():
    assert _batch_digest(seed=0) != _batch_digest(seed=1)


# Closed-form areas in units of r^2 (r = bounding-circle radius), from the definitions in render.py.
_A, _W = 0.92, 0.36
AREAS = {
    "circle": np.pi,
    "square": 2.0,  # side r * sqrt(2)
    "diamond": 2.0,  # the same square turned by 45 degrees
    "triangle": 3 * np.sqrt(3) / 4,  # equilateral, inscribed
    "cross": 8 * _A * _W - 4 * _W**2,  # two 2a x 2w bars minus their shared 2w x 2w centre
    "star": 5 * 0.5 * np.sin(np.pi / 5),  # ten triangles (tip, inner corner, centre): (1/2) r (0.5 r) sin 36
}


@pytest.mark.parametrize("shape", ALL_SHAPES)
def test_shape_area_and_centroid_match_closed_form(shape):
    r, n = 20.0, 64
    cov, (top, left) = shape_coverage(shape, 31.3, 32.6, r, n, n, supersample=8)
    area = cov.sum()
    assert area == pytest.approx(AREAS[shape] * r * r, rel=0.01)
    ys, xs = np.mgrid[top : top + cov.shape[0], left : left + cov.shape[1]] + 0.5
    # Every shape is centred on its centroid, which is what lets the reader use centroids as positions.
    # Axis-aligned edges snap to the 1/8-pixel sample grid, so allow half a sample spacing.
    assert (cov * xs).sum() / area == pytest.approx(31.3, abs=1 / 16)
    assert (cov * ys).sum() / area == pytest.approx(32.6, abs=1 / 16)


def test_shapes_stay_inside_their_bounding_circle():
    r, n = 10.0, 32
    for shape in ALL_SHAPES:
        cov, (top, left) = shape_coverage(shape, 16.0, 16.0, r, n, n, supersample=8)
        ys, xs = np.mgrid[top : top + cov.shape[0], left : left + cov.shape[1]] + 0.5
        far = np.hypot(xs - 16, ys - 16) > r + 1.0  # pixel centres beyond the circle plus half a diagonal
        assert cov[far].max(initial=0.0) == 0.0, shape


def test_fields_shapes_ranges_and_consistency():
    cfg = world_preset("scene64")
    scene = scene_at(cfg, 3, 5)
    r = render(scene, cfg)
    n = cfg.resolution
    assert r.image.shape == (n, n, 3) and r.image.dtype == np.float32
    assert r.depth.shape == r.edges.shape == r.mask.shape == (n, n)
    assert 0 <= r.image.min() and r.image.max() <= 1 and 0 <= r.edges.min() and r.edges.max() <= 1
    # The mask holds exactly the scene's instance ids; each object's pixels have its colour and depth.
    assert set(np.unique(r.mask)) == set(range(len(scene.objects) + 1))
    from difflab.world.scene import PALETTE

    for i, obj in enumerate(scene.objects):
        inner = r.mask == i + 1
        assert np.abs(np.median(r.image[inner], axis=0) - PALETTE[obj.color]).max() < 1e-6
        assert np.median(r.depth[inner]) == pytest.approx(obj.depth, abs=1e-6)
    # Background pixels are at most half covered, so their blended depth is at least (1 + 0.2) / 2.
    assert np.all(r.depth[r.mask == 0] >= 0.6 - 1e-6)
    # Edges lie on instance boundaries: none deep inside the background far from every object.
    assert r.edges.sum() > 0
    assert r.edges[r.mask != 0].sum() + r.edges[r.mask == 0].sum() == pytest.approx(r.edges.sum())


@pytest.mark.parametrize("background", ["plain", "gradient", "texture"])
def test_background_stays_within_its_amplitude(background):
    cfg = world_preset("scene32", background=background)
    r = render(Scene((), background=background, background_seed=11), cfg)
    deviation = np.abs(r.image - np.asarray(cfg.background_color)).max()
    assert deviation <= cfg.background_amplitude + 1e-6
    assert (deviation > 0.01) == (background != "plain")


def test_painter_order_front_object_wins():
    cfg = world_preset("scene32")
    back = Obj("square", "red", "large", 0.5, 0.5, depth=0.8)
    front = Obj("circle", "blue", "small", 0.5, 0.5, depth=0.3)
    r = render(Scene((back, front)), cfg)
    assert r.mask[16, 16] == 2 and r.depth[16, 16] == pytest.approx(0.3)


def test_noise_is_clipped_and_seeded():
    img = np.full((8, 8, 3), 0.99, dtype=np.float32)
    a = add_noise(img, 0.05, np.random.default_rng(0))
    b = add_noise(img, 0.05, np.random.default_rng(0))
    assert np.array_equal(a, b) and a.max() <= 1.0


def test_unknown_shape_is_named():
    with pytest.raises(DifflabError, match="unknown shape 'hexagon'"):
        render(Scene((Obj("hexagon", "red", "large", 0.5, 0.5),)), world_preset("scene32"))
