"""Captions and question/answer pairs: true of the scene, and of what the reader reads from its image."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.errors import DifflabError
from difflab.world.geneval import category
from difflab.world.language import (
    CAPTION_STYLES,
    QUESTION_KINDS,
    SHORT_FORMS,
    Question,
    answer,
    caption,
    contrast,
    describe,
    description,
    object_specs,
    questions,
    short_caption,
    short_forms,
)
from difflab.world.prompts import ObjectSpec, holds
from difflab.world.reader import read
from difflab.world.render import render
from difflab.world.scene import Obj, Scene, scene_at, world_preset

SCENE = Scene((
    Obj("circle", "red", "large", 0.15, 0.15), Obj("square", "blue", "small", 0.85, 0.85),
    Obj("circle", "red", "small", 0.85, 0.15), Obj("triangle", "orange", "small", 0.5, 0.5),
))  # fmt: skip

worlds = st.sampled_from(["scene32", "scene64"])
seeds = st.integers(0, 2**31 - 1)


def _scene_and_reading(world: str, seed: int):
    cfg = world_preset(world)
    scene = scene_at(cfg, seed, 0)
    return cfg, scene, read(render(scene, cfg).image, cfg)


def test_describe_is_complete_and_deterministic():
    assert describe(SCENE) == (
        "a large red circle at the top left, a small red circle at the top right, "
        "a small orange triangle in the center and a small blue square at the bottom right"
    )
    assert holds(description(SCENE), SCENE)
    assert not holds(description(SCENE), Scene(SCENE.objects[:3]))  # exact: nothing missing
    assert not holds(description(Scene(SCENE.objects[:3])), SCENE)  # ... and nothing extra


def test_hand_built_answers():
    q = {
        Question("color", ObjectSpec("square")): "blue",
        Question("shape", ObjectSpec(color="orange")): "triangle",
        Question("count", ObjectSpec("circle")): "2",
        Question("count", ObjectSpec("circle", "blue")): "0",
        Question("existence", ObjectSpec("triangle", "cyan")): "no",
        Question("existence", ObjectSpec("triangle", "orange")): "yes",
        Question("position", ObjectSpec("circle", size="large")): "top left",
        Question("color", ObjectSpec("circle")): None,  # two circles: no single answer
    }
    for question, expected in q.items():
        assert answer(question, SCENE) == expected
    assert [x.text() for x in list(q)[:3]] == [
        "what colour is the square?",
        "what shape is the orange object?",
        "how many circles?",
    ]
    assert Question("existence", ObjectSpec("triangle", "cyan")).text() == "is there a cyan triangle?"
    assert Question("position", ObjectSpec("circle", "red")).text() == "where is the red circle?"
    assert all(Question.from_dict(x.to_dict()) == x for x in q)


@settings(max_examples=50, deadline=None)
@given(world=worlds, seed=seeds)
def test_every_caption_holds_in_the_scene_and_in_its_reading(world, seed):
    _, scene, reading = _scene_and_reading(world, seed)
    rng = np.random.default_rng(seed)
    styles = CAPTION_STYLES if len(scene.objects) >= 2 else ("object", "count", "describe")
    for style in [*styles, None, None]:
        text, prompt = caption(scene, rng, style)
        assert text == prompt.text()
        assert holds(prompt, scene) and holds(prompt, reading), text


@settings(max_examples=50, deadline=None)
@given(world=worlds, seed=seeds)
def test_short_captions_hold_and_are_the_geneval_forms(world, seed):
    """Each short form is exactly one GenEval category's prompt form (geneval.category reads it off the
    prompt's structure), and holds in the scene and in the reader's reading of its image."""
    _, scene, reading = _scene_and_reading(world, seed)
    rng = np.random.default_rng(seed)
    geneval_of = {"shape": "single_object", "colored": "colors", "count": "counting", "two": "two_objects",
                  "position": "position", "binding": "attribute_binding"}  # fmt: skip
    assert set(geneval_of) == set(SHORT_FORMS)
    for form in [*short_forms(scene), None, None]:
        text, prompt = short_caption(scene, rng, form)
        assert text == prompt.text() and holds(prompt, scene) and holds(prompt, reading), text
        if form is not None:
            assert category(prompt) == geneval_of[form], text


def test_short_forms_follow_the_scene():
    assert short_forms(SCENE) == SHORT_FORMS
    two_circles = Scene((SCENE.objects[0], SCENE.objects[2]))  # same shape: no two-object forms
    assert short_forms(two_circles) == ("shape", "colored", "count")
    assert short_caption(two_circles, np.random.default_rng(0), "count")[0] == "two circles"
    same_colour = Scene((SCENE.objects[0], Obj("square", "red", "small", 0.85, 0.85)))
    assert "binding" not in short_forms(same_colour) and "position" in short_forms(same_colour)
    with pytest.raises(DifflabError, match="short caption form 'binding' does not fit"):
        short_caption(same_colour, np.random.default_rng(0), "binding")
    with pytest.raises(DifflabError, match="unknown short caption form 'haiku'"):
        short_caption(SCENE, np.random.default_rng(0), "haiku")


@settings(max_examples=50, deadline=None)
@given(world=worlds, seed=seeds)
def test_every_answer_agrees_with_the_reading(world, seed):
    cfg, scene, reading = _scene_and_reading(world, seed)
    qas = questions(scene, np.random.default_rng(seed), 8, cfg)
    assert len(qas) == 8 and len({qa.question for qa in qas}) >= 4
    for qa in qas:
        assert qa.answer is not None and qa.question == qa.struct.text() and qa.kind == qa.struct.kind
        assert answer(qa.struct, reading) == qa.answer, qa.question


def test_question_mix_is_balanced():
    cfg = world_preset("scene64")
    qas = [qa for i in range(200) for qa in questions(scene_at(cfg, 3, i), np.random.default_rng(i), 5, cfg)]
    kinds = Counter(qa.kind for qa in qas)
    assert set(kinds) == set(QUESTION_KINDS) and min(kinds.values()) > 0.12 * len(qas)
    existence = Counter(qa.answer for qa in qas if qa.kind == "existence")
    assert abs(existence["yes"] - existence["no"]) < 0.2 * sum(existence.values())
    counts = Counter(qa.answer for qa in qas if qa.kind == "count")
    assert 0.1 < counts["0"] / sum(counts.values()) < 0.4


def test_same_rng_same_language():
    a = caption(SCENE, np.random.default_rng(5)), questions(SCENE, np.random.default_rng(5), 6)
    b = caption(SCENE, np.random.default_rng(5)), questions(SCENE, np.random.default_rng(5), 6)
    assert a == b


def test_errors_name_the_problem():
    one = Scene(SCENE.objects[:1])
    with pytest.raises(DifflabError, match="'relation' needs two objects"):
        caption(one, np.random.default_rng(0), "relation")
    with pytest.raises(DifflabError, match="unknown caption style 'poem'"):
        caption(SCENE, np.random.default_rng(0), "poem")
    with pytest.raises(DifflabError, match="unknown question kind 'why'"):
        questions(SCENE, np.random.default_rng(0), 3, kinds=("why",))
    with pytest.raises(DifflabError, match="empty scene"):
        caption(Scene(()), np.random.default_rng(0))


@pytest.mark.parametrize("world", ["scene32", "scene64"])
def test_contrast_captions_are_false_and_one_edit_away(world):
    """NegCLIP-style negatives: false in the scene, same kind of prompt, and (unless the edit swapped two
    colours or reversed a relation) exactly one attribute of one object changed."""
    cfg = world_preset(world)
    kinds = Counter()
    for i in range(300):
        scene = scene_at(cfg, 5, i)
        rng = np.random.default_rng(i)
        _, prompt = caption(scene, rng)
        negative = contrast(prompt, scene, rng, cfg)
        if negative is None:
            continue
        assert type(negative) is type(prompt) and not negative.holds(scene) and prompt.holds(scene)
        before, after = object_specs(prompt), object_specs(negative)
        changed = [
            (a, x, y)
            for p, q in zip(before, after, strict=True)
            for a, x, y in ((a, getattr(p, a), getattr(q, a)) for a in ("shape", "color", "size", "position"))
            if x != y
        ]
        if len(changed) == 1:
            kinds[changed[0][0]] += 1
        elif changed:  # a colour swap: two objects exchanged their colours
            assert len(changed) == 2 and {c[0] for c in changed} == {"color"}
            assert (changed[0][1], changed[0][2]) == (changed[1][2], changed[1][1])
            kinds["swap"] += 1
        else:  # a reversed relation
            assert negative.relation != prompt.relation
            kinds["relation"] += 1
    assert sum(kinds.values()) > 280 and set(kinds) >= {"shape", "color", "size", "swap", "relation"}, kinds
