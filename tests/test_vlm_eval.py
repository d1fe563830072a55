"""The VLM judge (difflab.models.vlm_eval), tested with oracles and constant answerers whose scores are known
in closed form: no model is needed, since the judge takes callables."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from difflab.data.vqa import POPE_SETTINGS, caption_cases, pope_cases, vqa_cases
from difflab.errors import DifflabError
from difflab.models.vlm_eval import (
    CAPTION_ATTRIBUTES,
    caption_claims,
    evaluate_vlm,
    pope_answer,
    score_captions,
    score_pope,
    score_vqa,
)
from difflab.world.language import (
    CAPTION_STYLES,
    QUESTION_KINDS,
    answer,
    caption,
    describe,
    short_caption,
    short_forms,
)
from difflab.world.parse import parse_caption, parse_question
from difflab.world.prompts import Conjunction, ObjectSpec
from difflab.world.scene import Obj, Scene, world_preset

WORLD = world_preset("scene64")
N = 60


def _oracle(seed: int = 0):
    """Callables that read the true scene of each image (looked up by its bytes among the cases, built here
    independently of the judge) and answer as the world does (language.answer, language.describe)."""
    cases = vqa_cases(WORLD, N, seed) + caption_cases(WORLD, N, seed)
    cases += [c for s in POPE_SETTINGS for c in pope_cases(WORLD, N, seed, s)]
    scenes = {c.image.numpy().tobytes(): c.scene for c in cases}

    def answer_fn(images, questions):
        return [
            answer(parse_question(q), scenes[im.numpy().tobytes()])
            for im, q in zip(images, questions, strict=True)
        ]

    def caption_fn(images):
        return [describe(scenes[im.numpy().tobytes()]) for im in images]

    return answer_fn, caption_fn


def test_an_oracle_scores_one_everywhere():
    """An answerer and a captioner that know the true scene: every accuracy, precision, recall and F1 is 1,
    nothing is hallucinated, and POPE's yes-ratio is its balance, 0.5. The report is JSON."""
    report = evaluate_vlm(*_oracle(), WORLD, N, 0, batch_size=16)
    json.dumps(report)
    vqa = report["vqa"]
    assert vqa["overall"]["accuracy"] == 1.0 and vqa["overall"]["n"] == N
    assert all(vqa["kinds"][k] == {"accuracy": 1.0, "n": N // 5, "se": 0.0} for k in QUESTION_KINDS)
    assert (
        vqa["seen"]["accuracy"] == vqa["heldout_pairs"]["accuracy"] == 1.0 and vqa["heldout_pairs"]["n"] > 0
    )
    captions = report["captions"]
    assert captions["parsed"]["rate"] == 1.0 and captions["hallucination"]["rate"] == 0.0
    for a in CAPTION_ATTRIBUTES:
        assert captions["attributes"][a]["recall"]["value"] == 1.0
        assert captions["attributes"][a]["precision"]["value"] in (1.0, None)  # None: no count claims
    for setting in POPE_SETTINGS:
        pope = report["pope"][setting]
        assert pope["n"] == N and pope["accuracy"] == pope["precision"] == pope["recall"] == pope["f1"] == 1.0
        assert pope["yes_ratio"] == 0.5


def test_batching_does_not_change_the_report():
    assert evaluate_vlm(*_oracle(), WORLD, N, 0, batch_size=7) == evaluate_vlm(
        *_oracle(), WORLD, N, 0, batch_size=64
    )


def test_a_constant_yes_answerer_scores_popes_closed_form():
    """Balanced probes, always 'yes': TP = FP = n/2, FN = TN = 0, so accuracy = precision = 1/2, recall = 1,
    F1 = 2/3 and yes-ratio = 1 (Li et al. 2023 report exactly this failure for some VLMs)."""
    cases = [c for s in POPE_SETTINGS for c in pope_cases(WORLD, N, 1, s)]
    scores = score_pope(cases, ["Yes"] * len(cases))
    for setting in POPE_SETTINGS:
        s = scores[setting]
        assert (s["accuracy"], s["precision"], s["recall"], s["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
        assert s["f1"] == pytest.approx(2 / 3) and s["se"] == pytest.approx(math.sqrt(0.25 / N))
    never = score_pope(cases, ["no"] * len(cases))["random"]
    assert (never["accuracy"], never["precision"], never["recall"], never["f1"], never["yes_ratio"]) == (
        0.5, None, 0.0, 0.0, 0.0)  # fmt: skip


def test_pope_reads_answers_as_popes_own_scoring_does():
    assert [pope_answer(a) for a in ("yes", "Yes, there is.", "No, there is not.", "there is not", "", "2")] == [
        "yes", "yes", "no", "no", "yes", "yes"]  # fmt: skip


@pytest.mark.parametrize("constant", ["yes", "no", "1", "red", "circle"])
def test_a_constant_vqa_answer_scores_its_frequency_in_the_cases(constant):
    """Source: a count of the cases' answers, made here apart from the judge."""
    cases = vqa_cases(WORLD, 150, 2)
    report = score_vqa(cases, [constant.upper() + "."] * len(cases))  # case and a full stop do not matter

    def freq(keep):
        chosen = [c.answer for c in cases if keep(c)]
        return Counter(chosen)[constant] / len(chosen)

    assert report["overall"]["accuracy"] == freq(lambda c: True)
    assert report["seen"]["accuracy"] == freq(lambda c: not c.heldout_pair)
    assert report["heldout_pairs"]["accuracy"] == freq(lambda c: c.heldout_pair)
    for k in QUESTION_KINDS:
        assert report["kinds"][k]["accuracy"] == freq(lambda c, k=k: c.kind == k)
    p = report["overall"]["accuracy"]
    assert report["overall"]["se"] == pytest.approx(math.sqrt(p * (1 - p) / len(cases)))


def test_the_true_description_has_precision_and_recall_one_and_no_hallucination():
    cases = caption_cases(WORLD, N, 3)
    report = score_captions(cases, [describe(c.scene) for c in cases], WORLD)
    assert report["parsed"]["rate"] == 1.0 and report["hallucination"]["rate"] == 0.0
    for a in ("shape", "color", "size", "position"):
        assert report["attributes"][a]["precision"]["value"] == 1.0
    for a in CAPTION_ATTRIBUTES:
        assert report["attributes"][a]["recall"]["value"] == 1.0
    assert report["attributes"]["count"]["precision"]["n"] == 0  # a description says no number


def test_every_caption_the_world_writes_is_precise_and_hallucination_free():
    """Every style's claims are true of the scene (count claims and relations included), so precision is 1
    wherever there are claims, and no mention is hallucinated; recall is what each style names."""
    cases = caption_cases(WORLD, N, 4)
    texts, kept = [], []
    for i, c in enumerate(cases):
        rng = np.random.default_rng(i)
        styles = [s for s in CAPTION_STYLES if len(c.scene.objects) > 1 or s not in ("relation", "pair")]
        texts += [caption(c.scene, rng, s)[0] for s in styles] + [
            short_caption(c.scene, rng, f)[0] for f in short_forms(c.scene)
        ]
        kept += [c] * (len(texts) - len(kept))
    report = score_captions(kept, texts, WORLD)
    assert report["parsed"]["rate"] == 1.0 and report["hallucination"]["rate"] == 0.0
    for a in CAPTION_ATTRIBUTES:
        assert (
            report["attributes"][a]["precision"]["value"] == 1.0
            and report["attributes"][a]["precision"]["n"] > 0
        )
        assert 0 < report["attributes"][a]["recall"]["value"] < 1


def test_naming_an_absent_object_raises_hallucination_by_its_share():
    """CHAIR_i counts mentions: M objects described truly plus one absent object is 1 hallucination in M + 1
    mentions; CHAIR_s is one caption of n. The absent object is also the one false shape and colour claim."""
    cases = caption_cases(WORLD, N, 5)
    scene = cases[0].scene
    absent = next(ObjectSpec(s, c) for s in WORLD.shapes for c in WORLD.colors
                  if not any((o.shape, o.color) == (s, c) for o in scene.objects))  # fmt: skip
    texts = [describe(c.scene) for c in cases]
    parts = parse_caption(texts[0], WORLD).objects
    texts[0] = Conjunction((*parts, absent)).text()
    report = score_captions(cases, texts, WORLD)
    mentions = sum(len(c.scene.objects) for c in cases)
    assert report["hallucination"]["rate"] == pytest.approx(1 / (mentions + 1))
    assert report["hallucination"]["n"] == mentions + 1
    assert report["hallucinated_captions"]["rate"] == pytest.approx(1 / N)
    for a in ("shape", "color"):
        assert report["attributes"][a]["precision"]["value"] == pytest.approx(mentions / (mentions + 1))
        assert report["attributes"][a]["recall"]["value"] == 1.0


def test_an_unparsable_caption_is_a_failure():
    """It parses to nothing: the parse rate drops by 1/n and its scene's objects go unnamed in recall."""
    cases = caption_cases(WORLD, N, 6)
    texts = [describe(c.scene) for c in cases]
    texts[0] = "a a red red <unk>"
    report = score_captions(cases, texts, WORLD)
    objects = sum(len(c.scene.objects) for c in cases)
    assert report["parsed"]["rate"] == pytest.approx((N - 1) / N)
    missed = len(cases[0].scene.objects)
    for a in CAPTION_ATTRIBUTES:
        assert report["attributes"][a]["recall"]["value"] == pytest.approx((objects - missed) / objects)
    assert report["attributes"]["shape"]["precision"]["value"] == 1.0


def test_one_captions_claims_by_hand():
    """Two circles (red top left, blue top right) and a green square (bottom left)."""
    scene = Scene((Obj("circle", "red", "small", 0.15, 0.15), Obj("circle", "blue", "large", 0.85, 0.15),
                   Obj("square", "green", "small", 0.15, 0.85)))  # fmt: skip

    def claims(text):
        return caption_claims(parse_caption(text, WORLD), scene)

    three = claims("three circles")  # two exist: one instance left over, the number wrong, 'circle' real
    assert three["precision"]["shape"] == [2, 3] and three["precision"]["count"] == [0, 1]
    assert three["recall"]["count"] == [2, 3] and three["recall"]["color"] == [0, 3]
    assert (three["mentions"], three["hallucinated"]) == (1, 0)
    rel = claims("a red circle to the right of a green square")  # both exist; the relation is false
    assert rel["precision"]["position"] == [0, 1] and rel["precision"]["color"] == [2, 2]
    assert rel["hallucinated"] == 0
    swap = claims("a blue circle at the top left")  # the red circle's place, the blue circle's colour
    assert swap["hallucinated"] == 1 and swap["recall"]["count"] == [0, 3]
    assert swap["precision"]["shape"] == [1, 1]
    assert sum(swap["precision"][a][0] for a in ("color", "position")) == 1  # one of the two is true of it


def test_mismatched_outputs_are_one_line_errors():
    cases = vqa_cases(WORLD, 5, 0)
    with pytest.raises(DifflabError, match="got 4 answers for 5 cases"):
        score_vqa(cases, ["yes"] * 4)
    with pytest.raises(DifflabError, match="outputs of one batch"):
        evaluate_vlm(lambda images, qs: ["yes"], lambda images: ["a circle"] * len(images), WORLD, 5)
