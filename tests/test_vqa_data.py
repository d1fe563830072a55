"""The VLM's data (difflab.data.vqa): training items true of their scenes and free of the held-out pairs, and
evaluation sets that are deterministic, balanced and drawn from scenes no training set holds."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from difflab.data.toy import scene_image
from difflab.data.vqa import (
    EVAL_SEED,
    POPE_SETTINGS,
    VQADataConfig,
    VQAScenes,
    caption_cases,
    pope_cases,
    vqa_cases,
)
from difflab.errors import DifflabError
from difflab.world.geneval import HELDOUT_PAIRS, mentions_heldout
from difflab.world.language import QUESTION_KINDS, Question, answer, describe, swapped_pairs
from difflab.world.parse import parse_caption, parse_question
from difflab.world.prompts import ObjectSpec
from difflab.world.scene import scene_at, world_preset

PAIRS = set(HELDOUT_PAIRS)


@pytest.fixture(scope="module")
def training():
    """400 scenes of scene64 (up to four objects: the most chances to draw a held-out pair), 3 texts each."""
    return VQAScenes(VQADataConfig(world="scene64", n=400, questions_per_scene=3, caption_prob=0.3))


def _named_pairs(question: str, text: str, kind: str, world) -> set:
    """The (colour, shape) pairs an item's text names."""
    specs = parse_caption(text, world).objects if kind == "caption" else (parse_question(question).spec,)
    return {(s.color, s.shape) for s in specs}


def test_training_items_never_show_or_name_a_held_out_pair(training):
    """Checked on each item's own scene, objects one by one; and the check is not vacuous: many of the
    world's own scenes of this seed show a held-out pair, and those were redrawn."""
    world, q = training.world, training.data.questions_per_scene
    redrawn = sum(mentions_heldout(scene_at(world, 0, i), PAIRS) for i in range(training.data.n))
    assert redrawn > 50
    for j in range(len(training)):
        scene = training.scenes.scene(j // q)
        assert not any((o.color, o.shape) in PAIRS for o in scene.objects), scene
        assert not _named_pairs(*training.text(j), world) & PAIRS, training.text(j)
    assert not any(training.item(j).heldout_pair for j in range(0, len(training), 50))


def test_training_items_are_their_scene_drawn_with_a_true_text(training):
    """Source: the world's truth. The image is the scene rendered; a caption parses and holds; an answer is
    what the world answers to the question."""
    world = training.world
    for j in range(0, len(training), 5):
        item = training.item(j)
        assert torch.equal(item.image, scene_image(item.scene, world))
        assert item.image.shape == (3, 64, 64) and item.image.min() >= -1 and item.image.max() <= 1
        if item.task == "caption":
            assert item.question == "" and parse_caption(item.answer, world).prompt.holds(item.scene)
        else:
            assert item.kind in QUESTION_KINDS
            assert answer(parse_question(item.question), item.scene) == item.answer


def test_the_mix_ratio_is_the_share_of_captions(training):
    """Each text is a caption with probability 0.3, independently: the share over 1,200 texts lies within
    4 binomial standard errors (a false alarm once in ~16,000 seeds). 0 and 1 are exact."""
    share = np.mean([training.text(j)[2] == "caption" for j in range(len(training))])
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(training)) ** 0.5
    for p, want in ((0.0, {"vqa"}), (1.0, {"caption"})):
        data = VQAScenes(VQADataConfig(n=20, questions_per_scene=2, caption_prob=p))
        assert {data[j]["task"] for j in range(len(data))} == want  # the item's task, through __getitem__


