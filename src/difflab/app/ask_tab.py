"""The Ask tab: a vision-language run (LLaVA, Flamingo, BLIP-2 on the toy world) answers questions about an
image and describes it, as ``difflab ask`` and ``difflab caption`` do, judged by the world's own truth.

The image is a scene of the run's world - by default scene ``index`` of the evaluation's VQA set of ``seed``
(:func:`difflab.data.vqa.eval_scene`), scenes no training set draws, the ones ``difflab ask RUN --examples N
--seed SEED`` asks - or an uploaded PNG of the run's side. For a drawn scene:

- a question that is one of the world's (:func:`difflab.world.parse.parse_question`) gets its true answer
  (:func:`difflab.world.language.answer`), and the model's is marked by exact equality, as the CLI marks it;
- *Suggest questions* asks the world's own questions about the scene, one per kind
  (:func:`difflab.world.language.questions`, drawn from the stream :func:`difflab.data.vqa.vqa_cases` uses
  for that scene, so each is the question the evaluation asks of it where it asks that kind);
- a caption is parsed back into what it asserts and judged as ``difflab eval`` judges captions
  (:func:`difflab.models.vlm_eval.caption_claims`, :func:`~difflab.models.vlm_eval.score_captions` on the
  one case), beside the scene's true description.

An uploaded image has no scene behind it: it is answered and captioned, not judged.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.app.pictures import enlarge
from difflab.app.status import error_html, note_html
from difflab.data.images import to_uint8
from difflab.data.toy import scene_image

# The VQA set's stream number is private to data.vqa; importing it (not restating 1) keeps one place for it.
from difflab.data.vqa import VQAItem, vqa_question_rng, vqa_scene
from difflab.errors import MAX_COUNT, DifflabError, check_choice, check_int, check_seed
from difflab.models import vlm, vlm_eval
from difflab.models.inversion import read_image
from difflab.models.registry import family_of_run
from difflab.train.checkpoint import list_checkpoints
from difflab.world import language
from difflab.world.geneval import mentions_heldout
from difflab.world.parse import parse_caption, parse_question
from difflab.world.prompts import matches
from difflab.world.scene import Scene, WorldConfig

SOURCES = ("scene", "upload")
"""Where the image comes from: a scene of the run's world, or an uploaded PNG."""
SCENE_SEED = 0
"""The default seed of the drawn scenes: the evaluation's (``difflab ask --examples N`` and ``difflab eval``)."""
HINT = "difflab train --preset vlm_llava --set vision=CLIP_RUN --set lm=LM_RUN"


# ------------------------------------------------------------------------------------------ the run


def check_vlm_run(run_dir: str) -> None:
    """A named error unless ``run_dir`` is a vision-language run directory (read from its config.json)."""
    if not str(run_dir or "").strip():
        raise DifflabError(f"no run is chosen; expected a vision-language (vlm) run directory ({HINT})")
    family = family_of_run(run_dir).name  # 'not a difflab run directory' for anything else
    if family != "vlm":
        raise DifflabError(
            f"'{run_dir}' is a {family} run; the Ask tab takes a vision-language (vlm) run ({HINT})"
        )


_loaded: dict[str, tuple[tuple, object, vlm.VLMConfig]] = {}
_loading = threading.Lock()


def load_vlm_run(run_dir: str):
    """``(model, record)`` of a vlm run, loaded once and kept while its newest checkpoint stays the same (a run
    still training is reloaded when it writes a newer one). Greedy decoding changes nothing in the model, so
    presses share it without a lock."""
    check_vlm_run(run_dir)
    key = tuple(str(p) for _, p in list_checkpoints(Path(run_dir) / "checkpoints")[-1:])
    path = str(Path(run_dir).resolve())
    with _loading:
        if path not in _loaded or _loaded[path][0] != key:
            model, cfg = vlm.load_model(run_dir, device="cpu")
            _loaded[path] = (key, model, cfg)
        return _loaded[path][1:]


