"""The app's Ask tab (difflab.app.ask_tab), without a browser: its answers and captions are the library's own
(``vlm.answer`` and ``vlm.caption`` on the same image), its truths the world's (``language.answer``, the
evaluation's ``vqa_cases``), its caption judgement the evaluator's (``vlm_eval.score_captions`` on the one
case), and bad input becomes a one-line error naming the bad value."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.app import ask_tab
from difflab.app.status import error_html
from difflab.data.images import to_uint8
from difflab.data.vqa import _VQA_SET, EVAL_SEED, VQAItem, vqa_cases
from difflab.errors import DifflabError
from difflab.models import vlm, vlm_eval
from difflab.train.checkpoint import list_checkpoints
from difflab.world import language
from difflab.world.parse import parse_caption, parse_question
from difflab.world.scene import world_preset

pytestmark = pytest.mark.usefixtures("single_thread_module")

SEED = 2
"""The evaluation seed the tests draw scenes of (not the default, so that the seed is seen to be used)."""


@pytest.fixture(scope="module")
def vlm_run(tiny_vlm):
    """The session's vlm_tiny run (conftest): answers in the world's words; how often they are right is
    tests/test_vlm.py's business."""
    return str(tiny_vlm)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory, single_thread_module):
    """A class-conditional pixel run of the tiny world after 2 steps: not a vision-language run."""
    from difflab.config import apply_overrides
    from difflab.models import pixel
    from difflab.models.registry import get_preset

    cfg = apply_overrides(get_preset("tiny").build(), ["train.steps=2"])
    return str(pixel.train(cfg, tmp_path_factory.mktemp("ask_tab") / "pixel"))


@pytest.fixture(scope="module")
def direct(vlm_run):
    """The run loaded by the library itself, apart from the tab's cache."""
    return vlm.load_model(vlm_run)


def _answer(direct, image: torch.Tensor, question: str) -> str:
    model, cfg = direct
    with torch.no_grad():
        return vlm.answer(model, cfg, image[None], [question])[0]


def _index_of(vlm_run, scene) -> int:
    """The tab's scene index that draws ``scene`` of the evaluation's VQA set."""
    return next(i for i in range(100) if ask_tab.subject(vlm_run, seed=SEED, index=i).scene == scene)


# ------------------------------------------------------------------------------------------------ Ask


def test_ask_is_vlm_answer_beside_the_evaluations_truth(vlm_run, direct):
    """Each of the evaluation's first cases (one per kind), asked on the tab's scene of the same stream: the
    same image, the model's answer as vlm.answer gives it, the case's answer as the truth."""
    for case in vqa_cases("tiny", 5, SEED, heldout=()):
        index = _index_of(vlm_run, case.scene)
        view = ask_tab.ask(vlm_run, f"  {case.question} ", seed=SEED, index=index)
        assert torch.equal(view.subject.image, case.image)
        (one,) = view.answers
        assert one.question == case.question
        assert one.answer == _answer(direct, case.image, case.question)
        assert one.truth == case.answer == language.answer(parse_question(case.question), case.scene)
        assert one.right is (one.answer == case.answer)
        assert f"'{case.question}' about scene {index} of the evaluation's seed {SEED}" in view.summary
        mark = "✓" if one.right else "✗"
        assert f"<b>truth:</b> {case.answer} {mark}" in ask_tab.answer_html(view)
        # Suggest asks the scene the evaluation's own question of each kind it asks.
        asked = ask_tab.suggest(vlm_run, seed=SEED, index=index).answers
        assert case.question in [a.question for a in asked]


def test_a_question_without_a_truth_says_why(vlm_run, direct):
    shown = ask_tab.subject(vlm_run, seed=SEED, index=0)
    (obj,) = shown.scene.objects  # the tiny world draws one object
    absent = next(s for s in ("circle", "square") if s != obj.shape)
    cases = [
        (f"what colour is the {absent}?", "the question does not pick out one object in this scene"),
        ("how many circles", "not one of the world's questions, so there is no truth to check against"),
    ]
    for question, why in cases:
        (one,) = ask_tab.ask(vlm_run, question, seed=SEED, index=0).answers
        assert one.answer == _answer(direct, shown.image, question)
        assert (one.truth, one.right, one.why) == (None, None, why)
    (one,) = ask_tab.ask(vlm_run, f"how many {absent}s?", seed=SEED, index=0).answers
    assert one.truth == "0"  # a parsed question about an absent shape has an answer: none of them


