"""The Depth tab: a depth run (Marigold, or its one-step fine-tuning) on held-out scenes of its world
(``difflab depth RUN --examples N``): image | true depth | estimate | relative error per scene, the scene's
AbsRel and delta1 after least-squares alignment, with the steps, ensemble and spacing to try (one 'leading'
step shows Garcia et al.'s flaw)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflab.app.pictures import colormapped, enlarge, strip
from difflab.app.status import error_html, note_html
from difflab.diffusion.discretization import SPACINGS
from difflab.errors import DifflabError, check_choice, check_int, check_seed
from difflab.models import depth, depth_eval
from difflab.models.depth_align import align_scale_shift
from difflab.models.registry import family_of_run

MAX_SCENES = 8
"""Most scenes one press estimates (``difflab eval`` scores hundreds)."""


@dataclass(frozen=True)
class DepthView:
    """What one press of Estimate drew."""

    picture: np.ndarray
    """(H', W', 3) uint8: one row per scene, image | truth | estimate | error (white: 10 % or more)."""
    scores: list[tuple[float, float]]
    """(AbsRel, delta1) of each scene after least-squares alignment."""
    summary: str


_loaded: dict[str, tuple] = {}
_loading = threading.Lock()


def load_depth_run(run_dir: str):
    """``(system, record)`` of a depth run, loaded once per path."""
    if not str(run_dir or "").strip():
        raise DifflabError("no run is chosen; expected a depth run directory (difflab train --preset depth_marigold)")
    family = family_of_run(run_dir)
    if family.name != "depth":
        raise DifflabError(f"'{run_dir}' is a {family.name} run; the Depth tab takes a depth run "
                           "(difflab train --preset depth_marigold --set base=RUN)")  # fmt: skip
    path = str(Path(run_dir).resolve())
    with _loading:
        if path not in _loaded:
            _loaded[path] = depth.load_model(run_dir)
        return _loaded[path]


def estimate_scenes(run_dir: str, seed, n, steps, ensemble, spacing) -> DepthView:
    """Scenes ``0..n-1`` of the held-out set ``seed`` of the run's world, estimated and judged."""
    system, cfg = load_depth_run(run_dir)
    n = check_int("scenes", n, 1, MAX_SCENES)
    seed = check_seed("seed", seed)
    steps = check_int("steps", steps, 1, cfg.diffusion.timesteps)
    ensemble = check_int("ensemble", ensemble, 1, 100)
    spacing = check_choice("timestep spacing", spacing, SPACINGS)
    images, truth, masks = depth_eval.held_out(cfg.data.world_config(), n, seed)
    pred, _ = depth.estimate(system, cfg, images, steps=steps, ensemble=ensemble, spacing=spacing, seed=seed)
    scores = depth_eval.score(pred, truth, masks)  # per image, after least-squares alignment
    rel, d1 = scores["abs_rel"].tolist(), scores["delta1"].tolist()
    aligned = align_scale_shift(pred.double(), truth.double())[0]  # what the tiles show
    rows = []
    for x, t, a in zip(images, truth, aligned, strict=True):
        lo, hi = float(t.min()), float(t.max())  # truth and estimate share the scene's range
        error = ((a - t).abs() / t).numpy()
        image = np.round((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        rows.append([image, colormapped((t.numpy() - lo) / (hi - lo)),
                     colormapped((a.clamp(lo, hi).numpy() - lo) / (hi - lo)), colormapped(error, vmax=0.1)])
    how = "one step at t = T - 1" if cfg.objective == "end_to_end" else f"{steps} steps, {spacing}, ensemble {ensemble}"
    summary = (f"{n} held-out scenes of {cfg.data.world} (seed {seed}), {how}: mean AbsRel {np.mean(rel):.4f}, "
               f"delta1 {np.mean(d1):.4f}")  # fmt: skip
    picture = strip(rows)
    return DepthView(enlarge(picture, side=4 * max(picture.shape[:2])), list(zip(rel, d1, strict=True)), summary)


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page``."""
    import gradio as gr

    depth_runs = [r for r in runs if _is_depth(r)]
    with gr.Row():
        run = gr.Dropdown(depth_runs or runs, value=(depth_runs or [None])[0], label="depth run",
                          allow_custom_value=True, elem_id="depth-run", scale=3)  # fmt: skip
        seed = gr.Number(0, precision=0, label="seed", info="held-out scenes of this seed")
        n = gr.Slider(1, MAX_SCENES, value=4, step=1, label="scenes")
    with gr.Row():
        steps = gr.Slider(1, 50, value=10, step=1, label="steps", info="Marigold runs; end-to-end runs take one")
        ensemble = gr.Slider(1, 10, value=1, step=1, label="ensemble", info="draws merged per image (Eq. 4)")
        spacing = gr.Dropdown(list(SPACINGS), value="trailing", label="timestep spacing",
                              info="one 'leading' step starts from t = 0 on pure noise")  # fmt: skip
        go = gr.Button("Estimate", variant="primary", elem_id="depth-go")
    status = gr.HTML(elem_id="depth-status")
    picture = gr.Image(label="image | truth | estimate | error (white: 10 % or more)", format="png",
                       elem_id="depth-picture", elem_classes="difflab-pixels")  # fmt: skip

    def on_go(run, seed, n, steps, ensemble, spacing):
        try:
            view = estimate_scenes(run, seed, n, steps, ensemble, spacing)
        except DifflabError as err:
            return error_html(err), None
        return note_html(view.summary), view.picture

    go.click(on_go, [run, seed, n, steps, ensemble, spacing], [status, picture])


def _is_depth(run_dir: str) -> bool:
    try:
        return family_of_run(run_dir).name == "depth"
    except DifflabError:
        return False