# ---------------------------------------------------------------------------------------- the image


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no truth value to compare by
class Subject:
    """The image a press is about."""

    image: torch.Tensor
    """(3, S, S) in [-1, 1]."""
    scene: Scene | None
    """The drawn scene (None for an upload: then nothing is judged)."""
    world: WorldConfig
    where: str
    """The image in words: 'scene 3 of the evaluation's seed 0' or the uploaded file's name."""
    seed: int = SCENE_SEED
    index: int = 0

    @property
    def picture(self) -> np.ndarray:
        """The image as the page shows it: each pixel a block."""
        return enlarge(to_uint8(self.image))


def subject(run_dir: str, *, source: str = "scene", upload=None, seed=SCENE_SEED, index=0) -> Subject:
    """Scene ``index`` of the evaluation's VQA set of ``seed`` in the run's world (``source`` 'scene'), or the
    PNG file ``upload`` (``source`` 'upload'), read at the run's side. Loads no model."""
    check_vlm_run(run_dir)
    source = check_choice("image source", source, SOURCES)
    data = vlm.load_config(run_dir).data
    world = data.world_config()
    if source == "upload":
        if not upload:
            side = world.resolution
            raise DifflabError(f"no image is uploaded; expected a {side}x{side} PNG ('difflab world condition "
                               "--field image' writes one), or a scene of the world")  # fmt: skip
        # The page's uploads live under long temporary paths: the file's name is enough to say which.
        return Subject(read_image(upload, world.resolution)[0], None, world, f"'{Path(str(upload)).name}'")
    seed = check_seed("scene seed", seed)
    index = check_int("scene index", index, 0, MAX_COUNT)
    scene = vqa_scene(world, seed, index)
    held = " (it shows a held-out pair)" if mentions_heldout(scene, data.pairs()) else ""
    where = f"scene {index} of the evaluation's seed {seed}{held}"
    return Subject(scene_image(scene, world), scene, world, where, seed, index)


# ------------------------------------------------------------------------------------------ questions


@dataclass(frozen=True)
class Answer:
    """One question put to the model, and the world's answer where there is one."""

    question: str
    answer: str
    """The model's greedy answer (:func:`difflab.models.vlm.answer`)."""
    truth: str | None
    """:func:`difflab.world.language.answer` on the drawn scene; None for an upload, a question that is not
    the world's, or one that does not pick out one object in this scene."""
    why: str = ""
    """Why there is no truth ('' when there is)."""

    @property
    def right(self) -> bool | None:
        """Exact equality with the truth, as ``difflab ask --examples`` marks it; None without a truth."""
        return None if self.truth is None else self.answer == self.truth


def truth_of(question: str, scene: Scene | None) -> tuple[str | None, str]:
    """The world's answer to ``question`` in ``scene`` and, when there is none, why."""
    if scene is None:
        return None, "an uploaded image has no scene to check against"
    parsed = parse_question(question)
    if parsed is None:
        return None, "not one of the world's questions, so there is no truth to check against"
    truth = language.answer(parsed, scene)
    return truth, "" if truth is not None else "the question does not pick out one object in this scene"


@dataclass(frozen=True, eq=False)
class AskView:
    """What one press of Ask or Suggest questions drew."""

    subject: Subject
    answers: list[Answer]
    summary: str


def _answer_all(run_dir: str, shown: Subject, asked: list[str]) -> tuple[list[str], float]:
    model, cfg = load_vlm_run(run_dir)
    start = time.perf_counter()
    with torch.no_grad():
        # One image per question, as the evaluation batches them; the tokenizer names an unknown word.
        got = vlm.answer(model, cfg, shown.image.expand(len(asked), -1, -1, -1), asked)
    return got, time.perf_counter() - start


