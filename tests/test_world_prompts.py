"""Structured prompts: English, truth in scenes, GenEval categories, and the shipped evaluation sets."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.errors import DifflabError
from difflab.world.prompts import (
    CATEGORIES,
    HELDOUT_PAIRS,
    PROMPT_SET_VERSION,
    PROMPT_SET_WORLDS,
    Conjunction,
    Count,
    Exists,
    ObjectSpec,
    Relation,
    build_prompt_sets,
    category,
    category_pool,
    check_faithfulness,
    holds,
    load_prompt_set,
    mentions_heldout,
    prompt_from_dict,
    prompt_set_path,
    refer,
    scene_for,
)
from difflab.world.reader import read
from difflab.world.render import render
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


@pytest.mark.parametrize("world", PROMPT_SET_WORLDS)
def test_every_category_pool_is_categorised_and_round_trips(world):
    cfg = world_preset(world)
    for name in CATEGORIES:
        for p in category_pool(name, cfg):
            assert category(p) == name
            assert prompt_from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert category(Exists(O("circle", "red", "large"))) == "caption"
    assert category(Conjunction((O("circle"), O("circle")))) == "caption"


def test_counting_respects_the_worlds_object_limit():
    assert {p.n for p in category_pool("counting", world_preset("scene32"))} == {1, 2}
    assert {p.n for p in category_pool("counting", world_preset("scene64"))} == {1, 2, 3, 4}


def test_shipped_prompt_sets_equal_regenerated_ones():
    """A code change that alters the evaluation prompts must bump PROMPT_SET_VERSION and write a new
    file (``python -m difflab.world.prompts``), never silently change v1."""
    assert PROMPT_SET_VERSION == 1
    shipped = json.loads(prompt_set_path(1).read_text())
    assert shipped == json.loads(json.dumps(build_prompt_sets()))
    for world in PROMPT_SET_WORLDS:
        sets = load_prompt_set(world)
        assert list(sets) == list(CATEGORIES) and all(len(ps) == 100 for ps in sets.values())
        assert all(category(p) == c for c, ps in sets.items() for p in ps)


def test_load_errors_name_the_bad_value():
    with pytest.raises(DifflabError, match="no prompt set version 7; choose one of: 1"):
        load_prompt_set("scene64", version=7)
    with pytest.raises(DifflabError, match="unknown prompt-set world 'scene16'"):
        load_prompt_set("scene16")


@pytest.mark.parametrize("world", PROMPT_SET_WORLDS)
def test_every_evaluation_prompt_is_satisfiable_and_read_back(world):
    """A perfect model (``scene_for``) scores 1.0 through the renderer and the reader in every category,
    and the same images score far lower against other prompts of the category: the check discriminates."""
    cfg, rng = world_preset(world), np.random.default_rng(0)
    prompts = sorted({p for ps in load_prompt_set(world).values() for p in ps}, key=lambda p: p.text())
    scenes = [scene_for(p, rng, cfg) for p in prompts]
    assert all(s is not None and cfg.min_objects <= len(s.objects) <= cfg.max_objects for s in scenes)
    read_back = [read(render(s, cfg).image, cfg) for s in scenes]
    result = check_faithfulness(prompts, read_back)
    assert set(result) == {*CATEGORIES, "overall"}
    assert all(r["score"] == 1.0 for r in result.values()), result
    mismatched = check_faithfulness(prompts, read_back[1:] + read_back[:1])
    assert mismatched["overall"]["score"] < 0.7


def test_faithfulness_arithmetic():
    prompts = [Exists(O("circle")), Exists(O("square")), Exists(O("triangle")), Exists(O("circle", "red"))]
    r = check_faithfulness(prompts, [SCENE] * 4)
    assert r["single_object"] == {"n": 3, "score": pytest.approx(2 / 3)}
    assert r["colors"] == {"n": 1, "score": 1.0}
    assert r["overall"] == {"n": 4, "score": pytest.approx((2 / 3 + 1) / 2)}  # mean over categories
    with pytest.raises(DifflabError, match="2 prompts but 1 scenes"):
        check_faithfulness(prompts[:2], [SCENE])


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), world=st.sampled_from(["scene32", "scene64"]))
def test_refer_picks_out_exactly_one_object(seed, world):
    scene = scene_at(world_preset(world), seed, 0)
    for obj in scene.objects:
        spec = refer(obj, scene)
        assert [o for o in scene.objects if holds(Exists(spec), Scene((o,)))] == [obj]


def test_heldout_pairs():
    assert len({c for c, _ in HELDOUT_PAIRS}) == len({s for _, s in HELDOUT_PAIRS}) == len(HELDOUT_PAIRS)
    assert mentions_heldout(Conjunction((O("square"), O("circle", "orange"))))
    assert not mentions_heldout(Exists(O("circle", "red")))
    assert mentions_heldout(_scene(("circle", "orange", "large", 0.5, 0.5)))
    assert not mentions_heldout(SCENE)
    assert mentions_heldout(SCENE, pairs=[("red", "circle")])
