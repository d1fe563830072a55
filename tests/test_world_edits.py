"""Edits: the instruction is carried out in the edited scene, as the reader sees it, and nothing else."""

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.errors import DifflabError
from difflab.world.edits import EDIT_KINDS, Edit, edit, edit_holds, expected_keys, sample_edit
from difflab.world.prompts import ObjectSpec
from difflab.world.reader import read
from difflab.world.render import render
from difflab.world.scene import Obj, Scene, overlaps, scene_at, world_preset

CFG = world_preset("scene64")
SCENE = Scene((
    Obj("circle", "red", "large", 0.15, 0.15, 0.8), Obj("square", "blue", "small", 0.85, 0.85, 0.6),
    Obj("circle", "red", "small", 0.85, 0.15, 0.4),
))  # fmt: skip


def test_hand_built_edits():
    assert Edit("recolor", ObjectSpec("square"), color="green").text() == "make the square green"
    assert Edit("move", ObjectSpec("square"), direction="left").text() == "move the square to the left"
    assert Edit("move", ObjectSpec("square"), direction="up").text() == "move the square up"
    assert Edit("remove", ObjectSpec("circle", size="small")).text() == "remove the small circle"
    added = Edit("add", ObjectSpec("cross", "orange", "small", "bottom left"))
    assert added.text() == "add a small orange cross at the bottom left"
    recolored = Scene(
        (SCENE.objects[0], dataclasses.replace(SCENE.objects[1], color="green"), SCENE.objects[2])
    )
    assert edit_holds(Edit("recolor", ObjectSpec("square"), color="green"), SCENE, recolored)
    assert not edit_holds(Edit("recolor", ObjectSpec("square"), color="white"), SCENE, recolored)
    assert not edit_holds(Edit("recolor", ObjectSpec("circle"), color="green"), SCENE, SCENE)  # ambiguous
    assert expected_keys(Edit("move", ObjectSpec("square"), direction="right"), SCENE) is None  # off the grid


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_never_holds_for_an_unchanged_scene(kind):
    for i in range(20):
        scene = scene_at(CFG, 1, i)
        try:
            e, _ = sample_edit(scene, np.random.default_rng(i), CFG, kind)
        except DifflabError:
            continue
        assert not edit_holds(e, scene, scene)
        assert Edit.from_dict(e.to_dict()) == e


def _valid(scene: Scene, cfg) -> bool:
    objs = scene.objects
    cells = [o.cell for o in objs]
    depths = [o.depth for o in objs]
    return (
        cfg.min_objects <= len(objs) <= cfg.max_objects
        and len(set(cells)) == len(cells)
        and not any(overlaps(a, b, cfg) for a, b in itertools.combinations(objs, 2))
        and depths == sorted(depths, reverse=True)  # still back to front
        and all(o.color in cfg.colors and o.shape in cfg.shapes for o in objs)
    )


@settings(max_examples=50, deadline=None)
@given(world=st.sampled_from(["scene32", "scene64"]), seed=st.integers(0, 2**31 - 1))
def test_every_edit_is_carried_out_as_the_reader_sees_it(world, seed):
    cfg = world_preset(world)
    scene = scene_at(cfg, seed, 0)
    before = read(render(scene, cfg).image, cfg)
    for kind in [*EDIT_KINDS, None]:
        try:
            e, edited = sample_edit(scene, np.random.default_rng(seed), cfg, kind)
        except DifflabError:
            assert kind in ("remove", "add", "move")  # only these can be impossible
            continue
        assert kind in (None, e.kind)
        assert _valid(edited, cfg), e.text()
        assert edit_holds(e, scene, edited)
        after = read(render(edited, cfg).image, cfg)
        assert edit_holds(e, before, after), e.text()


def test_kinds_that_cannot_apply_are_refused_and_the_rest_are_chosen():
    one = Scene(SCENE.objects[:1])
    with pytest.raises(DifflabError, match="no 'remove' edit applies to this scene of 1 objects"):
        sample_edit(one, np.random.default_rng(0), CFG, "remove")
    full = scene_at(CFG, 0, 0)
    assert len(full.objects) == CFG.max_objects
    with pytest.raises(DifflabError, match="no 'add' edit"):
        sample_edit(full, np.random.default_rng(0), CFG, "add")
    kinds = {sample_edit(one, np.random.default_rng(i), CFG)[0].kind for i in range(30)}
    assert kinds == {"recolor", "move", "add"}
    with pytest.raises(DifflabError, match="unknown edit kind 'rotate'"):
        edit(SCENE, np.random.default_rng(0), CFG, "rotate")


def test_added_objects_go_in_front_and_edits_are_deterministic():
    e, edited = sample_edit(SCENE, np.random.default_rng(3), CFG, "add")
    assert edited.objects[:-1] == SCENE.objects
    assert edited.objects[-1].depth < min(o.depth for o in SCENE.objects)
    for kind in EDIT_KINDS:
        assert edit(SCENE, np.random.default_rng(7), CFG, kind) == edit(
            SCENE, np.random.default_rng(7), CFG, kind
        )
