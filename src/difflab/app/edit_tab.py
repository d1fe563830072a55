"""The Edit tab: the two image editors of the library, each judged by the world's reader, chosen by the run.

- an InstructPix2Pix run (Brooks, Holynski & Efros 2023; ``difflab edit``) edits a scene of its world or an
  uploaded image as a written instruction says, with two-scale guidance (their Eq. 3: s_I towards the input,
  s_T towards the instruction). A drawn scene comes with the edit the world draws for it
  (:func:`difflab.world.edits.edit_at`, as the evaluation's cases are made) and the scene that edit asks for;
  while the instruction is that edit's, every output gets the evaluator's exact verdict
  (:func:`difflab.models.instruct_eval.judge`: edit success, preservation, background PSNR);
- a text-to-image run is edited by Prompt-to-Prompt (Hertz et al. 2022; ``difflab p2p``): source | edit |
  the target prompt regenerated from the same noise, each with the reader's verdict on its prompt
  (:mod:`difflab.app.verdict`). With ``tau`` = 1 and the target the source, the edit is the source exactly.
  An uploaded image is first inverted under the source prompt (null-text inversion, Mokady et al. 2023;
  ``difflab p2p RUN SOURCE TARGET --image FILE``).
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.app.pictures import enlarge, rgb
from difflab.app.status import error_html, note_html
from difflab.app.verdict import Verdict, judge, normalized
from difflab.data.images import to_uint8
from difflab.data.toy import scene_image
from difflab.errors import MAX_COUNT, DifflabError, check_float, check_int, check_seed
from difflab.models import instruct, instruct_eval, inversion, t2i
from difflab.models.conditioners import Instructions
from difflab.models.p2p import P2PEdit, naive, prompt_to_prompt
from difflab.models.p2p_eval import psnr
from difflab.models.recipe import GUIDANCE_RANGE
from difflab.models.registry import family_of_run
from difflab.train.checkpoint import list_checkpoints
from difflab.world.edits import edit_at
from difflab.world.geneval import mentions_heldout
from difflab.world.language import describe
from difflab.world.reader import read
from difflab.world.scene import scene_at

EDITORS = {"instruct": ("InstructPix2Pix", "an InstructPix2Pix run"),
           "t2i": ("Prompt-to-Prompt", "a text-to-image run")}  # fmt: skip
"""The run families the tab edits with: the editor each one gets, and what such a run is called."""
MAX_EDITS = 4
"""Most edits (InstructPix2Pix) or rows (Prompt-to-Prompt) one press draws: a look, not an evaluation
(``difflab edit RUN --eval N`` and ``difflab p2p RUN --eval N`` judge hundreds)."""
SCENE_SEED = instruct_eval.EVAL_SEED
"""The default seed of the scenes to edit: the evaluation's, scenes the editor never trained on."""
INPUTS = ("a scene of the world", "an uploaded image")


# ------------------------------------------------------------------------------------------ the runs


def editor_of(run_dir: str) -> str:
    """The family of ``run_dir`` if the tab edits with it ('instruct' or 't2i'); a named error otherwise."""
    if not str(run_dir or "").strip():
        raise DifflabError("no run is chosen; expected an InstructPix2Pix run (difflab train --preset "
                           "instruct_demo --set base=RUN) or a text-to-image run (difflab demo)")  # fmt: skip
    family = family_of_run(run_dir).name  # 'not a difflab run directory' for anything else
    if family not in EDITORS:
        raise DifflabError(f"'{run_dir}' is a {family} run; the Edit tab takes an InstructPix2Pix run (difflab "
                           "train --preset instruct_demo --set base=RUN) or a text-to-image run "
                           "(Prompt-to-Prompt)")  # fmt: skip
    return family


def _require(run_dir: str, family: str) -> None:
    found = editor_of(run_dir)
    if found != family:
        raise DifflabError(f"'{run_dir}' is {EDITORS[found][1]}; {EDITORS[family][0]} takes {EDITORS[family][1]} "
                           f"(this run is edited by {EDITORS[found][0]})")  # fmt: skip


_loaded: dict[str, tuple[tuple, object, object, threading.Lock]] = {}
_loading = threading.Lock()


