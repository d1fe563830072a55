"""The Control tab: a ControlNet run (Zhang, Rao & Agrawala 2023) steered by a condition image, as
``difflab generate RUN "PROMPT" --control FILE`` draws it.

The condition comes from one of three places (:data:`SOURCES`):

- ``scene``: scene (seed, index) of the base's world, drawn by the function ``difflab world condition`` and the
  ControlNet's training use (:func:`~difflab.models.control_eval.condition_image`), in the run's own condition
  (edges, depth, mask, boxes, shapes or layout). The prompt defaults to the scene's description, the text
  ``difflab world condition`` prints with it;
- ``upload``: a condition image file (:func:`~difflab.models.control.read_condition`, through
  :func:`~difflab.models.control.control_request` as the command line reads ``--control FILE``);
- ``planner``: the prompt laid out by the run's layout planner (LMD's first stage, Lian et al. 2023), one
  layout per image, for a ControlNet on boxes, shapes or layouts trained with one.

Each image gets the reader's verdict on the prompt (:mod:`difflab.app.verdict`) and, when its condition was
drawn from a scene (a world scene, or a planned layout), how faithfully it keeps that condition: the scene
re-detected in the image and compared with the condition's, as ``difflab eval`` scores a ControlNet
(:func:`~difflab.models.control_eval.score`, Table 2 of Zhang et al.).
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.app.generate_tab import run_settings, sampling_controls
from difflab.app.pictures import enlarge, strip
from difflab.app.status import error_html, note_html
from difflab.app.verdict import Verdict, judge
from difflab.data.images import to_uint8
from difflab.errors import DifflabError, check_choice, check_float, check_int, check_seed
from difflab.models import control, control_eval, t2i
from difflab.models.conditioners import Controls, Layouts
from difflab.models.registry import family_of_run
from difflab.models.runs import read_run_config
from difflab.train.checkpoint import list_checkpoints
from difflab.world.language import describe
from difflab.world.scene import Scene, scene_at, world_preset

MAX_IMAGES = 8
"""Most images one press draws: a row to compare with its condition (``difflab eval`` scores hundreds)."""
SOURCES = ("scene", "upload", "planner")
"""Where the condition comes from: a scene of the world, an uploaded image, the run's layout planner."""
SETTINGS = ("source", "scene_seed", "index", "upload", "scale", "sampler", "steps", "guidance", "seed", "n")
"""The keyword arguments of :func:`control_images` after the run and prompt, in the order the page passes them."""
SCALE_RANGE = (0.0, 10.0)
"""The control scales a run accepts (:class:`~difflab.models.control.ControlConfig`'s ``control_scale``)."""


@dataclass(frozen=True)
class ControlView:
    """What one press of Generate drew under a condition."""

    condition: np.ndarray
    """(H, W, 3) uint8: the condition image as shown; for the planner, each image's own, side by side."""
    hints: torch.Tensor
    """(N, C, S, S) in [0, 1]: the condition each image was drawn under, as the ControlNet read it."""
    images: np.ndarray
    """(N, H, W, 3) uint8."""
    verdicts: list[Verdict]
    """The reader's verdict on the prompt, per image."""
    fidelity: list[dict]
    """Per image, :func:`~difflab.models.control_eval.score`'s report against the scene its condition was drawn
    from ('fidelity' 1.0: the objects where the condition put them, with its shapes); empty for an upload."""
    prompt: str
    """The prompt drawn (a scene's description where the prompt was left empty)."""
    summary: str


_loaded: dict[str, tuple[tuple, object, object, object]] = {}
_loading = threading.Lock()
_sampling = threading.Lock()
"""Held while a loaded run samples: its control scale is set on the shared model for each press."""


def check_control_run(run_dir: str) -> None:
    """A named error unless ``run_dir`` is a ControlNet run directory (read from its config.json alone)."""
    if not str(run_dir or "").strip():
        raise DifflabError("no run is chosen; expected a ControlNet run directory (difflab train --preset "
                           "controlnet_edges --set base=RUN)")  # fmt: skip
    family = family_of_run(run_dir)  # 'not a difflab run directory' for anything else
    if family.name != "control":
        raise DifflabError(f"'{run_dir}' is a {family.name} run; the Control tab takes a ControlNet (control) run "
                           "(difflab train --preset controlnet_edges --set base=RUN)")  # fmt: skip


