"""Judging a depth estimator exactly, as Marigold's paper does (Ke et al. 2024, Sec. 4.1): the estimate is
affine-invariant, so each is first aligned to the true depth by least-squares scale and shift, then scored by

    AbsRel = mean |d_hat - d| / d            delta1 = share of pixels with max(d_hat / d, d / d_hat) < 1.25

over every pixel (the world's depth is exact everywhere, the sky at the far plane), and by the order of
every pair of objects (each object's median depth over its visible pixels: which is nearer?) that does
not stand level (:data:`LEVEL`).

Beside the estimator, the same scenes through three references that need no training: each image's **mean
depth** (a constant, aligned), the **empty world**
(the ground's depth with no objects, aligned per image: what knowing the camera alone is worth) and the
**autoencoder ceiling** (the true depth encoded and decoded by the base's frozen autoencoder: the best a
latent estimator can do).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

from difflab.models.depth_align import abs_rel, align_scale_shift, delta1, normalize_depth, pair_order_counts
from difflab.viz import save_captioned_grid
from difflab.world.render import render
from difflab.world.scene import Scene, scene_at

LEVEL = 0.01
"""Two objects whose true depths differ by less than 1 % of the nearer one's stand level: their order is
not scored in ``pair_order`` (it is in ``pair_order_all``). Such pairs stand side by side in one row of the
ground, 0.2 % or less apart; an estimator that draws them level is right."""
EVAL_SEED = 90_001
"""Held-out scenes: the world's scenes of this seed (the training set is the base's, seed 0)."""


def depth_image(depth: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A depth map (H, W) as the autoencoder sees an image (Marigold, Sec. 3.2): normalised affine-invariantly
    (Eq. 3), clipped to [-1, 1] and replicated to three channels, (3, H, W)."""
    d = torch.as_tensor(np.asarray(depth), dtype=torch.float32)[None]  # (1, H, W)
    normalized, _ = normalize_depth(d)
    return normalized.clamp(-1, 1).expand(3, -1, -1).contiguous()


def eval_scenes(world, n: int, seed: int = 0) -> list[Scene]:
    return [scene_at(world, EVAL_SEED + seed, i) for i in range(n)]