def load_editor(run_dir: str, family: str):
    """``(system, record, lock)`` of an editing run of ``family``, loaded once and kept while its newest
    checkpoint stays the same. Hold ``lock`` while editing: Prompt-to-Prompt hooks the model's attention
    layers in place, so two presses at once on one model would each run under the other's hooks. The model
    is the tab's own (not the Generate tab's) for the same reason."""
    _require(run_dir, family)
    key = tuple(str(p) for _, p in list_checkpoints(Path(run_dir) / "checkpoints")[-1:])
    path = str(Path(run_dir).resolve())
    with _loading:
        if path not in _loaded or _loaded[path][0] != key:
            load = instruct.load_model if family == "instruct" else t2i.load_model
            system, cfg = load(run_dir, device="cpu")
            _loaded[path] = (key, system, cfg, threading.Lock())
        return _loaded[path][1:]


def run_settings(run_dir: str) -> tuple[str, float | None, float | None]:
    """The run's editor and, for InstructPix2Pix, its own s_I and s_T (its config.json), without loading it."""
    family = editor_of(run_dir)
    if family != "instruct":
        return family, None, None
    cfg = instruct.load_config(run_dir)
    return family, cfg.image_scale, cfg.sample.cfg_scale


# --------------------------------------------------------------------------------- InstructPix2Pix


def draw_case(run_dir: str, scene_seed, index) -> instruct_eval.EditCase:
    """Scene ``index`` of ``scene_seed`` in the run's world, with the edit :func:`~difflab.world.edits.edit_at`
    draws for it and the scene it asks for: the evaluation's case ``index`` when ``scene_seed`` is its seed
    and no earlier scene shows a held-out pair (:func:`~difflab.models.instruct_eval.edit_cases`)."""
    _require(run_dir, "instruct")
    scene_seed = check_seed("scene seed", scene_seed)
    index = check_int("scene index", index, 0, MAX_COUNT)
    data = instruct.load_config(run_dir).data
    world = data.world_config()
    scene = scene_at(world, scene_seed, index)
    return instruct_eval.EditCase(scene, *edit_at(scene, world, scene_seed, index, data.pairs()))


@dataclass(frozen=True)
class InstructView:
    """What one press of Edit drew with an InstructPix2Pix run."""

    image: torch.Tensor
    """(3, H, W) in [-1, 1]: the input."""
    edits: torch.Tensor
    """(N, 3, H, W) in [-1, 1]: edit k is ``instruct.edit`` of the input at seed ``seed + k`` (``difflab edit``)."""
    readings: list[str]
    """What the reader reads in the input, then in each edit."""
    case: instruct_eval.EditCase | None
    """The drawn scene's case while the instruction is its edit's: then each edit has a verdict."""
    verdicts: list[dict]
    """:func:`difflab.models.instruct_eval.judge` of each edit against ``case`` (empty without one)."""
    summary: str
    asked: torch.Tensor | None = None
    """(3, H, W): the scene the case's instruction asks for, rendered (None without a case)."""