def test_a_conversation_is_its_scenes_texts_in_order(training):
    """turns=3: item j is texts 3j, 3j+1, 3j+2 of the same data, all about one scene, drawn once; a loader
    with vqa.collate keeps each item's turns together (the default collate would transpose them)."""
    from difflab.data.vqa import collate

    talk = VQAScenes(dataclasses.replace(training.data, turns=3))
    assert len(talk) == len(training) // 3
    for j in (0, 7, len(talk) - 1):
        item = talk[j]
        assert item["question"] == tuple(training[3 * j + k]["question"] for k in range(3))
        assert item["answer"] == tuple(training[3 * j + k]["answer"] for k in range(3))
        assert item["task"] == tuple(training[3 * j + k]["task"] for k in range(3))
        assert torch.equal(item["image"], training[3 * j]["image"])
    batch = next(iter(DataLoader(talk, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["answer"] == [talk[j]["answer"] for j in range(4)]
    with pytest.raises(DifflabError, match="turns 2 does not divide questions_per_scene 3"):
        dataclasses.replace(training.data, turns=2)
    with pytest.raises(IndexError, match=f"item {len(talk)} is out of range"):
        talk[len(talk)]


def test_a_scenes_questions_are_distinct_and_items_deterministic(training):
    again = VQAScenes(training.data)
    for i in range(0, training.data.n, 37):
        texts = [training[3 * i + k]["question"] for k in range(3)]
        questions = [t for t in texts if t]
        assert len(set(questions)) == len(questions), texts
        for k in range(3):
            a, b = training[3 * i + k], again[3 * i + k]
            assert torch.equal(a["image"], b["image"]) and {**a, "image": 0} == {**b, "image": 0}


def test_items_batch_with_text_as_lists_of_strings(training):
    batch = next(iter(DataLoader(training, batch_size=6)))
    assert batch["image"].shape == (6, 3, 64, 64)
    for key in ("task", "question", "answer", "kind"):
        assert len(batch[key]) == 6 and all(isinstance(t, str) for t in batch[key])
    with pytest.raises(IndexError):
        training.item(len(training))


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"heldout_pairs": ("purple circle",)}, "held-out pair 'purple circle' is invalid"),
     ({"caption_prob": 1.5}, "caption_prob 1.5 is"), ({"n": 0}, "n 0 is invalid"),
     ({"world": "scene99"}, "unknown world preset 'scene99'")],
)  # fmt: skip
def test_bad_config_is_a_one_line_error(fields, message):
    with pytest.raises(DifflabError, match=message) as err:
        VQADataConfig(**fields)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ evaluation


def _same(a, b) -> bool:
    return all(
        torch.equal(x.image, y.image)
        and (x.scene, x.question, x.answer, x.kind, x.heldout_pair)
        == (y.scene, y.question, y.answer, y.kind, y.heldout_pair)
        for x, y in zip(a, b, strict=True)
    )


def test_eval_sets_are_deterministic_by_seed():
    world = world_preset("scene32")
    for make in (vqa_cases, caption_cases, pope_cases):
        assert _same(make(world, 20, 3), make(world, 20, 3)), make.__name__
        assert not _same(make(world, 20, 3), make(world, 20, 4)), make.__name__


def test_eval_scenes_are_disjoint_from_training_scenes():
    """No evaluation scene is a scene of the training set - with the default seed, and even with a training
    seed equal to the evaluation stream's own (a two-word stream never equals a three-word one)."""
    world = world_preset("scene32")
    evaluated = {c.scene for make in (vqa_cases, caption_cases, pope_cases) for c in make(world, 200, 0)}
    for seed in (0, EVAL_SEED):
        data = VQAScenes(VQADataConfig(world="scene32", n=600, seed=seed))
        assert not evaluated & {data.scenes.scene(i) for i in range(data.data.n)}
        assert not evaluated & {scene_at(world, seed, i) for i in range(600)}  # before any redraw


def test_vqa_cases_are_balanced_true_and_flag_held_out_scenes():
    world = world_preset("scene64")
    cases = vqa_cases(world, 200, 0)
    assert Counter(c.kind for c in cases) == {k: 40 for k in QUESTION_KINDS}
    for c in cases:
        assert answer(parse_question(c.question), c.scene) == c.answer and c.question
        assert c.heldout_pair == mentions_heldout(c.scene, PAIRS)
        assert torch.equal(c.image, scene_image(c.scene, world))
    assert 20 < sum(c.heldout_pair for c in cases) < 180  # held-out scenes kept on purpose, and the rest
    assert {c.answer for c in cases if c.kind == "existence"} == {"yes", "no"}


