"""Instructed edits judged exactly: did the asked change happen, and did everything else stay?

A case is a rendered world scene the editor never trained on (seed :data:`EVAL_SEED`; no held-out colour on
a shape), one of the world's edits of it (recolour, move, remove or add: :func:`difflab.world.edits.edit_at`)
and the scene the edit asks for. The reader reads the editor's output, and:

- **success**: the output reads as the asked-for scene, every object in it (:func:`~difflab.world.edits.
  edit_holds`: the named object changed as told, nothing else changed, appeared or vanished);
- **preserved**: every object the instruction does not name is still there with its shape, colour, size
  and cell (what an edit must not touch, whatever it did to the named one);
- **psnr background**: PSNR (dB) between input and output over the pixels that are background in both the
  input scene and the asked-for one (what nobody asked to change, pixel by pixel).

The naive baseline draws the asked-for scene's full description ('a large red circle at the top left')
with the base text-to-image model: an editor that cannot see the input, the floor an editor must beat.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.data.toy import scene_image
from difflab.errors import DifflabError
from difflab.models.conditioners import Instructions
from difflab.models.p2p_eval import psnr
from difflab.viz import save_captioned_grid
from difflab.world.edits import EDIT_KINDS, Edit, edit_at, edit_holds
from difflab.world.geneval import mentions_heldout
from difflab.world.language import describe
from difflab.world.prompts import matches
from difflab.world.reader import read
from difflab.world.render import render
from difflab.world.scene import Scene, WorldConfig, scene_at

EVAL_SEED = 70_001
"""The seed of the evaluation's scenes and edits (the training edits use the base's scenes, seed 0)."""


@dataclass(frozen=True)
class EditCase:
    before: Scene
    edit: Edit
    after: Scene
    """The scene the instruction asks for: ``before`` with ``edit`` carried out."""


def edit_cases(world: WorldConfig, n: int, seed: int = EVAL_SEED, heldout=()) -> list[EditCase]:
    """``n`` cases: scene i of ``seed`` (skipped while it shows a ``heldout`` pair) and its edit i."""
    cases, i = [], 0
    while len(cases) < n:
        scene = scene_at(world, seed, i)
        if not mentions_heldout(scene, heldout):
            cases.append(EditCase(scene, *edit_at(scene, world, seed, i, heldout)))
        i += 1
    return cases


def request(cases: list[EditCase], world: WorldConfig) -> Instructions:
    """The cases as an editing request: each instruction with its input scene, rendered."""
    return Instructions(
        [c.edit.text() for c in cases], torch.stack([scene_image(c.before, world) for c in cases])
    )


def _unnamed(case: EditCase) -> Counter:
    """The keys of the input's objects the instruction does not name (all of them for 'add')."""
    objects = list(case.before.objects)
    if case.edit.kind != "add":
        named = [o for o in objects if matches(case.edit.target, o)]
        if len(named) == 1:
            objects.remove(named[0])
    return Counter(o.key() for o in objects)


def background(case: EditCase, world: WorldConfig) -> torch.Tensor:
    """(H, W) True where the input scene and the asked-for scene both show background (a pixel's way from
    every object's outline, so anti-aliased rims do not count)."""
    free = (render(case.before, world).mask == 0) & (render(case.after, world).mask == 0)
    grown = np.pad(~free, 1)  # an object pixel's neighbours are not background either
    near = grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:] | ~free
    return torch.from_numpy(~near)


def judge(case: EditCase, image: torch.Tensor, world: WorldConfig) -> dict:
    """``{"success", "preserved", "psnr_background"}`` of one output image (C, H, W) in [-1, 1]."""
    seen = read(image, world)
    left = Counter(seen.keys())
    preserved = all(left[k] >= c for k, c in _unnamed(case).items())
    free = background(case, world)
    source = scene_image(case.before, world)
    return {"success": edit_holds(case.edit, case.before, seen), "preserved": preserved,
            "psnr_background": psnr(source[:, free], image[:, free])}  # fmt: skip


def judge_all(cases: list[EditCase], images: torch.Tensor, world: WorldConfig) -> list[dict]:
    """:func:`judge` of image i (N, C, H, W) against case i."""
    return [judge(c, image, world) for c, image in zip(cases, images.cpu(), strict=True)]


def summarise(cases: list[EditCase], verdicts: list[dict]) -> dict:
    """Rates overall and per kind of edit, with their n."""

    def rates(chosen: list[dict]) -> dict:
        out = {"n": len(chosen)}
        for key in ("success", "preserved", "psnr_background"):
            out[key] = sum(v[key] for v in chosen) / len(chosen) if chosen else None
        return out

    kinds = {k: [v for c, v in zip(cases, verdicts, strict=True) if c.edit.kind == k] for k in EDIT_KINDS}
    return {"all": rates(verdicts)} | {k: rates(v) for k, v in kinds.items() if v}


