"""Structured prompts: English, truth in scenes, JSON, and referring expressions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.errors import DifflabError
from difflab.world.prompts import (
    Conjunction,
    Count,
    Exists,
    ObjectSpec,
    Relation,
    holds,
    prompt_from_dict,
    refer,
)
from difflab.world.scene import Obj, Scene, scene_at, world_preset

O = ObjectSpec


def _scene(*objs) -> Scene:
    """Objects given as (shape, colour, size, x, y)."""
    return Scene(tuple(Obj(*o) for o in objs))


# Red circle top left, blue square bottom right, small red circle top right.
SCENE = _scene(
    ("circle", "red", "large", 0.15, 0.15), ("square", "blue", "small", 0.85, 0.85),
    ("circle", "red", "small", 0.85, 0.15),
)  # fmt: skip


def test_english():
    assert Exists(O("circle", "orange")).text() == "an orange circle"
    assert Exists(O("circle", "red", "large", "top left")).text() == "a large red circle at the top left"
    assert Exists(O("square", position="center")).text() == "a square in the center"
    assert Exists(O()).text() == "an object"
    assert Count(O("cross"), 3).text() == "three crosses"
    assert Count(O("circle", "green"), 2).text() == "two green circles"
    assert Count(O("circle"), 1).text() == "one circle"
    assert Count(O("triangle"), 0).text() == "no triangles"
    assert Relation(O("circle", "red"), "left_of", O("square", "blue", "small")).text() == (
        "a red circle to the left of a small blue square"
    )
    assert Conjunction((O("circle"), O("square"), O("cross", "orange"))).text() == (
        "a circle, a square and an orange cross"
    )


def test_truth_in_a_hand_built_scene():
    assert holds(Exists(O("circle", "red", "small", "top right")), SCENE)
    assert not holds(Exists(O("circle", "blue")), SCENE)
    assert holds(Count(O("circle"), 2), SCENE) and not holds(Count(O("circle"), 1), SCENE)
    assert holds(Count(O("triangle"), 0), SCENE)
    assert holds(Relation(O("circle"), "left_of", O("square")), SCENE)  # the large one
    assert holds(Relation(O("circle"), "above", O("square")), SCENE)
    assert not holds(Relation(O("square"), "above", O("circle")), SCENE)
    assert not holds(Relation(O("circle", size="small"), "left_of", O("square")), SCENE)  # same column
    # Binding: the colours must sit on the right objects, and parts need distinct objects.
    assert holds(Conjunction((O("circle", "red"), O("square", "blue"))), SCENE)
    assert not holds(Conjunction((O("circle", "blue"), O("square", "red"))), SCENE)
    assert holds(Conjunction((O("circle"), O("circle"))), SCENE)
    assert not holds(Conjunction((O("square"), O("square"))), SCENE)
    assert not holds(Conjunction((O("circle"), O("square")), exact=True), SCENE)


def test_bad_values_are_named():
    with pytest.raises(DifflabError, match="unknown colour 'purple'"):
        O("circle", "purple")
    with pytest.raises(DifflabError, match="unknown relation 'near'"):
        Relation(O("circle"), "near", O("square"))
    with pytest.raises(DifflabError, match="count 12"):
        Count(O("circle"), 12)
    with pytest.raises(DifflabError, match="unknown prompt kind 'or'"):
        prompt_from_dict({"kind": "or"})


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), world=st.sampled_from(["scene32", "scene64"]))
def test_refer_picks_out_exactly_one_object(seed, world):
    scene = scene_at(world_preset(world), seed, 0)
    for obj in scene.objects:
        spec = refer(obj, scene)
        assert [o for o in scene.objects if holds(Exists(spec), Scene((o,)))] == [obj]