def test_suggested_questions_are_the_worlds_one_per_kind(vlm_run, direct):
    world = world_preset("tiny")
    for index in range(3):
        view = ask_tab.suggest(vlm_run, seed=SEED, index=index)
        scene = view.subject.scene
        want = [qa for kind in language.QUESTION_KINDS
                for qa in language.questions(scene, np.random.default_rng([EVAL_SEED + SEED, index, _VQA_SET, 1]),
                                             1, world, kinds=(kind,))]  # fmt: skip
        assert [a.question for a in view.answers] == [qa.question for qa in want]
        assert (
            len({qa.kind for qa in want}) == len(want) >= 4
        )  # one per kind (position needs a unique object)
        for a, qa in zip(view.answers, want, strict=True):
            assert a.truth == qa.answer == language.answer(qa.struct, scene)
            assert a.answer == _answer(direct, view.subject.image, qa.question)
            assert a.right is (a.answer == a.truth)
        right = sum(a.right for a in view.answers)
        assert view.summary.endswith(f"{right} of {len(want)} right")
        table = ask_tab.table_html(view)
        assert table.count("<tr>") == len(want) + 1 and table.count("✓") == right
        assert table.count("✗") == len(want) - right


# -------------------------------------------------------------------------------------------- Caption


def test_a_caption_is_judged_as_the_evaluation_judges_it(vlm_run, direct):
    model, cfg = direct
    world = world_preset("tiny")
    for index in range(3):
        view = ask_tab.caption_image(vlm_run, seed=SEED, index=index)
        scene = view.subject.scene
        with torch.no_grad():
            text = vlm.caption(model, cfg, view.subject.image[None])[0]
        assert view.caption == text and view.truth == language.describe(scene)
        case = VQAItem(view.subject.image, scene, "", language.describe(scene), "caption", False)
        assert view.score == vlm_eval.score_captions([case], [text], world)
        parsed = parse_caption(text, world)
        assert view.claims == vlm_eval.caption_claims(parsed, scene)
        assert view.parsed is (parsed is not None) and len(view.invented) == view.claims["hallucinated"]
        shown = ask_tab.caption_html(view)
        assert f"<b>truth:</b> {view.truth}" in shown and f"({view.claims['hallucinated']} of" in shown


def test_the_true_description_is_all_right_and_an_absent_object_is_invented(vlm_run, monkeypatch):
    shown = ask_tab.subject(vlm_run, seed=SEED, index=1)
    (obj,) = shown.scene.objects
    other = next(c for c in ("red", "blue") if c != obj.color)
    for text, invented in (
        (language.describe(shown.scene), []),
        (f"a {other} {obj.shape}", [f"a {other} {obj.shape}"]),
    ):
        monkeypatch.setattr(vlm, "caption", lambda model, cfg, images, text=text: [text] * len(images))
        view = ask_tab.caption_image(vlm_run, seed=SEED, index=1)
        assert view.caption == text and view.invented == invented
        assert view.claims["hallucinated"] == len(invented) and view.claims["mentions"] == 1
        if not invented:  # the reference names every object with every attribute, all true
            assert all(h == n == 1 for h, n in view.claims["recall"].values())
            assert all(h == n for h, n in view.claims["precision"].values())


# ---------------------------------------------------------------------------------------------- uploads


def _png(path, image: torch.Tensor) -> str:
    Image.fromarray(to_uint8(image)).save(path)
    return str(path)


def test_an_uploaded_scene_is_answered_as_the_drawn_one_and_not_judged(vlm_run, tmp_path):
    drawn = ask_tab.subject(vlm_run, seed=SEED, index=4)
    path = _png(tmp_path / "scene.png", drawn.image)
    upload = {"source": "upload", "upload": path}
    shown = ask_tab.subject(vlm_run, **upload)
    assert torch.equal(shown.image, drawn.image) and shown.scene is None  # the world's images are 8-bit
    assert np.array_equal(shown.picture, drawn.picture) and shown.picture.shape == (192, 192, 3)
    question = "how many circles?"
    (one,) = ask_tab.ask(vlm_run, question, **upload).answers
    assert one.answer == ask_tab.ask(vlm_run, question, seed=SEED, index=4).answers[0].answer
    assert (one.truth, one.why) == (None, "an uploaded image has no scene to check against")
    view = ask_tab.caption_image(vlm_run, **upload)
    assert view.caption == ask_tab.caption_image(vlm_run, seed=SEED, index=4).caption
    assert (view.truth, view.score, view.invented) == (None, None, [])
    with pytest.raises(
        DifflabError, match="^suggested questions are the world's questions about a drawn scene"
    ):
        ask_tab.suggest(vlm_run, **upload)