def evaluate(editor, cfg, n: int, *, seed: int = 0, case_seed: int = EVAL_SEED, baseline: bool = True,
             p2p: bool = False, device: str = "cpu", progress: bool = False, **editing) -> dict:  # fmt: skip
    """An editor on ``n`` held-out edits, and with ``baseline`` the naive regeneration by its base and the
    codec's ceiling (the asked-for scenes through the base's autoencoder, :func:`through_codec`).
    ``editor(request, seed) -> images`` edits (:func:`difflab.models.instruct.evaluate_editor` binds a loaded
    run to it); ``cfg`` is its record; ``editing`` (image_scale, text_scale, sampler, steps) is reported, and
    its sampler and steps are the baseline's. ``p2p``: also the recolours by Prompt-to-Prompt on the base
    (:func:`prompt_to_prompt_recolours`)."""
    from difflab.models import t2i

    if n < 1:
        raise DifflabError(f"n {n} is invalid; expected at least one case")
    world = cfg.data.world_config()
    cases = edit_cases(world, n, case_seed, cfg.data.pairs())
    edits = editor(request(cases, world), seed)
    report = {"n": n, "settings": _settings(cfg, seed, case_seed, editing),
              "instruct": summarise(cases, judge_all(cases, edits, world))}  # fmt: skip
    if baseline or p2p:
        base, base_cfg = t2i.load_model(cfg.base, device=device)
    if baseline:
        sampling = {k: editing[k] for k in ("sampler", "steps") if editing.get(k) is not None}
        drawn = t2i.generate(base, base_cfg, [describe(c.after) for c in cases], seed=seed, **sampling)
        report["naive"] = summarise(cases, judge_all(cases, drawn, world))
        report["codec"] = summarise(cases, judge_all(cases, through_codec(base.codec, cases, world), world))
    if p2p:
        recolours = [c for c in cases if c.edit.kind == "recolor"]
        report["p2p"] = summarise(recolours, prompt_to_prompt_recolours(base, base_cfg, recolours, progress=progress))
    return report


@torch.no_grad()
def through_codec(codec, cases: list[EditCase], world: WorldConfig, batch_size: int = 256) -> torch.Tensor:
    """The asked-for scenes, rendered exactly and passed through the base's codec (encode, then decode): a
    perfect editor's output once it lives in the base's latents, so the ceiling of any editor of this base.
    Pixels pass unchanged; an autoencoder blurs small shapes (docs/editing.md)."""
    device = next(codec.parameters(), torch.zeros(())).device
    target = torch.stack([scene_image(c.after, world) for c in cases])  # (N, C, H, W)
    parts = [codec.decode(codec.encode(target[i : i + batch_size].to(device))).cpu()
             for i in range(0, len(target), batch_size)]  # fmt: skip
    return torch.cat(parts)


def prompt_to_prompt_recolours(base, base_cfg, cases: list[EditCase], *, progress: bool = False) -> list[dict]:
    """The verdicts of Prompt-to-Prompt on recolour cases, the one kind of instructed edit that is a word swap:
    each input is inverted under its full description (null-text inversion, :mod:`difflab.models.inversion`)
    and redrawn with the recoloured description, which differs in the colour word alone."""
    from difflab.models import inversion as inv
    from difflab.models.p2p import P2PEdit, prompt_to_prompt

    world, verdicts = base_cfg.data.world_config(), []
    device = next(base.network.parameters()).device
    for case in tqdm(cases, desc="inverting", disable=not progress, leave=False):
        if case.edit.kind != "recolor":
            raise DifflabError(f"Prompt-to-Prompt here takes recolours (word swaps); got a '{case.edit.kind}' edit")
        image = scene_image(case.before, world)[None].to(device)
        inverted = inv.optimise_nulls(base, base_cfg, inv.ddim_invert(base, base_cfg, image, describe(case.before)))
        _, edited = prompt_to_prompt(base, base_cfg, [P2PEdit(describe(case.before), describe(case.after))],
                                     inversion=inverted)  # fmt: skip
        verdicts.append(judge(case, edited[0].cpu(), world))
    return verdicts


def _settings(cfg, seed: int, case_seed: int, editing: dict) -> dict:
    s = cfg.sample.resolve(editing.get("sampler"), editing.get("steps"), editing.get("text_scale"))
    image_scale = editing.get("image_scale")
    return {"sampler": s.sampler, "steps": s.steps, "text_scale": s.cfg_scale,
            "image_scale": cfg.image_scale if image_scale is None else image_scale, "seed": seed,
            "case_seed": case_seed}  # fmt: skip


def save_examples(cases: list[EditCase], images: torch.Tensor, verdicts: list[dict], world: WorldConfig,
                  path: str | Path) -> Path:  # fmt: skip
    """Input | edit pairs under their instructions, the edit's caption green where it succeeded."""
    inputs = torch.stack([scene_image(c.before, world) for c in cases])
    tiles = torch.stack([t for pair in zip(inputs, images, strict=True) for t in pair])
    captions = [t for c in cases for t in ("input", c.edit.text())]
    marks = [m for v in verdicts for m in (True, v["success"])]
    return save_captioned_grid(tiles, captions, path, ncol=4, marks=marks)


def plot_tradeoff(reports: list[dict], path: str | Path) -> Path:
    """The paper's Fig. 10 with exact axes: edit success (how strongly the instruction is followed) against
    background PSNR (how consistent the output stays with the input), one line per s_T over s_I."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.viz import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s_t in sorted({r["settings"]["text_scale"] for r in reports}):
        line = sorted((r["settings"]["image_scale"], r["instruct"]["all"]) for r in reports
                      if r["settings"]["text_scale"] == s_t)  # fmt: skip
        ax.plot([a["success"] for _, a in line], [a["psnr_background"] for _, a in line], "o-", label=f"s_T = {s_t}")
        for s_i, a in line:
            ax.annotate(f"s_I {s_i}", (a["success"], a["psnr_background"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    naive = next((r["naive"]["all"] for r in reports if "naive" in r), None)
    if naive is not None:
        ax.plot([naive["success"]], [naive["psnr_background"]], "kx", label="naive (regenerated)")
    ax.set_xlabel("edit success (the reader reads the asked-for scene)")
    ax.set_ylabel("background PSNR to the input (dB)")
    ax.set_title(f"InstructPix2Pix: s_I x s_T, n = {reports[0]['n']}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