def test_caption_cases_hold_the_full_description():
    cases = caption_cases("scene64", 30, 0)
    assert all(c.answer == describe(c.scene) and c.task == "caption" and c.question == "" for c in cases)


def test_pope_cases_are_balanced_in_the_training_form_and_true():
    """Half 'yes', half 'no'; each question is the world's own existence question about a (colour, shape)
    pair, and its answer is the world's."""
    world = world_preset("scene64")
    by_setting = {s: pope_cases(world, 120, 0, s) for s in POPE_SETTINGS}
    for setting, cases in by_setting.items():
        assert Counter(c.answer for c in cases) == {"yes": 60, "no": 60}
        for c in cases:
            q = parse_question(c.question)
            assert q.kind == "existence" and q.spec.fields() == {"color", "shape"}
            assert c.question == Question("existence", ObjectSpec(q.spec.shape, q.spec.color)).text()
            assert answer(q, c.scene) == c.answer and c.setting == setting
    # The settings share the scenes and the present objects, and differ in the absent ones.
    yes = {s: [(c.scene, c.question) for c in cases if c.answer == "yes"] for s, cases in by_setting.items()}
    assert yes["random"] == yes["popular"] == yes["adversarial"]
    no = {s: [c.question for c in cases if c.answer == "no"] for s, cases in by_setting.items()}
    assert no["random"] != no["adversarial"] and no["random"] != no["popular"]


def test_pope_negatives_follow_their_setting():
    """popular: never a held-out pair (never seen, so never frequent); adversarial: the absent pairs that
    share the most attributes with the shown objects - a present colour on a present shape where one is
    absent, else one attribute of a present object."""
    world = world_preset("scene64")
    popular = pope_cases(world, 200, 0, "popular")
    no = [parse_question(c.question).spec for c in popular if c.answer == "no"]
    assert not {(s.color, s.shape) for s in no} & PAIRS
    swaps = 0
    for c in pope_cases(world, 200, 0, "adversarial"):
        if c.answer == "no":
            spec = parse_question(c.question).spec
            colours, shapes = {o.color for o in c.scene.objects}, {o.shape for o in c.scene.objects}
            present = {(o.color, o.shape) for o in c.scene.objects}
            swap_possible = any((a, b) not in present for a in colours for b in shapes)
            shared = (spec.color in colours) + (spec.shape in shapes)
            assert shared == (2 if swap_possible else 1), (c.scene, c.question)
            swaps += shared == 2
    assert swaps > 20


@pytest.mark.parametrize(
    ("call", "message"),
    [(lambda: pope_cases("scene32", 7), "number of POPE probes 7 is odd"),
     (lambda: pope_cases("scene32", 8, setting="frequent"), "unknown POPE setting 'frequent'"),
     (lambda: vqa_cases("scene32", 0), "number of VQA cases 0 is invalid")],
)  # fmt: skip
def test_bad_eval_requests_are_one_line_errors(call, message):
    with pytest.raises(DifflabError, match=message):
        call()


def test_existence_swaps_make_the_training_negatives_attribute_swaps():
    """existence_swaps=1: every existence question answered 'no' asks a swapped pair of its scene (the
    adversarial POPE rule, :func:`swapped_pairs`), none a held-out pair; 0 (the default) keeps the random
    absent pairs, among which swaps are rare."""

    def negatives(swaps: float) -> list[tuple]:
        data = VQAScenes(VQADataConfig(world="scene32", n=300, questions_per_scene=4, existence_swaps=swaps))
        out = []
        for j in range(data.texts):
            question, answer_, kind = data.text(j)
            if kind == "existence" and answer_ == "no":
                scene = data.scenes.scene(j // 4)
                spec = parse_question(question).spec
                out.append(((spec.color, spec.shape), swapped_pairs(scene, data.world.colors, data.world.shapes)))
        return out

    swapped, plain = negatives(1.0), negatives(0.0)
    assert len(swapped) > 60 and len(plain) > 60
    assert all(pair in pairs and pair not in PAIRS for pair, pairs in swapped)
    assert sum(pair in pairs for pair, pairs in plain) < len(plain) / 4
    with pytest.raises(DifflabError, match="existence_swaps"):
        VQADataConfig(existence_swaps=1.5)