# -------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_named(vlm_run, tmp_path):
    big = _png(tmp_path / "big.png", torch.zeros(3, 20, 20))
    cases = [
        ({"question": "  "}, "the question is empty; expected one in the world's words"),
        ({"question": None}, "the question is empty"),
        ({"question": "how many circels?"}, "unknown word 'circels' (did you mean 'circles'?)"),
        ({"seed": -1}, "scene seed -1 is invalid; expected an integer in [0, 2**63)"),
        ({"index": 1.5}, "scene index 1.5 is invalid; expected an integer"),
        ({"index": -2}, "scene index -2 is invalid; expected an integer"),
        ({"source": "upload", "upload": big}, f"image '{big}' is 20x20; expected 16x16"),
        ({"source": "upload"}, "no image is uploaded; expected a 16x16 PNG"),
        ({"source": "camera"}, "unknown image source 'camera'"),
    ]
    for kwargs, message in cases:
        args = {"question": "how many circles?"} | kwargs
        with pytest.raises(DifflabError) as err:
            ask_tab.ask(vlm_run, args.pop("question"), **args)
        assert str(err.value).startswith(message), str(err.value)
    for call in (ask_tab.suggest, ask_tab.caption_image):
        with pytest.raises(DifflabError, match=r"^scene index 1\.5 is invalid"):
            call(vlm_run, index=1.5)


def test_other_runs_are_refused_by_name(vlm_run, pixel_run, tmp_path):
    want = (f"'{pixel_run}' is a pixel run; the Ask tab takes a vision-language (vlm) run (difflab train --preset "
            "vlm_llava --set vision=CLIP_RUN --set lm=LM_RUN)")  # fmt: skip
    for call in (lambda r: ask_tab.ask(r, "how many circles?"), ask_tab.suggest, ask_tab.caption_image,
                 ask_tab.subject, ask_tab.load_vlm_run):  # fmt: skip
        with pytest.raises(DifflabError) as err:
            call(pixel_run)
        assert str(err.value) == want
    with pytest.raises(
        DifflabError, match="^no run is chosen; expected a vision-language \\(vlm\\) run directory"
    ):
        ask_tab.ask("", "how many circles?")
    with pytest.raises(DifflabError, match=f"^'{tmp_path}' is not a difflab run directory"):
        ask_tab.check_vlm_run(str(tmp_path))


def test_a_run_is_loaded_once_and_again_after_a_newer_checkpoint(vlm_run, tmp_path):
    run = shutil.copytree(vlm_run, tmp_path / "run")
    first = ask_tab.load_vlm_run(str(run))
    assert ask_tab.load_vlm_run(str(run))[0] is first[0]
    step, newest = list_checkpoints(run / "checkpoints")[-1]
    shutil.copytree(newest, newest.with_name(newest.name.replace(str(step), str(step + 1))))
    assert list_checkpoints(run / "checkpoints")[-1][0] == step + 1
    assert ask_tab.load_vlm_run(str(run))[0] is not first[0]


# ---------------------------------------------------------------------------------------------- layout


def test_build_lays_out_the_tab_and_shows_errors_in_its_status(vlm_run, pixel_run):
    import gradio as gr

    with gr.Blocks() as page:
        ask_tab.build(page, [pixel_run, vlm_run])
    ids = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    names = (
        "run",
        "status",
        "image",
        "question",
        "go",
        "answer",
        "suggest",
        "table",
        "caption-go",
        "caption",
    )
    assert {f"ask-{n}" for n in names} <= set(ids)
    assert [c[1] for c in ids["ask-run"].choices] == [vlm_run] and ids["ask-run"].value == vlm_run
    handlers = {f.fn.__name__: f.fn for f in page.fns.values()}
    assert {"on_image", "on_ask", "on_suggest", "on_caption"} <= set(handlers)
    image = ("scene", None, SEED, 3)
    status, picture = handlers["on_image"](vlm_run, *image)
    assert np.array_equal(picture, ask_tab.subject(vlm_run, seed=SEED, index=3).picture)
    status, answer, _ = handlers["on_ask"](vlm_run, "", *image)
    assert answer == "" and status == error_html(DifflabError(
        "the question is empty; expected one in the world's words, e.g. 'how many circles?' or 'what colour is "
        "the square?' (Suggest questions fills some in)"))  # fmt: skip
    status, answer, _ = handlers["on_ask"](pixel_run, "how many circles?", *image)
    assert "is a pixel run; the Ask tab takes" in status and 'class="difflab-error"' in status
    status, question, table, _ = handlers["on_suggest"](vlm_run, *image)
    view = ask_tab.suggest(vlm_run, seed=SEED, index=3)
    assert question == view.answers[0].question and table == ask_tab.table_html(view)
    status, caption, _ = handlers["on_caption"](vlm_run, *image)
    assert caption == ask_tab.caption_html(ask_tab.caption_image(vlm_run, seed=SEED, index=3))
