"""The world's English read back into structure (difflab.world.parse): every caption and question the world
writes parses to the structure that wrote it, true in its scene; anything else is None, never an error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.world.language import (
    CAPTION_STYLES,
    QUESTION_KINDS,
    answer,
    caption,
    describe,
    description,
    questions,
    short_caption,
    short_forms,
)
from difflab.world.parse import normalized, parse_caption, parse_prompt, parse_question
from difflab.world.prompts import Conjunction, Count, Exists, ObjectSpec, Relation
from difflab.world.scene import scene_at, world_preset

SCENES = 400
"""Scenes per world in the round trips (every style of each: about 2,000 captions per world)."""


def _written(scene, rng):
    """Every caption the world writes of ``scene``, with the prompt that wrote it: each style of the full
    captioner, each short form that fits, and the full description."""
    out = [
        caption(scene, rng, style)
        for style in CAPTION_STYLES
        if len(scene.objects) > 1 or style not in ("relation", "pair")
    ]
    out += [short_caption(scene, rng, form) for form in short_forms(scene)]
    return out + [(describe(scene), description(scene))]


@pytest.mark.parametrize("world_name", ["scene32", "scene64"])
def test_the_caption_parser_round_trips_every_caption_the_world_writes(world_name):
    """Source: the world's own captioners. Parsed back, a caption is the prompt that wrote it (a full
    description loses only its 'exact' flag, which has no words, and a description of one object is that
    object's Exists, the same words), its text is the caption, and it holds in its scene."""
    world = world_preset(world_name)
    rng = np.random.default_rng(11)
    styles = set()
    for i in range(SCENES):
        scene = scene_at(world, 5, i)
        for text, prompt in _written(scene, rng):
            parsed = parse_caption(text, world)
            assert parsed is not None, text
            assert parsed.prompt.text() == text and parsed.prompt.holds(scene), text
            want = prompt
            if isinstance(prompt, Conjunction):  # 'a red circle' describes a scene of one: it reads as Exists
                want = (
                    Exists(prompt.parts[0])
                    if len(prompt.parts) == 1
                    else dataclasses.replace(prompt, exact=False)
                )
            assert parsed.prompt == want, text
            styles.add(type(prompt).__name__)
    assert styles == {"Exists", "Count", "Relation", "Conjunction"}


def test_every_question_the_world_asks_parses_back_and_answers_the_same():
    """Source: language.questions. Each question text parses to its own structure, and the world's answer
    to the parsed question is the answer it was asked with."""
    world = world_preset("scene64")
    rng = np.random.default_rng(2)
    kinds = set()
    for i in range(100):
        scene = scene_at(world, 9, i)
        for qa in questions(scene, rng, 8, world):
            assert parse_question(qa.question) == qa.struct, qa.question
            assert answer(parse_question(qa.question), scene) == qa.answer
            kinds.add(qa.kind)
    assert kinds == set(QUESTION_KINDS)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "a purple circle", "circle red", "a red red circle", "a orange circle", "two circle",
     "ten circles", "a red circle to the left of", "a red circle and", "the red circle", "a circle beside a square",
     "a large red circle at the top", "<unk> <unk>", "a red circle, a blue square, and", None, 42, b"a circle"],
)  # fmt: skip
def test_an_unparsable_caption_is_none(text):
    assert parse_caption(text, world_preset("scene64")) is None


def test_a_caption_outside_the_worlds_vocabulary_is_none():
    """'star' is the world's word, but scene32 never draws one: a word its captions never say."""
    assert parse_caption("a star", world_preset("scene32")) is None
    assert parse_caption("no stars", world_preset("scene32")) is None
    assert parse_caption("a star", world_preset("star32")) is not None
    assert (
        parse_caption("a small circle", world_preset("tiny")) is None
    )  # the tiny world has large objects only


def test_what_a_parsed_caption_asserts():
    world = world_preset("scene64")
    two = parse_caption("Two red circles.", world)
    assert (
        two.objects == (ObjectSpec("circle", "red"),) and two.instances == (ObjectSpec("circle", "red"),) * 2
    )
    assert two.counts == (Count(ObjectSpec("circle", "red"), 2),) and two.relations == ()
    none = parse_caption("no crosses", world)
    assert none.objects == none.instances == () and none.counts == (Count(ObjectSpec("cross"), 0),)
    rel = parse_caption("a circle to the left of a small square", world)
    assert rel.objects == (ObjectSpec("circle"), ObjectSpec("square", size="small"))
    assert rel.relations == (Relation(ObjectSpec("circle"), "left_of", ObjectSpec("square", size="small")),)


_WORDS = ["a", "an", "the", "two", "no", "and", ",", "to", "left", "of", "above", "at", "top", "center", "in",
          "red", "orange", "circle", "circles", "square", "small", "large", "object", ".", "?", "xyz", "9"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=12) | st.text(max_size=40))
def test_the_parser_never_raises_and_never_guesses(words):
    """Property: garbled text gives None or a caption whose own text is the input, word for word."""
    text = words if isinstance(words, str) else " ".join(words)
    parsed = parse_caption(text, world_preset("scene64"))
    assert parsed is None or parsed.prompt.text() == normalized(text)
    assert parse_question(text) is None or parse_question(text).text() == normalized(text)


def test_the_app_keeps_its_import():
    """The parser moved from the app's verdict into the world; the app's name is the same function."""
    from difflab.app import verdict

    assert verdict.parse_prompt is parse_prompt and verdict.normalized is normalized
