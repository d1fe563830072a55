"""Judging a CLIP model on held-out toy scenes: zero-shot classification, retrieval, CLIP score and
attribute binding. Every number comes with the count it was measured on.

Held-out means drawn with another seed than any training set (``HELD_OUT_SEED`` + ``seed``); the
world is the run's training world (for zero-shot, its one-object version).

- **Zero-shot classification** (Radford et al. 2021, Sec. 3.1): a class is represented by the normalised
  mean of the embeddings of several prompts that name it ("prompt ensembling", Sec. 3.1.4); for colour
  c the prompts name c with every shape and size ('a red circle', 'a small red square', ...), for shape s
  with every colour and size. An image gets the class whose embedding is most similar. The (colour,
  shape) pair is classified too, with one prompt per pair ('a red circle').
- **Retrieval**: groups of 100 scenes of one or two objects; the text of a scene is its full description
  ('a small red circle at the top left and a large blue square in the center'). text -> image recall@k:
  the share of descriptions whose image is among the k most similar images of the group (and image ->
  text the other way). Two one-object scenes of a group can share a description (720 exist); a retrieved
  scene whose description is the query's counts as a hit, because the text is exactly as true of it.
- **CLIP score** (Hessel et al. 2021), scaled as torchmetrics does: 100 * max(cos(image, text), 0), over
  matched (image, description) pairs, and over mismatched pairs (each image with the next one's
  description) as the floor it should clear.
- **Attribute binding**: scenes of two objects that differ in colour and in shape (a red circle and a blue
  square). The model must score 'a red circle and a blue square' above 'a blue circle and a red square',
  which has the same words; chance is 0.5. As a control, the same scenes against a caption that swaps in
  a colour absent from the scene: that needs no binding, only colour detection.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from difflab.data.toy import scene_image
from difflab.errors import DifflabError
from difflab.viz import save_figure
from difflab.world.language import caption, describe, description
from difflab.world.prompts import Conjunction, ObjectSpec
from difflab.world.render import render
from difflab.world.scene import Scene, WorldConfig, scene_at, world_preset

HELD_OUT_SEED = 1_000_003
GROUP = 100


def images_of(scenes: list[Scene], cfg: WorldConfig) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1], rendered exactly as the training set is."""
    return torch.stack([scene_image(s, cfg) for s in scenes])


def held_out_scenes(cfg: WorldConfig, n: int, seed: int, keep=None) -> list[Scene]:
    """The first ``n`` held-out scenes of ``cfg`` (those ``keep`` accepts, when given)."""
    out, i = [], 0
    while len(out) < n:
        scene = scene_at(cfg, HELD_OUT_SEED + seed, i)
        i += 1
        if keep is None or keep(scene):
            out.append(scene)
        if i > 1000 * n:
            raise DifflabError(f"could not draw {n} held-out scenes of the requested kind from this world")
    return out


