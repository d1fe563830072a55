"""The Generate tab: a trained run and a prompt -> images (``difflab generate``; for a class-conditional
pixel or latent run of the toy world, the prompt names the class: 'a red circle'), with the sampler,
steps, guidance and seed; the reader's verdict on each image (:mod:`difflab.app.verdict`); where the run reads
its prompt through cross-attention, the map of each word of the prompt over an image (Hertz et al. 2022, Sec.
3.1-3.2: :class:`~difflab.models.attention_maps.CrossAttentionMaps`, as ``difflab generate --attention``
records them); and a slider over the denoising trajectory, x_t beside the model's x̂₀ at each recorded step."""

from __future__ import annotations

import dataclasses
import html
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.app.pictures import colormapped, enlarge, rgb, strip
from difflab.app.status import error_html, note_html
from difflab.app.verdict import Verdict, judge, parse_prompt
from difflab.data.images import to_uint8
from difflab.diffusion.samplers import SAMPLERS
from difflab.errors import DifflabError, check_int, check_seed
from difflab.models.attention_maps import CrossAttentionMaps
from difflab.models.conditioners import ControlledPrompts
from difflab.models.recipe import GUIDANCE_RANGE
from difflab.models.registry import family_of_run
from difflab.models.runs import read_run_config
from difflab.models.system import generate
from difflab.train.checkpoint import list_checkpoints
from difflab.viz import TrajectoryRecorder
from difflab.world.prompts import Exists
from difflab.world.scene import WorldConfig, world_preset

MAX_IMAGES = 16
"""Most images one press draws: a row to look at, not an evaluation (``difflab eval`` for that)."""
MAX_FRAMES = 25
"""Most steps of the trajectory kept for the slider (evenly spaced, the first and last included)."""


@dataclass(frozen=True)
class Generation:
    """What one press of Generate drew."""

    images: np.ndarray
    """(N, H, W, 3) uint8."""
    verdicts: list[Verdict]
    """The reader's verdict per image (empty for a run outside the toy world)."""
    frames: list[tuple[int, np.ndarray, np.ndarray]]
    """(t, x_t, x̂₀) at each recorded step, each (N, H, W, 3) uint8: noise turning into the images."""
    summary: str
    words: tuple[str, ...] = ()
    """The prompt's tokens as the run's text encoder reads them, ``<bos>``, ``<eos>`` and padding left out
    (its words, for the toy world's word tokenizer); empty without ``maps``."""
    maps: np.ndarray | None = None
    """(N, T, H, W) float32, T = len(words): each image's cross-attention to each token, the mean over heads,
    layers and steps (each row a probability over tokens, so every map is in [0, 1]); None where the run
    reads no prompt through cross-attention (``maps_note`` says why)."""
    maps_note: str = ""


_loaded: dict[str, tuple[tuple, object, object]] = {}
_loading = threading.Lock()


def load_run(run_dir: str):
    """``(family, model, record)`` of a generative run, loaded once and kept while its newest checkpoint
    stays the same (a run still training is reloaded when it writes a new one)."""
    if not str(run_dir or "").strip():
        raise DifflabError(
            "no run is chosen; expected a run directory made by 'difflab train' (or 'difflab demo')"
        )
    family = family_of_run(run_dir)  # 'not a difflab run directory' for anything else
    if family.draws is None:
        raise DifflabError(f"'{run_dir}' is a {family.name} run; the Generate tab draws from text-to-image runs "
                           "and class-conditional diffusion runs")  # fmt: skip
    key = (family.name, tuple(str(p) for _, p in list_checkpoints(Path(run_dir) / "checkpoints")[-1:]))
    path = str(Path(run_dir).resolve())
    with _loading:
        if path not in _loaded or _loaded[path][0] != key:
            model, cfg = family.load(run_dir, device="cpu")
            if isinstance(model.conditioner, ControlledPrompts):
                raise DifflabError(f"'{run_dir}' is a ControlNet run, drawn under a condition image: use the "
                                   f'Control tab (or difflab generate {run_dir} "PROMPT" --control FILE)')  # fmt: skip
            _loaded[path] = (key, model, cfg)
        _, model, cfg = _loaded[path]
    return family, model, cfg