def edit_image(run_dir: str, instruction: str, *, image=None, scene_seed=SCENE_SEED, index=0, image_scale=None,
               text_scale=None, seed=0, n=1) -> InstructView:  # fmt: skip
    """``n`` edits by ``instruction`` of the image file ``image`` (None: scene ``index`` of ``scene_seed`` in the
    run's world), at s_I = ``image_scale`` and s_T = ``text_scale`` (None: the run's)."""
    _require(run_dir, "instruct")
    n = check_int("edits", n, 1, MAX_EDITS)
    seed = check_seed("seed", seed)
    instruction = instruction.strip() if isinstance(instruction, str) else ""
    if not instruction:
        raise DifflabError("the instruction is empty; expected what to change, e.g. 'make the circle blue' or "
                           "'move the square to the left'")  # fmt: skip
    for name, scale in (("image guidance", image_scale), ("text guidance", text_scale)):
        if scale is not None:  # instruct.edit's own checks, made before the model is loaded
            check_float(name, scale, *GUIDANCE_RANGE)
    system, cfg, lock = load_editor(run_dir, "instruct")
    world = cfg.data.world_config()
    case, where = None, f"'{Path(str(image)).name}'"  # the page's uploads live under long temporary paths
    if image is None:
        drawn = draw_case(run_dir, scene_seed, index)
        source = scene_image(drawn.before, world)  # as the evaluation's request renders its inputs
        case = drawn if normalized(instruction) == normalized(drawn.edit.text()) else None
        held = " (it shows a held-out pair)" if mentions_heldout(drawn.before, cfg.data.pairs()) else ""
        where = f"scene {index} of seed {scene_seed}{held}"
    else:
        source = inversion.read_image(image, cfg.data.image_size)[0]  # (3, S, S) in [-1, 1]
    start = time.perf_counter()
    with lock:
        edits = torch.cat([instruct.edit(system, cfg, Instructions([instruction], source[None]), seed=seed + k,
                                         image_scale=image_scale, text_scale=text_scale)
                           for k in range(n)]).cpu()  # fmt: skip
    seconds = time.perf_counter() - start
    readings = [describe(read(x, world)) for x in (source, *edits)]
    verdicts = [instruct_eval.judge(case, e, world) for e in edits] if case is not None else []
    s_i = cfg.image_scale if image_scale is None else image_scale
    s_t = cfg.sample.cfg_scale if text_scale is None else text_scale
    judged = (f"; the reader finds the edit carried out in {sum(v['success'] for v in verdicts)} of {n}, everything "
              f"else kept in {sum(v['preserved'] for v in verdicts)} of {n}" if verdicts else "")  # fmt: skip
    summary = (f"{n} edit(s) of {where} by '{instruction}' with {run_dir} in {seconds:.1f} s: s_I {s_i:g}, s_T "
               f"{s_t:g}, {cfg.sample.sampler}, {cfg.sample.steps} steps, seed {seed}"
               f"{f'..{seed + n - 1}' if n > 1 else ''}{judged}")  # fmt: skip
    asked = scene_image(case.after, world) if case is not None else None
    return InstructView(source, edits, readings, case, verdicts, summary, asked)


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def instruct_tiles(view: InstructView) -> list[tuple[np.ndarray, str]]:
    """The gallery: the input, the asked-for scene (when there is a case), then each edit, under their
    readings and verdicts."""
    tiles = [(to_uint8(view.image), f"input - the reader reads: {view.readings[0]}")]
    if view.case is not None:
        tiles.append((to_uint8(view.asked), f"asked for: {describe(view.case.after)}"))
    for k, (edit, reading) in enumerate(zip(view.edits, view.readings[1:], strict=True)):
        verdict = ""
        if view.verdicts:
            v = view.verdicts[k]
            verdict = (f"{_mark(v['success'])} edit, {_mark(v['preserved'])} rest kept, background "
                       f"{v['psnr_background']:.1f} dB - ")  # fmt: skip
        tiles.append((to_uint8(edit), f"edit {k + 1}: {verdict}the reader reads: {reading}"))
    return [(enlarge(rgb(t)), c) for t, c in tiles]


# ------------------------------------------------------------------------------------- Prompt-to-Prompt


@dataclass(frozen=True)
class P2PView:
    """What one press of Edit drew with a text-to-image run: row k is ``difflab p2p``'s row k."""

    sources: torch.Tensor
    """(N, 3, H, W) in [-1, 1]: the source prompt drawn (or, for an uploaded image, the image itself)."""
    edits: torch.Tensor
    """(N, 3, H, W): Prompt-to-Prompt's edits into the target prompt."""
    naive: torch.Tensor
    """(N, 3, H, W): the target prompt regenerated from the same noise, nothing of the source kept."""
    verdicts: dict[str, list[Verdict]]
    """'source' (the source prompt on the sources), 'edit' and 'naive' (the target prompt on those)."""
    summary: str
    redrawn: torch.Tensor | None = None
    """(1, 3, H, W): an uploaded image redrawn from its inversion (what the edit starts from), or None."""