def ask(run_dir: str, question: str, **image) -> AskView:
    """The model's answer to ``question`` about the image :func:`subject` picks with ``image``, beside the
    world's answer for a drawn scene."""
    check_vlm_run(run_dir)
    question = question.strip() if isinstance(question, str) else ""
    if not question:
        raise DifflabError("the question is empty; expected one in the world's words, e.g. 'how many circles?' "
                           "or 'what colour is the square?' (Suggest questions fills some in)")  # fmt: skip
    shown = subject(run_dir, **image)
    (said,), seconds = _answer_all(run_dir, shown, [question])
    one = Answer(question, said, *truth_of(question, shown.scene))
    judged = one.why if one.truth is None else f"truth '{one.truth}' {_mark(one.right)}"
    summary = f"'{question}' about {shown.where} with {run_dir} in {seconds:.2f} s: '{said}' ({judged})"
    return AskView(shown, [one], summary)


def world_questions(shown: Subject) -> list[language.QA]:
    """The world's questions about the drawn scene, one per kind it can be asked: kind k drawn from the random
    stream :func:`~difflab.data.vqa.vqa_cases` uses for this scene, so it is the evaluation's own question
    wherever the evaluation asks this scene that kind."""
    asked = []
    for kind in language.QUESTION_KINDS:
        rng = vqa_question_rng(shown.seed, shown.index)
        asked += language.questions(shown.scene, rng, 1, shown.world, kinds=(kind,))  # [] when not askable
    return asked


def suggest(run_dir: str, **image) -> AskView:
    """The world's questions about the drawn scene (:func:`world_questions`), answered by the model at once."""
    shown = subject(run_dir, **image)
    if shown.scene is None:
        raise DifflabError("suggested questions are the world's questions about a drawn scene; an uploaded image "
                           "has none - choose a scene of the world, or type a question")  # fmt: skip
    asked = world_questions(shown)
    said, seconds = _answer_all(run_dir, shown, [qa.question for qa in asked])
    answers = [Answer(qa.question, a, qa.answer) for qa, a in zip(asked, said, strict=True)]
    right = sum(a.right for a in answers)
    summary = (f"{len(answers)} of the world's questions about {shown.where} with {run_dir} in {seconds:.2f} s: "
               f"{right} of {len(answers)} right")  # fmt: skip
    return AskView(shown, answers, summary)


def _mark(right: bool | None) -> str:
    return "" if right is None else "✓" if right else "✗"


def answer_html(view: AskView) -> str:
    """The one answer of Ask: the model's, and the truth with its mark or why there is none."""
    a = view.answers[0]
    truth = (f"<b>truth:</b> {html.escape(a.truth)} {_mark(a.right)}" if a.truth is not None
             else f'<span class="difflab-note">{html.escape(a.why)}</span>')  # fmt: skip
    return f"<p><b>model:</b> {html.escape(a.answer) or '(nothing)'} &nbsp; {truth}</p>"


def table_html(view: AskView) -> str:
    """Suggested questions as a table: question | model | truth | mark."""
    rows = "".join(f"<tr><td>{html.escape(a.question)}</td><td>{html.escape(a.answer)}</td>"
                   f"<td>{html.escape(a.truth or '')}</td><td>{_mark(a.right)}</td></tr>"
                   for a in view.answers)  # fmt: skip
    return ('<table class="difflab-readings"><thead><tr><th>question</th><th>model</th><th>truth</th><th></th>'
            f"</tr></thead><tbody>{rows}</tbody></table>")  # fmt: skip


# ---------------------------------------------------------------------------------------------- captions


@dataclass(frozen=True, eq=False)
class CaptionView:
    """What one press of Caption drew."""

    subject: Subject
    caption: str
    """The model's greedy caption (:func:`difflab.models.vlm.caption`)."""
    truth: str | None
    """The drawn scene's full description (:func:`difflab.world.language.describe`), the evaluation's
    reference; None for an upload."""
    claims: dict | None
    """:func:`~difflab.models.vlm_eval.caption_claims` of the caption on the scene (integer counts)."""
    score: dict | None
    """:func:`~difflab.models.vlm_eval.score_captions` on the one case: the same counts as shares."""
    invented: list[str]
    """The mentions that match no object in the scene (CHAIR's hallucinations), as the caption words them."""
    parsed: bool | None
    """Whether the caption is one the world can read back (None for an upload)."""
    summary: str