def load_control_run(run_dir: str):
    """``(model, record, base record)`` of a ControlNet run, loaded once and kept while its newest checkpoint
    stays the same; a run of another family is refused by name."""
    check_control_run(run_dir)
    key = tuple(str(p) for _, p in list_checkpoints(Path(run_dir) / "checkpoints")[-1:])
    path = str(Path(run_dir).resolve())
    with _loading:
        if path not in _loaded or _loaded[path][0] != key:
            model, cfg = control.load_model(run_dir)
            _loaded[path] = (key, model, cfg, t2i.load_config(cfg.base))
        _, model, cfg, base_cfg = _loaded[path]
    return model, cfg, base_cfg


def control_settings(run_dir: str) -> dict:
    """The run's condition, whether it has a layout planner, its control scale and its sampler, steps and
    guidance (its config.json), without loading it."""
    check_control_run(run_dir)
    record = read_run_config(run_dir)[1]
    sampler, steps, guidance = run_settings(run_dir)
    return {"condition": record.get("condition", "edges"), "planner": record.get("planner") is not None,
            "control_scale": float(record.get("control_scale", 1.0)), "sampler": sampler, "steps": steps,
            "guidance": guidance}  # fmt: skip


def scene_condition(run_dir: str, seed=0, index=0) -> tuple[Scene, torch.Tensor]:
    """Scene ``index`` of world seed ``seed`` of the run's world (``difflab world condition --seed --index``;
    seed 0 is the training set's) and its condition image (C, S, S) in [0, 1], as the run was trained on."""
    seed = check_seed("scene seed", seed)
    index = check_int("scene index", index, 0, 2**31 - 1)
    check_control_run(run_dir)
    cfg = control.load_config(run_dir)  # the record alone: drawing a condition loads no model
    world = world_preset(cfg.data.world)
    scene = scene_at(world, seed, index)
    return scene, control_eval.condition_image(scene, world, cfg.condition)


def condition_picture(hints: torch.Tensor) -> np.ndarray:
    """Condition images (N, C, S, S) in [0, 1] as one (H, W, 3) uint8 picture, side by side: a one-channel
    condition in grey as its PNG shows it; a layout (RGBA) as its boxes' colours above its shape levels (the
    alpha channel, in grey), since a browser would show the alpha as transparency."""
    grey = [(h.numpy() * 255).round().astype(np.uint8) for h in hints.cpu()]  # each (C, S, S)
    if grey[0].shape[0] == 4:
        rows = [[g[:3].transpose(1, 2, 0) for g in grey], [g[3, :, :, None] for g in grey]]
    else:
        rows = [[g[0, :, :, None] for g in grey]]
    picture = strip(rows)
    return enlarge(picture, side=192 * len(grey))


def _fidelity_caption(report: dict) -> str:
    kept = "✓ condition kept" if report["fidelity"] == 1 else "✗ condition not kept"
    return f"{kept} (shapes and cells re-read; mask IoU {report['mask_iou']:.2f})"


def caption(verdict: Verdict, fidelity: dict | None) -> str:
    """An image's caption: the reader's verdict, and how well it keeps its condition where that is known."""
    return verdict.caption() + ("" if fidelity is None else f"; {_fidelity_caption(fidelity)}")