def run_settings(run_dir: str) -> tuple[str, int, float]:
    """The run's own sampler, steps and guidance (its config.json), without loading it."""
    sample = read_run_config(run_dir)[1].get("sample", {})
    return sample.get("sampler", "ddim"), int(sample.get("steps", 50)), float(sample.get("cfg_scale", 1.0))


def _world(cfg) -> WorldConfig | None:
    data = cfg.data
    return world_preset(data.world) if getattr(data, "dataset", "toy") == "toy" else None


def class_request(run_dir: str, cfg, prompt: str, n: int) -> torch.Tensor | None:
    """The class labels of a class-conditional toy-world run for ``prompt`` ('a red circle'), or None for an
    unconditional run (whose prompt must be empty)."""
    world = _world(cfg)
    if world is None:
        raise DifflabError(f"'{run_dir}' is trained on {cfg.data.dataset}; the Generate tab draws classes of "
                           f"the toy world (use: difflab sample {run_dir} --class K)")  # fmt: skip
    if not cfg.data.conditional:
        if prompt.strip():
            raise DifflabError(f"'{run_dir}' is unconditional; leave the prompt empty to draw from it")
        return None
    parsed = parse_prompt(prompt)
    spec = parsed.spec if isinstance(parsed, Exists) else None
    if (
        spec is None
        or spec.size
        or spec.position
        or spec.shape not in world.shapes
        or spec.color not in world.colors
    ):
        raise DifflabError(f"'{prompt}' names no class of '{run_dir}'; expected a colour ({', '.join(world.colors)}) "
                           f"and a shape ({', '.join(world.shapes)}) of its world, e.g. 'a {world.colors[0]} "
                           f"{world.shapes[0]}'")  # fmt: skip
    return torch.full((n,), world.class_index(spec.shape, spec.color))


def attention_recorder(run_dir: str, family, model, cfg) -> tuple[CrossAttentionMaps | None, str]:
    """A fresh :class:`CrossAttentionMaps` for a run that reads its prompt through cross-attention, or None and
    the one-line note that says why there are no maps (a class-conditional run; an MMDiT, which reads the text
    in its joint attention)."""
    if family.draws != "prompts":
        return None, (f"no cross-attention maps: '{run_dir}' is a class-conditional {family.name} run, which reads "
                      "a class label, not the words of a prompt")  # fmt: skip
    maps = CrossAttentionMaps(cfg.data.image_size)
    try:  # the library's own test for cross-attention layers; entering only sets and clears their hooks
        with maps.recording(model.network, 1):
            pass
    except DifflabError as err:
        return None, f"no cross-attention maps for '{run_dir}': {err}"
    return maps, ""


def prompt_tokens(model, prompt: str) -> tuple[str, ...]:
    """The tokens of ``prompt`` as the run's text encoder lays it out, each as its text: token j is column
    j + 1 of the attention (column 0 is ``<bos>``; ``<eos>`` and the padding follow the last token)."""
    tokenizer = model.conditioner.encoder.tokenizer
    ids, mask = tokenizer.encode(prompt)  # (1, L) each; mask True from <bos> to <eos>
    return tuple(tokenizer.decode(ids[0, j : j + 1]) for j in range(1, int(mask[0].sum()) - 1))