def caption_image(run_dir: str, **image) -> CaptionView:
    """The model's caption of the image :func:`subject` picks with ``image`` and, for a drawn scene, its judgement."""
    shown = subject(run_dir, **image)
    model, cfg = load_vlm_run(run_dir)
    start = time.perf_counter()
    with torch.no_grad():
        text = vlm.caption(model, cfg, shown.image[None])[0]
    seconds = time.perf_counter() - start
    said = f"caption of {shown.where} with {run_dir} in {seconds:.2f} s"
    if shown.scene is None:
        return CaptionView(
            shown, text, None, None, None, [], None, f"{said}; an uploaded image is not judged"
        )
    truth = language.describe(shown.scene)
    # The case as caption_cases makes one: its scene and image, the full description as reference.
    case = VQAItem(
        shown.image, shown.scene, "", truth, "caption", mentions_heldout(shown.scene, cfg.data.pairs())
    )
    parsed = parse_caption(text, shown.world)
    claims = vlm_eval.caption_claims(parsed, shown.scene)
    score = vlm_eval.score_captions([case], [text], shown.world)
    # caption_claims counts the hallucinated mentions; the page also names them.
    invented = [] if parsed is None else [
        spec.noun("a") for spec in parsed.objects if not any(matches(spec, o) for o in shown.scene.objects)
    ]  # fmt: skip
    judged = ("the world cannot read it back, so it asserts nothing" if parsed is None
              else f"{claims['hallucinated']} of {claims['mentions']} mention(s) invented")  # fmt: skip
    return CaptionView(shown, text, truth, claims, score, invented, parsed is not None, f"{said}: {judged}")


def caption_html(view: CaptionView) -> str:
    """The caption beside the truth, then what it gets right per attribute and what it invents."""
    lines = [f"<p><b>model:</b> {html.escape(view.caption) or '(nothing)'}</p>"]
    if view.truth is None:
        return lines[0]
    lines.append(f"<p><b>truth:</b> {html.escape(view.truth)}</p>")
    if not view.parsed:
        lines.append('<p class="difflab-note">not a text the world can read back: it asserts nothing, and names '
                     "none of the scene's objects</p>")  # fmt: skip
    rows = "".join(f"<tr><td>{a}</td><td>{_ratio(view.claims['precision'][a])}</td>"
                   f"<td>{_ratio(view.claims['recall'][a])}</td></tr>"
                   for a in vlm_eval.CAPTION_ATTRIBUTES)  # fmt: skip
    lines.append('<table class="difflab-readings"><thead><tr><th>attribute</th><th>true of what it says '
                 "(precision)</th><th>objects it names (recall)</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table>")  # fmt: skip
    invented = ", ".join(html.escape(m) for m in view.invented) or "nothing"
    lines.append(f"<p><b>invents:</b> {invented} ({view.claims['hallucinated']} of {view.claims['mentions']} "
                 "mention(s), CHAIR_i)</p>")  # fmt: skip
    return "".join(lines)


def _ratio(counts: list[int]) -> str:
    hits, n = counts
    return f"{hits}/{n}" if n else "-"


# ---------------------------------------------------------------------------------------------- layout