def _class_embeddings(encoder, prompt_sets: list[list[str]]) -> torch.Tensor:
    """One unit vector per class: the normalised mean of its prompts' embeddings (Sec. 3.1.4)."""
    flat = [p for prompts in prompt_sets for p in prompts]
    emb = encoder.embed_texts(flat)
    out, start = [], 0
    for prompts in prompt_sets:
        out.append(emb[start : start + len(prompts)].mean(0))
        start += len(prompts)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def zero_shot(encoder, world: WorldConfig, n: int, seed: int = 0) -> dict:
    """Colour, shape and (colour, shape) accuracy on ``n`` held-out one-object scenes."""
    single = dataclasses.replace(world, min_objects=1, max_objects=1)
    scenes = held_out_scenes(single, n, seed)
    image_emb = encoder.embed_images(images_of(scenes, single))
    sizes = (None, *world.sizes)
    colour_prompts = [
        [ObjectSpec(color=c, shape=s, size=z).noun("a") for s in world.shapes for z in sizes]
        for c in world.colors
    ]
    shape_prompts = [
        [ObjectSpec(color=c, shape=s, size=z).noun("a") for c in (None, *world.colors) for z in sizes]
        for s in world.shapes
    ]
    pair_prompts = [[ObjectSpec(color=c, shape=s).noun("a")] for s in world.shapes for c in world.colors]
    truth_colour = torch.tensor([world.colors.index(s.objects[0].color) for s in scenes])
    truth_shape = torch.tensor([world.shapes.index(s.objects[0].shape) for s in scenes])
    truth_pair = truth_shape * len(world.colors) + truth_colour

    def accuracy(prompt_sets, truth) -> float:
        pred = (image_emb @ _class_embeddings(encoder, prompt_sets).T).argmax(dim=1)
        return float((pred == truth).float().mean())

    return {
        "n": n,
        "color_accuracy": accuracy(colour_prompts, truth_colour),
        "shape_accuracy": accuracy(shape_prompts, truth_shape),
        "color_shape_accuracy": accuracy(pair_prompts, truth_pair),
        "classes": {"color": len(world.colors), "shape": len(world.shapes), "color_shape": len(pair_prompts)},
    }