def generate_images(run_dir: str, prompt: str, *, n=4, sampler: str | None = None, steps=None, guidance=None,
                    seed=0, attention: bool = True) -> Generation:  # fmt: skip
    """``n`` images of ``prompt`` from ``run_dir`` (None settings: the run's), judged by the reader; with
    ``attention``, each image's cross-attention map per token of the prompt where the run has cross-attention
    (a run without it records nothing and samples as fast as ever)."""
    n = check_int("n", n, 1, MAX_IMAGES)
    seed = check_seed("seed", seed)
    prompt = prompt if isinstance(prompt, str) else ""
    family, model, cfg = load_run(run_dir)
    used = cfg.sample.resolve(sampler or None, steps, guidance)  # each checked as the CLI's flags are
    if family.draws == "prompts":
        if not prompt.strip():
            raise DifflabError("the prompt is empty; expected a description such as 'a red circle to the left "
                               "of a blue square'")  # fmt: skip
        request = [prompt.strip()] * n
    else:
        request = class_request(run_dir, cfg, prompt, n)
    maps, maps_note = attention_recorder(run_dir, family, model, cfg) if attention else (None, "")
    words = prompt_tokens(model, prompt.strip()) if maps is not None else ()
    recorder = TrajectoryRecorder(used.steps, frames=MAX_FRAMES, keep=n)
    start = time.perf_counter()
    images = generate(model, cfg, n, request, sampler=used.sampler, steps=used.steps, cfg_scale=used.cfg_scale,
                      seed=seed, callback=recorder, attention=maps)  # fmt: skip
    seconds = time.perf_counter() - start
    if maps is not None:
        maps = maps.maps()[:, 1 : 1 + len(words)].numpy()  # (N, T, H, W): the prompt's tokens alone
    tiles = to_uint8(images.cpu())
    world = _world(cfg)
    verdicts = judge(prompt, tiles, world) if world is not None and prompt.strip() else []
    frames = [
        (t, to_uint8(x), to_uint8(x0))
        for t, x, x0 in zip(recorder.ts, recorder.xs, recorder.x0s, strict=True)
    ]
    held = [v.holds for v in verdicts]
    judged = (f"; the reader finds the prompt true in {sum(h is True for h in held)} of {n}"
              if held and None not in held else "")  # fmt: skip
    summary = (
        f"{n} images of '{prompt.strip()}' from {run_dir} ({family.name}) in {seconds:.1f} s: "
        f"{used.sampler}, {used.steps} steps, guidance {used.cfg_scale:g}, seed {seed}{judged}"
    )
    return Generation(tiles, verdicts, frames, summary, words, maps, maps_note)


def word_maps(done: Generation, image: int = 0) -> list[tuple[str, np.ndarray]]:
    """(word, map (H, W)) for each token of the prompt in order, over image ``image`` of ``done``; an error
    naming the image when there is no such image, or no maps (``done.maps_note``)."""
    if done.maps is None:
        raise DifflabError(done.maps_note or "no cross-attention maps were recorded")
    image = check_int("image index", image, 0, len(done.maps) - 1)
    return list(zip(done.words, done.maps[image], strict=True))


def attention_tiles(done: Generation, image: int = 0) -> list[tuple[np.ndarray, str]]:
    """The gallery of image ``image``'s maps: the image itself, then one tile per word (viridis, each map over
    its own range as ``save_attention_overlays`` scales them: where that word is looked at most, whatever its
    share of the attention), captioned with the word."""
    tiles = [(enlarge(rgb(done.images[image]), side=96), f"image {image + 1}")]
    for word, heat in word_maps(done, image):
        lo, hi = float(heat.min()), float(heat.max())
        tiles.append((enlarge(colormapped((heat - lo) / max(hi - lo, 1e-12)), side=96), word))
    return tiles


def trajectory_picture(frames, index: int) -> tuple[np.ndarray, str]:
    """Frame ``index`` of a trajectory: x_t of every image in the top row, x̂₀ in the bottom row."""
    t, xs, x0s = frames[int(np.clip(index, 0, len(frames) - 1))]
    picture = enlarge(strip([list(xs), list(x0s)]), side=128 * max(len(xs), 1))
    return picture, f"step {int(np.clip(index, 0, len(frames) - 1)) + 1} of {len(frames)} recorded: t = {t}"