def control_images(run_dir: str, prompt: str = "", *, source: str = "scene", scene_seed=0, index=0,
                   upload: str | None = None, scale=None, n=4, sampler: str | None = None, steps=None,
                   guidance=None, seed=0) -> ControlView:  # fmt: skip
    """``n`` images of ``prompt`` from the ControlNet run ``run_dir`` under the condition from ``source`` (scene
    ``index`` of world seed ``scene_seed``, the file ``upload``, or the run's planner), at control scale
    ``scale``; None settings are the run's (its ``control_scale``, sampler, steps and guidance)."""
    source = check_choice("condition source", source, SOURCES)
    n = check_int("n", n, 1, MAX_IMAGES)
    seed = check_seed("seed", seed)
    prompt = prompt.strip() if isinstance(prompt, str) else ""
    model, cfg, base_cfg = load_control_run(run_dir)
    scale = cfg.control_scale if scale is None else check_float("control scale", scale, *SCALE_RANGE)
    used = cfg.sample.resolve(sampler or None, steps, guidance)  # each checked as the CLI's flags are
    world = world_preset(cfg.data.world)
    scenes: list[Scene] | None = None
    if source == "scene":
        scene, hint = scene_condition(run_dir, scene_seed, index)
        prompt = prompt or describe(scene)
        scenes = [scene] * n
        prompts = [prompt] * n
        # a layout base also gets the scene as its layout, as the ControlNet's evaluation gives it
        request = Controls(Layouts(prompts, scenes) if base_cfg.recipe == "layout" else prompts,
                           hint.expand(n, -1, -1, -1))  # fmt: skip
    else:
        if not prompt:
            raise DifflabError("the prompt is empty; expected a description such as 'a red circle' (a drawn scene "
                               "is described for you)")  # fmt: skip
        if source == "upload" and not upload:
            side = cfg.data.image_size
            raise DifflabError(f"no condition image is uploaded; expected a {side}x{side} PNG of {cfg.condition} "
                               f"(difflab world condition --field {cfg.condition} draws one)")  # fmt: skip
        if source == "planner" and model.conditioner.planner is None:
            raise DifflabError(f"'{run_dir}' has no layout planner (a ControlNet on {cfg.condition}); choose a scene "
                               "or upload a condition image")  # fmt: skip
    with _sampling:
        if source == "scene":
            model.network.scales = [scale]  # as control_request sets it for a file
        else:
            request = control.control_request(model, cfg, [prompt] * n, upload if source == "upload" else None,
                                              scale, seed)  # fmt: skip
            scenes = request.scenes  # the planned layouts; None for an upload
        start = time.perf_counter()
        images = control.generate(model, cfg, request, sampler=used.sampler, steps=used.steps,
                                  cfg_scale=used.cfg_scale, seed=seed)  # fmt: skip
        seconds = time.perf_counter() - start
    tiles = to_uint8(images.cpu())
    verdicts = judge(prompt, tiles, world)
    fidelity = [] if scenes is None else [
        control_eval.score(images[i : i + 1], [s], world)[0] for i, s in enumerate(scenes)
    ]  # fmt: skip
    hints = request.hints.cpu()
    shown = hints if source == "planner" else hints[:1]  # one condition for every image, or one each
    where = {"scene": f"scene {index} of seed {scene_seed}", "upload": "the uploaded image",
             "planner": "the prompt's planned layouts"}[source]  # fmt: skip
    held = [v.holds for v in verdicts]
    judged = (f"; the reader finds the prompt true in {sum(h is True for h in held)} of {n}"
              if None not in held else "")  # fmt: skip
    kept = f"; the condition kept in {sum(f['fidelity'] == 1 for f in fidelity)} of {n}" if fidelity else ""
    summary = (f"{n} images of '{prompt}' from {run_dir} under the {cfg.condition} of {where}, control scale "
               f"{scale:g}, in {seconds:.1f} s: {used.sampler}, {used.steps} steps, guidance {used.cfg_scale:g}, "
               f"seed {seed}{judged}{kept}")  # fmt: skip
    return ControlView(condition_picture(shown), hints, tiles, verdicts, fidelity, prompt, summary)


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page``; ``runs`` are the command line's RUNs."""
    import gradio as gr

    control_runs = [r for r in runs if _is_control(r)]
    first = (control_runs or [None])[0]
    with gr.Row():
        run = gr.Dropdown(control_runs or runs, value=first, label="ControlNet run", allow_custom_value=True,
                          scale=2, elem_id="control-run")  # fmt: skip
        prompt = gr.Textbox(label="prompt", placeholder="empty: the drawn scene's description", scale=3,
                            elem_id="control-prompt")  # fmt: skip
    with gr.Row():
        source = gr.Radio([("a scene of the world", "scene"), ("an uploaded condition image", "upload"),
                           ("the prompt, laid out by the run's planner", "planner")], value="scene",
                          label="condition", elem_id="control-source")  # fmt: skip
        scene_seed = gr.Number(0, precision=0, label="scene seed", info="0: the training scenes")
        index = gr.Number(0, precision=0, label="scene index")
        upload = gr.Image(type="filepath", image_mode=None, sources=["upload"], label="condition image",
                          height=120, elem_id="control-upload", elem_classes="difflab-pixels")  # fmt: skip
    with gr.Row():
        scale = gr.Number(
            None, label=f"control scale ({SCALE_RANGE[0]:g}-{SCALE_RANGE[1]:g}; 0: the base alone)"
        )
        sampler, steps, guidance, seed, n = sampling_controls(MAX_IMAGES)
        go = gr.Button("Generate", variant="primary", elem_id="control-go")
    status = gr.HTML(elem_id="control-status")
    with gr.Row():
        condition = gr.Image(label="condition", format="png", height=300, scale=1, elem_id="control-condition",
                             elem_classes="difflab-pixels")  # fmt: skip
        gallery = gr.Gallery(label="images, each with the reader's verdict and the condition kept or not",
                             columns=4, format="png", height=300, scale=3, elem_id="control-gallery",
                             elem_classes="difflab-pixels")  # fmt: skip
    verdicts = gr.HTML(elem_id="control-verdicts")

    def on_run(run_dir, source, scene_seed, index):
        try:
            s = control_settings(run_dir)
        except DifflabError as err:
            return error_html(err), *[gr.skip()] * 5
        planned = "; its planner lays prompts out" if s["planner"] else ""
        line = (f"{run_dir}: a ControlNet on {s['condition']}{planned}; samples at control scale "
                f"{s['control_scale']:g} with {s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g} "
                "unless told otherwise")  # fmt: skip
        drawn = on_scene(run_dir, source, scene_seed, index)[1]
        return note_html(line), s["control_scale"], s["sampler"], s["steps"], s["guidance"], drawn

    def on_scene(run_dir, source, scene_seed, index):
        """The condition of the chosen scene, shown before anything is generated."""
        if source != "scene":
            return gr.skip(), gr.skip()
        try:
            scene, hint = scene_condition(run_dir, scene_seed, index)
        except DifflabError as err:
            return error_html(err), None
        shown = note_html(f"scene {index} of seed {scene_seed}: {describe(scene)}")
        return shown, condition_picture(hint[None])

    def on_generate(run_dir, prompt, *settings):
        try:
            view = control_images(run_dir, prompt, **dict(zip(SETTINGS, settings, strict=True)))
        except DifflabError as err:
            return error_html(err), None, None, ""
        fidelity = view.fidelity or [None] * len(view.images)
        captions = [caption(v, f) for v, f in zip(view.verdicts, fidelity, strict=True)]
        tiles = [(enlarge(t), c) for t, c in zip(view.images, captions, strict=True)]
        listed = "".join(f"<li>image {i + 1}: {html.escape(c)}</li>" for i, c in enumerate(captions))
        return note_html(view.summary), view.condition, tiles, f"<ul class='difflab-verdicts'>{listed}</ul>"

    chosen = [status, scale, sampler, steps, guidance, condition]
    run.change(on_run, [run, source, scene_seed, index], chosen)
    if first is not None:
        page.load(on_run, [run, source, scene_seed, index], chosen)
    for changed in (scene_seed, index, source):
        changed.change(on_scene, [run, source, scene_seed, index], [status, condition])
    inputs = [
        run,
        prompt,
        source,
        scene_seed,
        index,
        upload,
        scale,
        sampler,
        steps,
        guidance,
        seed,
        n,
    ]  # SETTINGS
    go.click(on_generate, inputs, [status, condition, gallery, verdicts])
    prompt.submit(on_generate, inputs, [status, condition, gallery, verdicts])


def _is_control(run_dir: str) -> bool:
    try:
        return family_of_run(run_dir).name == "control"
    except DifflabError:
        return False
