"""The depth world (style 'perspective'): its depth against the pinhole camera's closed forms, occlusion,
perspective, and its reader measured on it."""

import hashlib

import numpy as np
import pytest

from difflab.errors import DifflabError
from difflab.world import camera
from difflab.world.check import check_reader
from difflab.world.reader import read
from difflab.world.render import render, render_batch
from difflab.world.scene import Obj, Scene, WorldConfig, object_radius_px, scene_at, world_preset

DEPTH64 = world_preset("depth64")


def _subsample_rows(cfg: WorldConfig, row: int) -> np.ndarray:
    s = cfg.supersample
    return (row + (np.arange(s) + 0.5) / s) / cfg.resolution


def test_the_ground_depth_is_the_pinhole_camera_closed_form():
    """An empty scene: each row's depth is the mean over its sub-sample rows of Z = f h / (v - horizon),
    stored as Z / Z_FAR; rows nearer the horizon than the far plane are the backdrop, exactly 1."""
    r = render(Scene(()), DEPTH64)
    for row in (40, 50, 63):
        v = _subsample_rows(DEPTH64, row)
        expected = np.mean(camera.FOCAL * camera.CAMERA_HEIGHT / (v - camera.HORIZON)) / camera.Z_FAR
        np.testing.assert_allclose(r.depth[row], expected, rtol=1e-6)
    far_rows = int((camera.HORIZON + camera.FOCAL * camera.CAMERA_HEIGHT / camera.Z_FAR) * 64)  # Z >= Z_FAR
    assert (r.depth[:far_rows] == 1.0).all()
    assert np.all(np.diff(r.depth[:, 0]) <= 0)  # depth rises continuously toward the horizon
    assert (r.mask == 0).all()


def test_a_sphere_apex_is_its_radius_nearer_than_its_centre():
    """A circle is a sphere of the size's physical radius R standing on the ground: at its apex the
    surface is R nearer than its centre's distance Z = f (h - R) / (y - horizon)."""
    cfg = DEPTH64
    obj = Obj("circle", "red", "large", x=0.5 + 0.5 / 64, y=0.75 + 0.5 / 64)
    r = render(Scene((obj,)), cfg)
    radius = cfg.radius["large"]
    apex = (camera.object_distance(obj.y, radius) - radius) / camera.Z_FAR
    assert r.depth[48, 32] == pytest.approx(apex, rel=2e-3)  # the hemisphere is flat at the apex
    assert r.mask[48, 32] == 1
    assert r.depth[48, 32] < r.depth[48, 32 + 8] < r.depth[0, 0]  # the surface recedes toward the rim


def test_a_nearer_object_hides_a_farther_one():
    cfg = DEPTH64
    far = Obj("square", "blue", "large", x=0.45, y=0.55)
    near = Obj("square", "red", "large", x=0.55, y=0.62)
    assert camera.object_distance(near.y, 0.28) < camera.object_distance(far.y, 0.28)
    for objects in ((far, near), (near, far)):  # a z-buffer: the list order does not matter
        r = render(Scene(objects), cfg)
        owner = objects.index(near) + 1
        row, col = int(near.y * 64), int((near.x - 0.05) * 64)  # inside both silhouettes
        assert r.mask[row, col] == owner
        assert np.allclose(r.image[row, col] / np.array([0.90, 0.12, 0.12]), r.image[row, col, 0] / 0.90, atol=0.02)


def test_image_size_follows_distance():
    """Perspective: one object at two rows; its image radius scales with (y - horizon), and its pixel
    area with the square of that."""
    cfg = DEPTH64
    areas = []
    for y in (0.55, 0.85):
        obj = Obj("circle", "white", "small", x=0.5, y=y)
        areas.append((render(Scene((obj,)), cfg).mask == 1).sum())
        assert object_radius_px(obj, cfg) == pytest.approx(
            64 * 0.18 * (y - camera.HORIZON) / (1 - 0.18)
        )
    assert areas[1] / areas[0] == pytest.approx(((0.85 - 0.2) / (0.55 - 0.2)) ** 2, rel=0.1)


def test_physical_radius_inverts_image_radius():
    for radius in (0.18, 0.28):
        for y in (0.5, 0.7, 0.9):
            assert camera.physical_radius(camera.image_radius(y, radius), y) == pytest.approx(radius)


def test_sampled_scenes_stand_on_the_ground_back_to_front():
    for i in range(30):
        scene = scene_at(DEPTH64, 3, i)
        depths = [o.depth for o in scene.objects]
        assert depths == sorted(depths, reverse=True)
        for o in scene.objects:
            assert camera.CENTRE_ROWS[0] <= o.y <= camera.CENTRE_ROWS[1]
            assert o.depth == pytest.approx(camera.object_distance(o.y, DEPTH64.radius[o.size]) / camera.Z_FAR)
        assert len({o.cell for o in scene.objects}) == len(scene.objects)


def test_flat_presets_are_untouched_by_the_depth_world():
    """The flat world's scenes keep their pinned bytes (tests/test_world_render.py pins scene32); here the
    other flat presets must not go through the perspective path either: an empty flat scene is one colour
    at depth 1, with no ground."""
    for name in ("tiny", "scene64", "star32"):
        cfg = world_preset(name)
        assert cfg.style == "flat"
        r = render(Scene(()), cfg)
        assert (r.depth == 1.0).all() and (r.image == r.image[0, 0]).all()


def test_the_reader_reads_the_depth_world():
    """The world's own reader on it: shape, colour, size (physical, from image size and row) and position."""
    report = check_reader(DEPTH64, 40, seed=11)
    assert report["exact_scene_accuracy"] >= 0.95, report["first_failures"]


def test_the_reader_tells_a_far_large_object_from_a_near_small_one():
    cfg = DEPTH64
    far_large = Obj("diamond", "green", "large", x=0.2, y=0.52)
    near_small = Obj("diamond", "green", "small", x=0.8, y=0.76)
    assert object_radius_px(far_large, cfg) == pytest.approx(object_radius_px(near_small, cfg), rel=0.05)
    got = read(render(Scene((far_large, near_small)), cfg).image, cfg)
    assert sorted(o.size for o in got.objects) == ["large", "small"]
    assert {(o.size, o.x < 0.5) for o in got.objects} == {("large", True), ("small", False)}


def test_depth_world_renders_deterministically():
    cfg = world_preset("depth32")
    scenes = [scene_at(cfg, 0, i) for i in range(4)]
    a, b = render_batch(scenes, cfg), render_batch(scenes, cfg)
    assert hashlib.sha256(a.image.tobytes()).digest() == hashlib.sha256(b.image.tobytes()).digest()
    assert a.depth.min() > 0 and a.depth.max() == 1.0


def test_bad_style_and_radii_are_named():
    with pytest.raises(DifflabError, match="world style 'isometric'"):
        WorldConfig(style="isometric")
    with pytest.raises(DifflabError, match="perspective radii"):
        WorldConfig(style="perspective", radius={"small": 0.2, "large": 1.5})