HELP = (
    "A **vision-language** run answers a question about the image greedily, in the world's words ('how many "
    "circles?', 'what colour is the square?', 'is there a red circle?', 'where is the triangle?'), as `difflab "
    "ask RUN QUESTION --image FILE`. On a drawn scene (the evaluation's, unseen in training), the world's own "
    "questions get their true answers; *Caption* is judged as `difflab eval` judges captions."
)


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page``; ``runs`` are the command line's RUNs."""
    import gradio as gr

    vlm_runs = [r for r in runs if _is_vlm(r)]
    first = (vlm_runs or [None])[0]
    gr.Markdown(HELP)
    with gr.Row():
        run = gr.Dropdown(vlm_runs or runs, value=first, label="vision-language run", allow_custom_value=True,
                          scale=2, elem_id="ask-run")  # fmt: skip
        source = gr.Radio([("a scene of the world", "scene"), ("an uploaded image", "upload")], value="scene",
                          label="image", elem_id="ask-source")  # fmt: skip
        seed = gr.Number(SCENE_SEED, precision=0, label="scene seed", info="the evaluation's held-out scenes",
                         elem_id="ask-seed")  # fmt: skip
        index = gr.Number(0, precision=0, label="scene index", elem_id="ask-index")
        upload = gr.Image(type="filepath", image_mode=None, sources=["upload"], label="image (PNG, the run's "
                          "side)", height=120, elem_id="ask-upload", elem_classes="difflab-pixels")  # fmt: skip
    status = gr.HTML(elem_id="ask-status")
    with gr.Row():
        picture = gr.Image(label="the image", format="png", height=300, scale=1, elem_id="ask-image",
                           elem_classes="difflab-pixels")  # fmt: skip
        with gr.Column(scale=2):
            with gr.Row():
                question = gr.Textbox(label="question", placeholder="how many circles?", scale=3,
                                      elem_id="ask-question")  # fmt: skip
                go = gr.Button("Ask", variant="primary", elem_id="ask-go")
                more = gr.Button("Suggest questions", elem_id="ask-suggest")
            answer = gr.HTML(elem_id="ask-answer")
            table = gr.HTML(elem_id="ask-table")
            describe = gr.Button("Caption", elem_id="ask-caption-go")
            caption = gr.HTML(elem_id="ask-caption")
    image = [source, upload, seed, index]

    def settings(source, upload, seed, index) -> dict:
        return {"source": source, "upload": upload, "seed": seed, "index": index}

    def on_image(run_dir, *chosen):
        """The chosen image, shown before anything is asked."""
        if chosen[0] == "upload" and not chosen[1]:
            return note_html("upload a PNG of the run's side"), None  # not yet an error: nothing is asked
        try:
            shown = subject(run_dir, **settings(*chosen))
        except DifflabError as err:
            return error_html(err), None
        return note_html(f"{shown.where} of {run_dir}"), shown.picture

    def on_ask(run_dir, text, *chosen):
        try:
            view = ask(run_dir, text, **settings(*chosen))
        except DifflabError as err:
            return error_html(err), "", gr.skip()
        return note_html(view.summary), answer_html(view), view.subject.picture

    def on_suggest(run_dir, *chosen):
        try:
            view = suggest(run_dir, **settings(*chosen))
        except DifflabError as err:
            return error_html(err), gr.skip(), "", gr.skip()
        first_question = view.answers[0].question if view.answers else gr.skip()
        return note_html(view.summary), first_question, table_html(view), view.subject.picture

    def on_caption(run_dir, *chosen):
        try:
            view = caption_image(run_dir, **settings(*chosen))
        except DifflabError as err:
            return error_html(err), "", gr.skip()
        return note_html(view.summary), caption_html(view), view.subject.picture

    run.change(on_image, [run, *image], [status, picture])
    if first is not None:
        page.load(on_image, [run, *image], [status, picture])
    for changed in image:
        changed.change(on_image, [run, *image], [status, picture])
    go.click(on_ask, [run, question, *image], [status, answer, picture])
    question.submit(on_ask, [run, question, *image], [status, answer, picture])
    more.click(on_suggest, [run, *image], [status, question, table, picture])
    describe.click(on_caption, [run, *image], [status, caption, picture])


def _is_vlm(run_dir: str) -> bool:
    try:
        check_vlm_run(run_dir)
    except DifflabError:
        return False
    return True