def p2p_edit(run_dir: str, source: str, target: str, *, tau=P2PEdit.tau, tau_self=P2PEdit.tau_self, seed=0, n=1,
             image=None) -> P2PView:  # fmt: skip
    """Prompt-to-Prompt from ``source`` to ``target`` on ``n`` rows of noise from ``seed`` (as ``difflab p2p
    --seed SEED --seeds N`` draws them), beside the naive regeneration; with ``image`` (a file), that image,
    inverted under ``source``, is edited instead (one row: the inversion is deterministic)."""
    _require(run_dir, "t2i")
    n = check_int("rows", n, 1, MAX_EDITS)
    seed = check_seed("seed", seed)
    prompts = []
    for name, text in (("source", source), ("target", target)):
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise DifflabError(f"the {name} prompt is empty; expected a description such as 'a red circle' "
                               "(source) and 'a blue circle' (target)")  # fmt: skip
        prompts.append(text)
    edit = P2PEdit(*prompts, tau=tau, tau_self=tau_self)  # checks tau and tau_self as --tau and --tau-self
    system, cfg, lock = load_editor(run_dir, "t2i")
    redrawn, start = None, time.perf_counter()
    with lock:
        if image is None:
            sources, edited = prompt_to_prompt(system, cfg, [edit] * n, seed=seed)
            _, regenerated = prompt_to_prompt(system, cfg, [naive(edit)] * n, seed=seed, replan=True)
            how = f"{n} row(s) of noise from seed {seed}"
        else:
            sources = inversion.read_image(image, cfg.data.image_size)
            inverted = inversion.null_text_inversion(system, cfg, sources, edit.source)
            redrawn = inversion.redraw(system, cfg, inverted).cpu()
            _, edited = prompt_to_prompt(system, cfg, [edit], inversion=inverted)
            _, regenerated = prompt_to_prompt(system, cfg, [naive(edit)], inversion=inverted)
            how = (f"'{Path(str(image)).name}' after null-text inversion (redrawn at "
                   f"{psnr(redrawn[0], sources[0]):.1f} dB)")  # fmt: skip
    seconds = time.perf_counter() - start
    sources, edited, regenerated = sources.cpu(), edited.cpu(), regenerated.cpu()
    world = cfg.data.world_config()
    verdicts = {"source": judge(edit.source, to_uint8(sources), world),
                "edit": judge(edit.target, to_uint8(edited), world),
                "naive": judge(edit.target, to_uint8(regenerated), world)}  # fmt: skip
    held = [v.holds for v in verdicts["edit"]]
    naive_held = sum(v.holds is True for v in verdicts["naive"])
    judged = (f"; the reader finds the target true on {sum(held)} of {len(held)} edit(s), on {naive_held} naive "
              "regeneration(s)" if None not in held else "")  # fmt: skip
    summary = (f"'{edit.source}' -> '{edit.target}' with {run_dir} in {seconds:.1f} s: tau {edit.tau:g}, tau_self "
               f"{edit.tau_self:g}, {how}{judged}")  # fmt: skip
    return P2PView(sources, edited, regenerated, verdicts, summary, redrawn)


def p2p_tiles(view: P2PView) -> list[tuple[np.ndarray, str]]:
    """The gallery, one row per edit: source (and the uploaded image's redraw) | edit | naive."""
    tiles = []
    for k in range(len(view.edits)):
        row = [(view.sources[k], "source: " + view.verdicts["source"][k].caption())]
        if view.redrawn is not None:
            row.append((view.redrawn[k], "redrawn from its inversion"))
        row += [(view.edits[k], "Prompt-to-Prompt: " + view.verdicts["edit"][k].caption()),
                (view.naive[k], "naive: " + view.verdicts["naive"][k].caption())]  # fmt: skip
        tiles += row
    return [(enlarge(rgb(to_uint8(x))), c) for x, c in tiles]


def verdicts_html(tiles: list[tuple[np.ndarray, str]]) -> str:
    """The gallery's captions as a list (the gallery shows them only on hover)."""
    listed = "".join(f"<li>{html.escape(caption)}</li>" for _, caption in tiles)
    return f"<ul class='difflab-verdicts'>{listed}</ul>"


# ---------------------------------------------------------------------------------------------- layout

