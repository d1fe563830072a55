"""Editing given images, judged exactly: inversion's reconstruction, then word swaps of the inverted image.

The images are rendered world scenes the model never drew (seed :data:`EVAL_SEED`), each described by its
objects' colour and shape in reading order ('a red circle and a blue square'; a lone object's size half the
time). For each:

- **reconstruction**, before any edit: the autoencoder's own round trip (the ceiling), DDIM inversion alone
  redrawn under the run's guidance, and null-text inversion redrawn the same way. PSNR against the image, and
  whether the reader reads the redrawn image as the same scene;
- **a word swap** of the description (as :mod:`difflab.models.p2p_eval` draws them), by Prompt-to-Prompt
  from the null-text inversion, and by the naive baseline: the edited prompt redrawn from the same inverted
  noise and null conditions with nothing injected. Judged by :func:`difflab.models.p2p_eval.judge` against
  the image's own reading.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from difflab.data.toy import scene_image
from difflab.models import inversion as inv
from difflab.models.p2p import P2PEdit, naive, prompt_to_prompt
from difflab.models.p2p_eval import SwapCase, judge, psnr, summarise, swap_in
from difflab.world.prompts import spec_of
from difflab.world.reader import read
from difflab.world.scene import Scene, WorldConfig, scene_at

EVAL_SEED = 90_001


def cases(world: WorldConfig, n: int, seed: int = EVAL_SEED) -> list[tuple[Scene, SwapCase]]:
    """``n`` (scene, swap) pairs; the swap's source prompt describes the scene."""
    rng = np.random.default_rng(seed)
    out = []
    i = 0
    while len(out) < n:
        scene = scene_at(world, seed, i)
        i += 1
        objects = sorted(scene.objects, key=lambda o: o.cell)
        attributes = ("shape", "color", "size") if len(objects) == 1 and rng.random() < 0.5 else ("shape", "color")
        case = swap_in([spec_of(o, attributes) for o in objects], world, rng)
        if case is not None:
            out.append((scene, case))
    return out


def evaluate(system, cfg, world: WorldConfig, n: int, *, seed: int = EVAL_SEED, progress: bool = False,
             **options) -> dict:  # fmt: skip
    """The report of the module docstring over ``n`` images; ``options`` go to null-text inversion
    (iterations, lr)."""
    rows = {"codec": [], "ddim": [], "null_text": []}
    verdicts = {"p2p": [], "naive": []}
    swaps = []
    for scene, case in tqdm(cases(world, n, seed), desc="inverting", disable=not progress, leave=False):
        image = scene_image(scene, world)[None]  # (1, 3, H, W) in [-1, 1]
        truth = read(image[0], world)
        prompt = case.source.text()
        codec = system.codec.decode(system.codec.encode(image))
        plain = inv.ddim_invert(system, cfg, image, prompt)
        ddim = inv.redraw(system, cfg, plain)
        inverted = inv.optimise_nulls(system, cfg, plain, **options)
        redrawn = inv.redraw(system, cfg, inverted)
        for key, picture in (("codec", codec), ("ddim", ddim), ("null_text", redrawn)):
            rows[key].append((psnr(picture[0], image[0]), read(picture[0].cpu(), world).keys() == truth.keys()))
        edit = P2PEdit(prompt, case.target.text())
        _, edited = prompt_to_prompt(system, cfg, [edit], inversion=inverted)
        _, regenerated = prompt_to_prompt(system, cfg, [naive(edit)], inversion=inverted)
        verdicts["p2p"].append(judge(case, truth, read(edited[0].cpu(), world), (image[0], edited[0].cpu()), world))
        verdicts["naive"].append(judge(case, truth, read(regenerated[0].cpu(), world),
                                       (image[0], regenerated[0].cpu()), world))  # fmt: skip
        swaps.append(case)
    reconstruction = {k: {"psnr": sum(p for p, _ in v) / n, "same_scene": sum(s for _, s in v) / n}
                      for k, v in rows.items()}  # fmt: skip
    return {"n": n, "seed": seed, "reconstruction": reconstruction,
            "p2p": summarise(swaps, verdicts["p2p"]), "naive": summarise(swaps, verdicts["naive"])}  # fmt: skip
