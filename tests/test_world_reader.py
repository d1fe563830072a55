"""The reader (pixels -> scene): measured accuracy floors from the foundation issue, and edge cases.

Floors: exact-scene accuracy >= 0.99 on clean renders and >= 0.95 with N(0, 0.05^2) pixel noise. The
full measurement (2,000 scenes per preset) is `difflab world check`; here a smaller sample keeps the
suite fast while still failing if the reader regresses.
"""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from difflab.errors import DifflabError
from difflab.world.check import check_reader
from difflab.world.reader import _components, estimate_background, read, read_silhouettes, read_with_blends
from difflab.world.render import render
from difflab.world.scene import COLORS, SHAPES, Obj, Scene, scene_at, world_preset


@pytest.mark.parametrize(
    "preset,n", [("tiny", 150), ("single32", 150), ("scene32", 150), ("star32", 100), ("scene64", 60)]
)
@pytest.mark.parametrize("noise,floor", [(0.0, 0.99), (0.05, 0.95)])
def test_reader_accuracy_floor(preset, n, noise, floor):
    report = check_reader(world_preset(preset), n, seed=123, noise=noise)
    assert report["exact_scene_accuracy"] >= floor, report["first_failures"]
    assert set(report["attribute_accuracy"]) == {"shape", "color", "size", "position"}


@pytest.mark.parametrize("background", ["gradient", "texture"])
def test_reader_on_non_plain_backgrounds(background):
    report = check_reader(world_preset("scene32", background=background), 100, seed=5, noise=0.05)
    assert report["exact_scene_accuracy"] >= 0.95, report["first_failures"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("color", COLORS)
def test_every_shape_and_colour_is_read_small(shape, color):
    # The hardest case for each class: the small size at 32x32 (bounding radius 4 px).
    cfg = world_preset("single32")
    scene = Scene((Obj(shape, color, "small", 0.52, 0.47),))
    assert read(render(scene, cfg).image, cfg).keys() == scene.keys()


def test_touching_objects_of_different_colours_are_split():
    cfg = world_preset("scene32", gap=-3.0)  # negative gap: the bounding circles may overlap by 3 px
    scene = Scene((Obj("square", "red", "large", 0.30, 0.5), Obj("circle", "blue", "large", 0.68, 0.5)))
    img = render(scene, cfg).image
    assert read(img, cfg).keys() == scene.keys()


def test_a_two_coloured_object_is_two_to_the_reader_and_one_silhouette():
    """An object painted half red, half blue (what a generator that binds colours badly draws): read()
    splits it by colour, read_silhouettes() fits the whole blob as the one large square it is."""
    cfg = world_preset("scene32")
    scene = Scene((Obj("square", "red", "large", 0.5, 0.5),))
    img = render(scene, cfg).image.copy()
    red = np.all(np.isclose(img, img[16, 12]), axis=-1)  # the fully covered red pixels
    img[:, 16:][red[:, 16:]] = (0.15, 0.30, 0.95)  # the right half blue
    assert len(read(img, cfg).objects) == 2
    (obj,) = read_silhouettes(img, cfg).objects
    assert (obj.shape, obj.size, obj.cell) == ("square", "large", (1, 1))
    clean = scene_at(cfg, 3, 0)  # on a clean render the two readings agree
    assert (
        read_silhouettes(render(clean, cfg).image, cfg).keys() == read(render(clean, cfg).image, cfg).keys()
    )


def test_empty_image_reads_as_empty_scene():
    cfg = world_preset("scene32")
    assert read(render(Scene(()), cfg).image, cfg).objects == ()


def test_accepts_uint8_and_diffusion_tensors():
    cfg = world_preset("scene32")
    scene = scene_at(cfg, 0, 1)
    img = render(scene, cfg).image
    as_uint8 = (img * 255).round().astype(np.uint8)
    as_tensor = torch.from_numpy(img).permute(2, 0, 1) * 2 - 1  # (3, H, W) in [-1, 1]
    assert read(as_uint8, cfg).keys() == read(as_tensor, cfg).keys() == scene.keys()


def test_rejects_wrong_shape_with_clear_error():
    with pytest.raises(DifflabError, match=r"\(H, W, 3\).*\(32, 32\)"):
        read(np.zeros((32, 32)), world_preset("scene32"))


# Arbitrary pixels (any size, dtype and value pattern, NaN included) must either read as a valid scene
# or raise the documented DifflabError: a model that draws garbage must never crash the evaluator.
_images = st.one_of(
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3))),
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 4)),
        elements=st.one_of(st.floats(-2, 2, width=32), st.just(float("nan"))),
    ),  # fmt: skip
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, max_side=12)),
)


@settings(max_examples=150, deadline=None)
@given(image=_images, preset=st.sampled_from(["tiny", "scene32"]))
def test_fuzzed_images_read_or_raise_the_documented_error(image, preset):
    cfg = world_preset(preset)
    try:
        scene = read(image, cfg)
    except DifflabError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert isinstance(scene, Scene)
    for obj in scene.objects:
        assert obj.shape in SHAPES and obj.color in COLORS
        assert 0.0 <= obj.x <= 1.0 and 0.0 <= obj.y <= 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_one_shape_in_two_colours_is_a_blend_and_two_touching_shapes_are_not(shape):
    """The reader splits a component by colour either way; a blend is the one a single template explains
    better than the per-colour halves (read_with_blends)."""
    cfg = world_preset("scene32")
    red = render(Scene((Obj(shape, "red", "large", 0.5, 0.5),)), cfg).image
    blue = render(Scene((Obj(shape, "blue", "large", 0.5, 0.5),)), cfg).image
    half = red.copy()
    half[:, : cfg.resolution // 2] = blue[:, : cfg.resolution // 2]  # left half blue, right half red
    scene, blends = read_with_blends(half, cfg)
    assert sorted(o.color for o in scene.objects) == ["blue", "red"] and blends == 1
    # Two objects drawn side by side, touching (closer than the world ever places them): one component,
    # split into two objects, and not a blend.
    r = 0.85 * cfg.radius["small"]
    pair = Scene((Obj(shape, "red", "small", 0.5 - r, 0.5), Obj(shape, "blue", "small", 0.5 + r, 0.5)))
    image = render(pair, cfg).image
    assert len(_components(np.linalg.norm(image - estimate_background(image), axis=-1) > 0.05)) == 1
    scene, blends = read_with_blends(image, cfg)
    assert sorted(o.color for o in scene.objects) == ["blue", "red"] and blends == 0
    # One-coloured objects, far apart as the world draws them: nothing to blend.
    assert read_with_blends(render(scene_at(cfg, 0, 3), cfg).image, cfg)[1] == 0


def test_the_base_shapes_are_never_read_as_an_extension_s_star():
    """A world that draws stars reads them over every shape, and its base scenes read as before."""
    star_aware = dataclasses.replace(world_preset("scene32"), shapes=(*SHAPES, "star"))
    report = check_reader(star_aware, 150, seed=5, noise=0.05)  # draws the base shapes and stars
    assert report["exact_scene_accuracy"] >= 0.95, report["first_failures"]
    for i in range(60):
        scene = scene_at(world_preset("scene32"), 9, i)
        image = render(scene, world_preset("scene32")).image
        assert read(image, star_aware).keys() == read(image, world_preset("scene32")).keys() == scene.keys()