def _recall(sim: torch.Tensor, same: torch.Tensor, k: int) -> float:
    """Share of rows whose k most similar columns include a right one (``same[i, j]``: j is right for i)."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (N, k)
    return float(same.gather(1, top).any(dim=1).float().mean())


def retrieval(encoder, world: WorldConfig, n: int, seed: int = 0) -> dict:
    """Recall@1 and @5 in both directions, averaged over ``n // 100`` groups of 100 held-out scenes."""
    groups = max(n // GROUP, 1)
    scenes = held_out_scenes(world, groups * GROUP, seed + 1)
    texts = [describe(s) for s in scenes]
    image_emb, text_emb = encoder.embed_images(images_of(scenes, world)), encoder.embed_texts(texts)
    sums = {
        "text_to_image_r1": 0.0,
        "text_to_image_r5": 0.0,
        "image_to_text_r1": 0.0,
        "image_to_text_r5": 0.0,
    }
    for g in range(groups):
        part = slice(g * GROUP, (g + 1) * GROUP)
        sim = image_emb[part] @ text_emb[part].T  # (images, texts)
        t = texts[part]
        same = torch.tensor([[a == b for b in t] for a in t])  # (100, 100), symmetric
        for k in (1, 5):
            sums[f"text_to_image_r{k}"] += _recall(sim.T, same, k)
            sums[f"image_to_text_r{k}"] += _recall(sim, same, k)
    matched = (image_emb * text_emb).sum(dim=1)
    mismatched = (image_emb * text_emb.roll(1, dims=0)).sum(dim=1)
    report = {k: v / groups for k, v in sums.items()}
    report.update(
        groups=groups,
        group_size=GROUP,
        clip_score=float(100 * matched.clamp(min=0).mean()),
        clip_score_mismatched=float(100 * mismatched.clamp(min=0).mean()),
    )
    return report


def binding(encoder, world: WorldConfig, n: int, seed: int = 0) -> dict:
    """Pairing accuracy on ``n`` two-object scenes (see the module docstring)."""
    if world.max_objects < 2 or len(world.colors) < 3 or len(world.shapes) < 2:
        return {"n": 0, "note": "the world has no two-object scenes with three colours to test binding on"}

    def distinct(scene: Scene) -> bool:
        objs = scene.objects
        return len(objs) == 2 and objs[0].color != objs[1].color and objs[0].shape != objs[1].shape

    scenes = held_out_scenes(world, n, seed + 2, keep=distinct)
    rng = np.random.default_rng(seed)
    true, swapped, absent = [], [], []
    for s in scenes:
        a, b = s.objects
        true.append(
            Conjunction((ObjectSpec(color=a.color, shape=a.shape), ObjectSpec(color=b.color, shape=b.shape)))
        )
        swapped.append(
            Conjunction((ObjectSpec(color=b.color, shape=a.shape), ObjectSpec(color=a.color, shape=b.shape)))
        )
        others = [c for c in world.colors if c not in (a.color, b.color)]
        c = others[int(rng.integers(len(others)))]
        absent.append(
            Conjunction((ObjectSpec(color=c, shape=a.shape), ObjectSpec(color=b.color, shape=b.shape)))
        )
    image_emb = encoder.embed_images(images_of(scenes, world))

    def score(prompts) -> torch.Tensor:
        return (image_emb * encoder.embed_texts([p.text() for p in prompts])).sum(dim=1)

    s_true = score(true)
    return {
        "n": n,
        "swapped_pairing_accuracy": float((s_true > score(swapped)).float().mean()),
        "absent_colour_accuracy": float((s_true > score(absent)).float().mean()),
    }


def evaluate(
    encoder, cfg, run_dir: str | Path, n: int = 500, seed: int = 0, plot: str | Path | None = None
) -> dict:
    """Every CLIP measurement of a trained run (``encoder``, an :class:`~difflab.models.clip.ImageTextEncoder`
    of it, and ``cfg`` its record), as one JSON-able dict (and the retrieval figure at ``plot``, when given)."""
    world = world_preset(cfg.data.world)
    if plot is not None:
        retrieval_figure(encoder, world, plot, seed)
    return {
        "run": str(run_dir),
        "world": cfg.data.world,
        "logit_scale": encoder.logit_scale,
        "zero_shot": zero_shot(encoder, world, n, seed),
        "retrieval": retrieval(encoder, world, n, seed),
        "binding": binding(encoder, world, n, seed),
    }


def retrieval_figure(encoder, world: WorldConfig, out: str | Path, seed: int = 0, k: int = 5) -> Path:
    """Text -> image search among 100 held-out scenes, drawn: one row per query (three full descriptions
    and three short captions of other styles), its ``k`` most similar scenes left to right with their
    cosines, framed green where the query holds in the scene (the world's own truth) and red where not."""
    matplotlib.use("Agg")  # files only, whatever backend the caller's session has

    scenes = held_out_scenes(world, GROUP, seed + 1)
    image_emb = encoder.embed_images(images_of(scenes, world))
    rng = np.random.default_rng(seed)
    prompts = [description(s) for s in scenes[:3]]
    styles = ("count", "relation", "pair") if world.max_objects >= 2 else ("object", "count", "object")
    for j, style in enumerate(styles):
        candidates = [
            s for s in scenes[3 + j :] if len(s.objects) >= (2 if style in ("relation", "pair") else 1)
        ]
        prompts.append(caption(candidates[0], rng, style=style)[1])
    sims = encoder.embed_texts([p.text() for p in prompts]) @ image_emb.T  # (queries, 100)
    fig, axes = plt.subplots(len(prompts), k + 1, figsize=(1.5 * (k + 1) + 1.5, 1.6 * len(prompts)),
                             gridspec_kw={"width_ratios": [2.5] + [1] * k}, squeeze=False)  # fmt: skip
    for row, prompt in enumerate(prompts):
        text_ax = axes[row, 0]
        text_ax.axis("off")
        text_ax.text(0, 0.5, "\n".join(textwrap.wrap(prompt.text(), 30)), va="center", fontsize=8)
        top = sims[row].topk(k)
        for col, (value, index) in enumerate(zip(top.values, top.indices, strict=True), start=1):
            ax = axes[row, col]
            scene = scenes[int(index)]
            ax.imshow(render(scene, world).image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "tab:green" if prompt.holds(scene) else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"{float(value):.2f}", fontsize=7)
    fig.suptitle(
        f"text -> image among {GROUP} held-out scenes (green: the text holds in the scene)", fontsize=9
    )
    return save_figure(fig, out)