def sampling_controls(max_images: int) -> tuple:
    """The inputs of a tab that draws with a run's sampler (Generate, Control), laid out in the current row:
    sampler, steps and guidance (empty: the run's own, filled in when the run is chosen), seed, images."""
    import gradio as gr

    sampler = gr.Dropdown(["", *SAMPLERS], value="", label="sampler", info="the run's own when it is chosen")
    steps = gr.Number(None, precision=0, label="steps")
    guidance = gr.Number(None, label=f"guidance ({GUIDANCE_RANGE[0]:g}-{GUIDANCE_RANGE[1]:g}; 1: none)")
    seed = gr.Number(0, precision=0, label="seed")
    n = gr.Slider(1, max_images, value=4, step=1, label="images")
    return sampler, steps, guidance, seed, n


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page``; ``runs`` are the command line's RUNs."""
    import gradio as gr

    first = runs[0] if runs else None
    with gr.Row():
        run = gr.Dropdown(runs, value=first, label="run directory", allow_custom_value=True, scale=2,
                          info="a text-to-image run, or a class-conditional run of the toy world")  # fmt: skip
        prompt = gr.Textbox(label="prompt", placeholder="a red circle to the left of a blue square", scale=3,
                            elem_id="generate-prompt")  # fmt: skip
    with gr.Row():
        sampler, steps, guidance, seed, n = sampling_controls(MAX_IMAGES)
        go = gr.Button("Generate", variant="primary", elem_id="generate-go")
    status = gr.HTML(elem_id="generate-status")
    gallery = gr.Gallery(label="images, each with the reader's verdict", columns=8, format="png", height=300,
                         elem_id="generate-gallery", elem_classes="difflab-pixels")  # fmt: skip
    verdicts = gr.HTML(elem_id="generate-verdicts")
    with gr.Row():
        which = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="cross-attention maps of image", scale=1,
                          elem_id="generate-attention-image")  # fmt: skip
        maps_note = gr.HTML(elem_id="generate-attention-note")
    maps = gr.Gallery(label="where each word of the prompt is looked at: the image, then one cross-attention map "
                      "per word (the mean over heads, layers and steps; each map over its own range, bright: most)",
                      columns=12, format="png", height=160, elem_id="generate-attention",
                      elem_classes="difflab-pixels")  # fmt: skip
    drawn = gr.State(None)
    frame = gr.Slider(1, MAX_FRAMES, value=1, step=1, label="denoising step (x_t above, the model's x̂₀ below)",
                      elem_id="generate-step")  # fmt: skip
    trajectory = gr.Image(
        label="trajectory", format="png", elem_id="generate-trajectory", elem_classes="difflab-pixels"
    )
    frames = gr.State([])

    def on_run(run_dir):
        try:
            s, k, w = run_settings(run_dir)
        except DifflabError as err:
            return error_html(err), gr.skip(), gr.skip(), gr.skip()
        return (
            note_html(f"{run_dir}: samples with {s}, {k} steps, guidance {w:g} unless told otherwise"),
            s,
            k,
            w,
        )

    def on_generate(run_dir, prompt, sampler, steps, guidance, seed, n):
        try:
            done = generate_images(
                run_dir, prompt, n=n, sampler=sampler, steps=steps, guidance=guidance, seed=seed
            )
        except DifflabError as err:
            return error_html(err), None, "", [], gr.update(value=1), None, None, gr.update(value=1), "", []
        tiles = [(enlarge(rgb(t)), v.caption() if v else "") for t, v in
                 zip(done.images, done.verdicts or [None] * len(done.images), strict=True)]  # fmt: skip
        listed = "".join(
            f"<li>image {i + 1}: {html.escape(v.caption())}</li>" for i, v in enumerate(done.verdicts)
        )
        last = len(done.frames)
        kept = dataclasses.replace(done, frames=[])  # the maps' state: the trajectory has its own
        return (note_html(done.summary), tiles, f"<ul class='difflab-verdicts'>{listed}</ul>", done.frames,
                gr.update(minimum=1, maximum=max(last, 2), value=last), on_frame(done.frames, last), kept,
                gr.update(maximum=max(len(done.images), 2), value=1), *on_image(kept, 1))  # fmt: skip

    def on_image(done, index):
        if done is None:
            return "", []
        if done.maps is None:
            return note_html(done.maps_note), []
        index = int(np.clip(int(index), 1, len(done.images)))
        shown = note_html(
            f"image {index}: its cross-attention to each of the prompt's {len(done.words)} tokens"
        )
        return shown, attention_tiles(done, index - 1)

    def on_frame(frames, index):
        if not frames:
            return None
        picture, label = trajectory_picture(frames, int(index) - 1)
        return gr.update(value=picture, label=f"trajectory: {label}")

    run.change(on_run, [run], [status, sampler, steps, guidance])
    if first is not None:
        page.load(on_run, [run], [status, sampler, steps, guidance])
    drawing = [status, gallery, verdicts, frames, frame, trajectory, drawn, which, maps_note, maps]
    go.click(on_generate, [run, prompt, sampler, steps, guidance, seed, n], drawing)
    prompt.submit(on_generate, [run, prompt, sampler, steps, guidance, seed, n], drawing)
    frame.change(on_frame, [frames, frame], [trajectory])
    which.input(on_image, [drawn, which], [maps_note, maps])