def held_out(world, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out scenes ``0..n-1`` of ``seed`` rendered: images (N, 3, H, W) in [-1, 1], their true depth
    (N, H, W) and instance masks (N, H, W)."""
    drawn = [render(s, world) for s in eval_scenes(world, n, seed)]
    images = torch.from_numpy(np.stack([r.image for r in drawn])).permute(0, 3, 1, 2) * 2 - 1
    return images, *(torch.from_numpy(np.stack([getattr(r, f) for r in drawn])) for f in ("depth", "mask"))


def grid_images(cfg) -> torch.Tensor:
    """The training grid's images: the first ``sample.grid`` held-out scenes."""
    return held_out(cfg.data.world_config(), cfg.sample.grid)[0]


def colorize(depth: torch.Tensor) -> torch.Tensor:
    """Depth maps (N, H, W), larger farther, as colour images (N, 3, H, W) in [-1, 1]: each map stretched to
    its own range and coloured with matplotlib's 'Spectral' (near red, far blue; Marigold's figures)."""
    d = depth.double()
    lo, hi = d.amin(dim=(1, 2), keepdim=True), d.amax(dim=(1, 2), keepdim=True)
    unit = ((d - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    rgb = matplotlib.colormaps["Spectral"](unit)[..., :3]  # (N, H, W, 3)
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() * 2 - 1


def grid_panels(images: torch.Tensor, depth: torch.Tensor, truth: torch.Tensor | None = None) -> torch.Tensor:
    """Image | estimate (| truth) for each image, interleaved: (k N, 3, H, W) for a grid of k columns."""
    columns = [images, colorize(depth)] + ([colorize(truth)] if truth is not None else [])
    return torch.stack(columns, dim=1).flatten(0, 1)


def save_examples(images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, path) -> Path:
    """Image | true depth | estimate (aligned to the truth by least squares) | relative error |d_hat - d| / d,
    one scene per row, captioned with its AbsRel. Truth and estimate share each scene's colour range; the
    error is grey, black at 0 and white at 10 % or more."""
    aligned, _, _ = align_scale_shift(pred.double(), truth.double())
    error = (aligned - truth).abs() / truth
    lo, hi = truth.amin(dim=(1, 2), keepdim=True), truth.amax(dim=(1, 2), keepdim=True)
    tiles, captions = [], []
    for i in range(len(images)):
        both = colorize(torch.stack([truth[i], aligned[i].float().clamp(lo[i, 0, 0], hi[i, 0, 0])]))
        err = (error[i].float() / 0.1).clamp(0, 1).expand(3, -1, -1) * 2 - 1  # (3, H, W)
        tiles += [images[i], both[0], both[1], err]
        captions += ["image", "truth", "estimate", f"error (AbsRel {error[i].mean():.3f})"]
    return save_captioned_grid(torch.stack(tiles), captions, path, ncol=4)


def score(pred: torch.Tensor, truth: torch.Tensor, masks: torch.Tensor) -> dict:
    """Per-image AbsRel and delta1 after least-squares alignment, and pair order: pred and truth (N, H, W),
    masks (N, H, W) the world's instance ids."""
    aligned, _, _ = align_scale_shift(pred.double(), truth.double())
    counts = {gap: np.sum([pair_order_counts(p, t, m, gap) for p, t, m in zip(pred, truth, masks, strict=True)],
                          axis=0) for gap in (LEVEL, 0.0)}  # fmt: skip
    rel = abs_rel(aligned, truth.double(), reduction="none")
    d1 = delta1(aligned, truth.double(), reduction="none")
    return {"abs_rel": rel, "delta1": d1,
            "pair_order": counts[LEVEL][0] / max(counts[LEVEL][1], 1), "pairs": int(counts[LEVEL][1]),
            "pair_order_all": counts[0.0][0] / max(counts[0.0][1], 1), "pairs_all": int(counts[0.0][1])}  # fmt: skip


def summary(scores: dict) -> dict:
    """Means with standard errors over images."""
    out = {}
    for key in ("abs_rel", "delta1"):
        v = scores[key].double()
        out[key] = round(v.mean().item(), 4)
        out[f"{key}_se"] = round((v.std() / max(len(v), 1) ** 0.5).item(), 4) if len(v) > 1 else 0.0
    return out | {k: round(scores[k], 4) if isinstance(scores[k], float) else scores[k]
                  for k in ("pair_order", "pairs", "pair_order_all", "pairs_all")}


def evaluate(estimator, codec, cfg, n: int, *, seed: int = 0, **sampling) -> dict:
    """``estimator(images) -> depth`` (:func:`difflab.models.depth.estimate` at the settings ``sampling``:
    steps, ensemble, sampler, spacing, None the run's) on ``n`` held-out scenes, beside the empty world and
    the ceiling of ``codec`` (the base's autoencoder)."""
    world = cfg.data.world_config()
    images, truth, masks = held_out(world, n, seed)
    start = time.perf_counter()
    pred = estimator(images)
    seconds = (time.perf_counter() - start) / n
    empty = torch.from_numpy(render(Scene(()), world).depth).expand(n, -1, -1)
    mean = torch.zeros_like(truth)  # a constant: aligned, it is each image's mean depth
    with torch.no_grad():
        ceiling = codec.decode(codec.encode(torch.stack([depth_image(d) for d in truth]))).mean(dim=1)
    s = cfg.sample.resolve(sampling.get("sampler"), sampling.get("steps"), None, sampling.get("spacing"))
    one_step = cfg.objective == "end_to_end"
    return {
        "n": n,
        "objective": cfg.objective,
        "sampler": "one step at t = T - 1" if one_step else s.sampler,
        "steps": 1 if one_step else s.steps,
        "spacing": None if one_step else s.spacing,
        "ensemble": 1 if one_step else sampling.get("ensemble") or cfg.ensemble,
        **summary(score(pred, truth, masks)),
        "seconds_per_image": round(seconds, 4),
        "mean_depth": summary(score(mean, truth, masks)),
        "empty_world": summary(score(empty, truth, masks)),
        "autoencoder_ceiling": summary(score(ceiling, truth, masks)),
    }