INSTRUCT_HELP = (
    "**InstructPix2Pix** (Brooks et al. 2023): the edit is sampled from noise beside the input image, with "
    "two-scale guidance (Eq. 3): s_I pulls towards the input, s_T towards the instruction. *Draw* picks a scene "
    "of the run's world and the edit the world draws for it; while the instruction is that one, every edit gets "
    "the evaluator's exact verdict (the asked-for scene read back, the rest kept), as `difflab edit RUN --eval N`."
)
P2P_HELP = (
    "**Prompt-to-Prompt** (Hertz et al. 2022): the source and target prompts are drawn from the same noise, the "
    "target's cross-attention maps the source's for the first tau of the steps (self-attention: tau_self). Each "
    "row: source | edit | naive (the target from the same noise), as `difflab p2p RUN SOURCE TARGET`. An "
    "uploaded image is inverted under the source prompt first (null-text inversion, as `difflab p2p RUN SOURCE "
    "TARGET --image FILE`): the source must describe it."
)


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page``: one editor's controls shown, by the run's
    family."""
    import gradio as gr

    editing = [r for r in runs if _editor_or_none(r) is not None]
    first = (editing or runs or [None])[0]
    shown = _editor_or_none(first)
    run = gr.Dropdown(editing or runs, value=first, label="run directory", allow_custom_value=True,
                      info="an InstructPix2Pix run, or a text-to-image run (Prompt-to-Prompt)",
                      elem_id="edit-run")  # fmt: skip
    status = gr.HTML(elem_id="edit-status")
    with gr.Column(visible=shown == "instruct") as instruct_panel:
        gr.Markdown(INSTRUCT_HELP)
        with gr.Row():
            given = gr.Radio(list(INPUTS), value=INPUTS[0], label="input", elem_id="edit-input")
            scene_seed = gr.Number(SCENE_SEED, precision=0, label="scene seed",
                                   info="the evaluation's held-out scenes by default")  # fmt: skip
            index = gr.Number(0, precision=0, label="scene index")
            draw = gr.Button("Draw the scene and its edit", elem_id="edit-draw")
            upload = gr.Image(type="filepath", image_mode=None, sources=["upload"], label="image to edit (PNG, "
                              "the run's side)", height=160, elem_classes="difflab-pixels")  # fmt: skip
        with gr.Row():
            instruction = gr.Textbox(label="instruction", placeholder="make the circle blue", scale=3,
                                     elem_id="edit-instruction")  # fmt: skip
            image_scale = gr.Number(
                None, label=f"image guidance s_I ({GUIDANCE_RANGE[0]:g}-{GUIDANCE_RANGE[1]:g})"
            )
            text_scale = gr.Number(
                None, label=f"text guidance s_T ({GUIDANCE_RANGE[0]:g}-{GUIDANCE_RANGE[1]:g})"
            )
            seed = gr.Number(
                0, precision=0, label="seed", info="edit k from seed + k, as difflab edit --seed"
            )
            n = gr.Slider(1, MAX_EDITS, value=2, step=1, label="edits")
            go = gr.Button("Edit", variant="primary", elem_id="edit-go")
    with gr.Column(visible=shown == "t2i") as p2p_panel:
        gr.Markdown(P2P_HELP)
        with gr.Row():
            source = gr.Textbox(label="source prompt", placeholder="a red circle", elem_id="p2p-source")
            target = gr.Textbox(label="target prompt", placeholder="a blue circle", elem_id="p2p-target")
            p2p_given = gr.Radio(list(INPUTS), value=INPUTS[0], label="input", elem_id="p2p-input")
            p2p_upload = gr.Image(type="filepath", image_mode=None, sources=["upload"], label="image to edit "
                                  "(PNG, the run's side)", height=160, elem_classes="difflab-pixels")  # fmt: skip
        with gr.Row():
            tau = gr.Slider(0, 1, value=P2PEdit.tau, step=0.05, label="tau", info="steps with the source's "
                            "cross-attention maps")  # fmt: skip
            tau_self = gr.Slider(0, 1, value=P2PEdit.tau_self, step=0.05, label="tau_self",
                                 info="steps with its self-attention")  # fmt: skip
            p2p_seed = gr.Number(
                0, precision=0, label="seed", info="row k from noise k of seed, as difflab p2p"
            )
            rows = gr.Slider(1, MAX_EDITS, value=2, step=1, label="rows", info="one for an uploaded image")
            p2p_go = gr.Button("Edit", variant="primary", elem_id="p2p-go")
    gallery = gr.Gallery(label="edits, each under what the reader reads", columns=4, format="png", height=320,
                         elem_id="edit-gallery", elem_classes="difflab-pixels")  # fmt: skip
    verdicts = gr.HTML(elem_id="edit-verdicts")

    def on_run(run_dir):
        try:
            family, s_i, s_t = run_settings(run_dir)
        except DifflabError as err:
            return error_html(err), gr.update(visible=False), gr.update(visible=False), gr.skip(), gr.skip()
        what = (
            f"s_I {s_i:g} and s_T {s_t:g}"
            if family == "instruct"
            else "the run's sampler, steps and guidance"
        )
        return (note_html(f"{run_dir}: edited by {EDITORS[family][0]} with {what} unless told otherwise"),
                gr.update(visible=family == "instruct"), gr.update(visible=family == "t2i"),
                s_i if family == "instruct" else gr.skip(), s_t if family == "instruct" else gr.skip())  # fmt: skip

    def on_draw(run_dir, scene_seed, index):
        try:
            case = draw_case(run_dir, scene_seed, index)
        except DifflabError as err:
            return error_html(err), gr.skip(), None, ""
        world = instruct.load_config(run_dir).data.world_config()
        tiles = [(enlarge(to_uint8(scene_image(s, world))), f"{what}: {describe(s)}")
                 for s, what in ((case.before, "scene"), (case.after, "asked for"))]  # fmt: skip
        return (note_html(f"scene {index} of seed {scene_seed} and its edit: '{case.edit.text()}'"),
                case.edit.text(), tiles, verdicts_html(tiles))  # fmt: skip

    def on_edit(run_dir, given, upload, scene_seed, index, instruction, image_scale, text_scale, seed, n):
        try:
            if given == INPUTS[1] and not upload:
                raise DifflabError("no image is uploaded; expected a PNG of the side of the run's images, or "
                                   f"'{INPUTS[0]}' as the input")  # fmt: skip
            view = edit_image(run_dir, instruction, image=upload if given == INPUTS[1] else None,
                              scene_seed=scene_seed, index=index, image_scale=image_scale, text_scale=text_scale,
                              seed=seed, n=n)  # fmt: skip
        except DifflabError as err:
            return error_html(err), None, ""
        tiles = instruct_tiles(view)
        return note_html(view.summary), gr.update(value=tiles, columns=len(tiles)), verdicts_html(tiles)

    def on_p2p(run_dir, source, target, given, upload, tau, tau_self, seed, rows):
        try:
            if given == INPUTS[1] and not upload:
                raise DifflabError("no image is uploaded; expected a PNG of the side of the run's images, or "
                                   f"'{INPUTS[0]}' as the input")  # fmt: skip
            view = p2p_edit(run_dir, source, target, tau=tau, tau_self=tau_self, seed=seed, n=rows,
                            image=upload if given == INPUTS[1] else None)  # fmt: skip
        except DifflabError as err:
            return error_html(err), None, ""
        tiles = p2p_tiles(view)
        per_row = gr.update(value=tiles, columns=len(tiles) // len(view.edits))
        return note_html(view.summary), per_row, verdicts_html(tiles)

    run.change(on_run, [run], [status, instruct_panel, p2p_panel, image_scale, text_scale])
    if first is not None:
        page.load(on_run, [run], [status, instruct_panel, p2p_panel, image_scale, text_scale])
    draw.click(on_draw, [run, scene_seed, index], [status, instruction, gallery, verdicts])
    instruct_inputs = [run, given, upload, scene_seed, index, instruction, image_scale, text_scale, seed, n]
    go.click(on_edit, instruct_inputs, [status, gallery, verdicts])
    instruction.submit(on_edit, instruct_inputs, [status, gallery, verdicts])
    p2p_inputs = [run, source, target, p2p_given, p2p_upload, tau, tau_self, p2p_seed, rows]
    p2p_go.click(on_p2p, p2p_inputs, [status, gallery, verdicts])
    target.submit(on_p2p, p2p_inputs, [status, gallery, verdicts])


def _editor_or_none(run_dir: str | None) -> str | None:
    try:
        return editor_of(run_dir)
    except DifflabError:
        return None
