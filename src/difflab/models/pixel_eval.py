"""``difflab eval RUN_DIR``: score a pixel diffusion run with judges that are independent of it.

- toy world: the reader's class accuracy (exactly one object, with the requested shape and colour);
- digits: the accuracy of an SVC trained on real digits (its held-out accuracy on real digits is
  reported beside it, so the judge is measured too);
- every dataset: the Fréchet distance to ``n`` real images in the pixels8 feature space
  (:mod:`difflab.eval.frechet`), with n stated.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from difflab.data.config import data_channels, held_out_images, num_classes
from difflab.errors import DifflabError
from difflab.eval.conditional import DigitsJudge, toy_class_hits
from difflab.eval.frechet import frechet_distance, pixels8_features
from difflab.models.system import DiffusionSystem, generate
from difflab.outputs import human
from difflab.world.scene import world_preset


@functools.lru_cache(maxsize=4)
def _digits_judge(size: int, seed: int):
    """The digits judge, trained once per (size, seed) in a process (about 2 s): a benchmark scores
    the same run many times."""
    return DigitsJudge(size=size, seed=seed)


def score_samples(cfg, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """Class accuracy of conditional samples by the dataset's judge (empty for unconditional runs)."""
    if labels is None:
        return {}
    if cfg.data.dataset == "toy":
        hits = toy_class_hits(images, labels, world_preset(cfg.data.world))
        return {"class_accuracy": float(hits.mean()), "judge": "toy-world reader"}
    judge = _digits_judge(cfg.data.image_size, cfg.data.seed)
    acc = float((judge.predict(images) == labels.numpy()).mean())
    return {"class_accuracy": acc, "judge": "SVC on real digits", "judge_heldout_accuracy": judge.heldout_accuracy,
            "judge_heldout_n": judge.heldout_n}  # fmt: skip


EVAL_BATCH = 500
"""Images sampled at once: the default n, so that every evaluation at n <= 500 is one batch and draws as it
always has (its numbers unchanged); a larger n samples 500 at a time, each image from its own noise
(:func:`~difflab.models.system.generate`), with the sampling network's memory that of n = 500."""

EVAL_MEMORY = 4 * 2**30
"""The float32 images an evaluation may hold: its n samples and n real images, all at once (the judges and
the Fréchet statistics read them whole), plus a second copy of the real ones while they are stacked."""


def check_eval_n(cfg, n: int) -> None:
    """Refuse, before sampling, an ``n`` whose images would pass :data:`EVAL_MEMORY`."""
    side = cfg.data.image_size
    per_image = 3 * data_channels(cfg.data) * side * side * 4  # samples, real images, their stacking copy
    if n * per_image > EVAL_MEMORY:
        raise DifflabError(
            f"--n {n} is too many for one evaluation: its samples and real images take {human(n * per_image)} "
            f"as float32 ({side} px), over the {human(EVAL_MEMORY)} budget; expected --n <= {EVAL_MEMORY // per_image}"
        )


def evaluate(system: DiffusionSystem, cfg, run_dir: str | Path, n: int, *, sampler=None, steps=None,
             cfg_scale=None, seed: int = 0) -> dict:  # fmt: skip
    """Score the loaded system of a pixel or latent diffusion run (``cfg`` is its record)."""
    check_eval_n(cfg, n)
    classes = num_classes(cfg.data)
    labels = torch.arange(n) % classes if classes else None
    start = time.perf_counter()
    images = generate(system, cfg, n, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                      batch_size=EVAL_BATCH)  # fmt: skip
    seconds = time.perf_counter() - start
    used = cfg.sample.resolve(sampler, steps, cfg_scale)
    fd = frechet_distance(pixels8_features(images), pixels8_features(held_out_images(cfg.data, n)))
    return {
        "run": str(run_dir),
        "n": n,
        "sampler": used.sampler,
        "steps": used.steps,
        "cfg_scale": used.cfg_scale,
        **score_samples(cfg, images, labels),
        "frechet_distance": fd,
        "frechet_feature_space": "pixels8 (8x8 area-averaged pixels)",
        "frechet_n": n,
        "sampling_images_per_second": n / seconds,
    }


def run_evaluator(load):
    """``evaluate(run_dir, n, *, seed, sampler, steps, cfg_scale)`` of a family whose runs ``load(run_dir)``
    loads as ``(system, record)`` (pixel and latent diffusion)."""

    def evaluate_run(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None,
                     cfg_scale=None) -> dict:  # fmt: skip
        system, cfg = load(run_dir)
        return evaluate(system, cfg, run_dir, n, seed=seed, sampler=sampler, steps=steps, cfg_scale=cfg_scale)

    return evaluate_run
