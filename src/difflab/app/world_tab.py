"""The World tab: scenes of a preset and seed with their captions, their depth, edges and mask, a few
questions with answers, and what the reader reads back from each image (``difflab world preview``)."""

import html
from dataclasses import dataclass

import numpy as np

from difflab.app.pictures import colormapped, enlarge
from difflab.app.status import error_html, note_html
from difflab.errors import DifflabError, check_int, check_seed
from difflab.world.language import describe, questions
from difflab.world.reader import read
from difflab.world.render import render
from difflab.world.scene import WORLD_PRESETS, scene_at, world_preset

MAX_SCENES = 16
"""Most scenes one draw shows: a page of tiles, not a dataset (``difflab world preview --n`` for more)."""
FIELDS = ("depth", "edges", "mask")
QUESTIONS_PER_SCENE = 3


@dataclass(frozen=True)
class SceneView:
    """One scene as the tab shows it."""

    index: int
    image: np.ndarray
    """(H, W, 3) uint8: the rendered scene."""
    fields: dict[str, np.ndarray]
    """depth, edges and mask as (H, W, 3) uint8 in viridis (near is dark; each object its own mask level)."""
    caption: str
    """The world's full description of the scene: the truth."""
    reading: str
    """The same description of the scene the reader reads from the image alone."""
    read_right: bool
    """Whether the reader found every object's shape, colour, size and cell, and nothing else."""
    questions: tuple[tuple[str, str], ...]
    """(question, answer) pairs about the scene."""


def draw_scene(preset: str, seed, index: int) -> SceneView:
    """Scene ``index`` of ``seed`` in world ``preset``, rendered, described, questioned and read back."""
    cfg = world_preset(preset)
    seed = check_seed("seed", seed)
    scene = scene_at(cfg, seed, index)
    drawn = render(scene, cfg)
    image = np.round(np.clip(drawn.image, 0, 1) * 255).astype(np.uint8)  # the 8-bit grid datasets round to
    seen = read(image, cfg)
    fields = {"depth": colormapped(drawn.depth), "edges": colormapped(drawn.edges),
              "mask": colormapped(drawn.mask, vmax=max(len(scene.objects), 1))}  # fmt: skip
    qa = questions(scene, np.random.default_rng([seed, index]), QUESTIONS_PER_SCENE, cfg)
    return SceneView(index, image, fields, describe(scene), describe(seen), seen.keys() == scene.keys(),
                     tuple((q.question, q.answer) for q in qa))  # fmt: skip


def draw_world(preset: str, seed, n) -> list[SceneView]:
    """Scenes ``0..n-1`` of ``seed`` in world ``preset`` (at most :data:`MAX_SCENES`)."""
    world_preset(preset)  # an unknown preset is named before anything else
    n = check_int("n", n, 1, MAX_SCENES)
    return [draw_scene(preset, seed, i) for i in range(n)]


def readings_html(views: list[SceneView]) -> str:
    """A table: each scene's description beside what the reader reads, and whether they agree."""
    rows = "".join(
        f"<tr><td>{v.index}</td><td>{html.escape(v.caption)}</td><td>{html.escape(v.reading)}</td>"
        f"<td>{'✓' if v.read_right else '✗'}</td></tr>"
        for v in views
    )
    right = sum(v.read_right for v in views)
    return (f'<table class="difflab-readings"><thead><tr><th>#</th><th>the scene (truth)</th>'
            f"<th>the reader reads (from pixels alone)</th><th>same?</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<p>The reader read {right} of {len(views)} scenes exactly (shape, colour, size and cell of every "
            "object). Its measured accuracy: <code>difflab world check</code>, docs/world.md.</p>")  # fmt: skip


def detail_html(view: SceneView) -> str:
    """The questions and answers about one scene."""
    qa = "".join(f"<li>{html.escape(q)} <b>{html.escape(a)}</b></li>" for q, a in view.questions)
    return f"<p>Scene {view.index}: {html.escape(view.caption)}</p><ul>{qa}</ul>"


def _gallery(views: list[SceneView]) -> list[tuple[np.ndarray, str]]:
    return [(enlarge(v.image), f"{v.index}: {v.caption}") for v in views]


def _fields(view: SceneView) -> list[tuple[np.ndarray, str]]:
    return [(enlarge(view.image), "image"), *((enlarge(view.fields[f]), f) for f in FIELDS)]


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page`` (a ``gr.Blocks``), drawn as the page opens."""
    import gradio as gr

    with gr.Row():
        preset = gr.Dropdown(list(WORLD_PRESETS), value="scene32", label="world preset", allow_custom_value=True,
                             info="flat worlds, or depth16/32/64 in perspective", elem_id="world-preset")  # fmt: skip
        seed = gr.Number(0, precision=0, label="seed", info="scene i of seed s is always the same")
        n = gr.Slider(1, MAX_SCENES, value=8, step=1, label="scenes")
        draw = gr.Button("Draw", variant="primary", elem_id="world-draw")
    status = gr.HTML(elem_id="world-status")
    gallery = gr.Gallery(label="scenes and their captions", columns=8, format="png", object_fit="contain",
                         height=320, elem_id="world-gallery", elem_classes="difflab-pixels")  # fmt: skip
    readings = gr.HTML(elem_id="world-readings")
    gr.Markdown(
        "Click a scene for its fields (depth: near is dark; mask: one level per object) and questions."
    )
    with gr.Row():
        fields = gr.Gallery(label="image, depth, edges, mask", columns=4, format="png", height=240,
                            elem_id="world-fields", elem_classes="difflab-pixels", scale=2)  # fmt: skip
        detail = gr.HTML(elem_id="world-detail")

    def on_draw(preset, seed, n):
        try:
            views = draw_world(preset, seed, n)
        except DifflabError as err:
            return error_html(err), None, "", None, ""
        note = f"{len(views)} scenes of {preset}, seed {int(seed)}"
        return (
            note_html(note),
            _gallery(views),
            readings_html(views),
            _fields(views[0]),
            detail_html(views[0]),
        )

    def on_select(preset, seed, evt: gr.SelectData):
        try:
            view = draw_scene(preset, seed, evt.index)
        except DifflabError as err:
            return error_html(err), None, ""
        return "", _fields(view), detail_html(view)

    outputs = [status, gallery, readings, fields, detail]
    draw.click(on_draw, [preset, seed, n], outputs)
    page.load(on_draw, [preset, seed, n], outputs)
    gallery.select(on_select, [preset, seed], [status, fields, detail])
