"""What learns fastest on this machine? Time-to-quality of class-conditional pixel diffusion.

Each variant trains a preset (``--preset demo``: the single32 toy world, 40 classes of shape x colour;
``--preset digits``: scikit-learn's digits, 10 classes) with some keys overridden. Every ``--eval-every``
steps the EMA model draws ``--per-class`` samples of every class with the preset's sampler (DDIM 20
steps, guidance w = 2; docs/benchmarks.md used ``--set sample.cfg_scale=3``) and again without guidance
(w = 1), and the dataset's judge scores them: the world's reader
(exactly one object, requested shape and colour) or an SVC trained on real digits. Training time excludes
these evaluations. Prints one JSON line per evaluation and a summary table.

The ``diffusers_naive`` variant is the issue's baseline: diffusers' UNet2DModel (channels 32/64/64,
attention at 16x16, ~1.6M parameters), epsilon prediction, uniform loss, AdamW 2e-4, batch 32, no EMA,
no guidance, DDIM 30 steps with diffusers' DDIMScheduler defaults (leading spacing, x0 clipped to
[-1, 1]). diffusers is a benchmark baseline only; difflab itself never imports it.

    python benchmarks/pixel_learning.py --variants demo,diffusers_naive --minutes 8
    python benchmarks/pixel_learning.py --preset digits --variants demo --minutes 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from diffusers_baseline import DiffusersUNet
from machine import machine

from difflab.config import apply_overrides
from difflab.data.config import make_dataset
from difflab.models import pixel
from difflab.models.codecs import Pixels
from difflab.models.conditioners import class_conditioner
from difflab.models.pixel_eval import score_samples
from difflab.models.recipe import make_loss_fn
from difflab.models.registry import get_preset
from difflab.models.system import DiffusionSystem, generate_classes
from difflab.nn.unet import UNet, count_parameters
from difflab.train.trainer import Trainer, make_loader

VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "wide_top": ["unet.channels=32", "unet.channel_mult=1,2,2"],
    "unfactorized": ["data.factorized_labels=false"],
    "eps_uniform": ["diffusion.prediction=epsilon", "diffusion.loss_weighting=uniform"],
    "eps_uniform_clip": ["diffusion.prediction=epsilon", "diffusion.loss_weighting=uniform", "sample.clip_x0=true",
                         "sample.spacing=leading"],
    "lr2e-3": ["train.lr=2e-3"],
    "lr2e-3_cosine1200": ["train.lr=2e-3", "train.lr_schedule=cosine", "train.steps=1200"],
    "diffusers_naive": ["data.factorized_labels=false",
                        "diffusion.prediction=epsilon", "diffusion.loss_weighting=uniform", "train.lr=2e-4",
                        "train.ema_decay=none", "train.grad_clip=none",
                        "sample.steps=30", "sample.cfg_scale=1", "sample.clip_x0=true", "sample.spacing=leading"],
}  # fmt: skip


class TimeUp(Exception):
    """Raised from the sampling hook when a variant's training budget is spent."""


def run_variant(
    preset: str, name: str, minutes: float, eval_every: int, per_class: int, overrides: list[str]
) -> list[dict]:
    # a variant that sets train.steps (a cosine decay needs its length) stops there; others run on time
    budget = ["train.steps=100000", "train.checkpoint_every=100000", "train.progress=false"]
    cfg = pixel.resolve(apply_overrides(get_preset(preset).build(), [*budget, *overrides, *VARIANTS[name]]))
    conditioner = class_conditioner(cfg.data, cfg.cond_drop)
    torch.manual_seed(cfg.train.seed)
    classes = cfg.unet.num_classes
    if name == "diffusers_naive":  # the network: widths 32/64/64, attention at 16x16
        model = DiffusersUNet(32, cfg.unet.in_channels, (32, 64, 64), 1, num_class_embeds=classes + 1)
    else:
        model = UNet(cfg.unet)
    records: list[dict] = []
    holder: dict = {}

    def sample_fn(ema_model, step, run_dir):
        trainer = holder["trainer"]
        labels = torch.arange(per_class * classes) % classes
        rec = {
            "preset": preset,
            "variant": name,
            "step": step,
            "train_seconds": round(trainer.elapsed_seconds(), 1),
        }

        def accuracy(w: float) -> float:
            system = DiffusionSystem(ema_model, conditioner, Pixels())
            images = generate_classes(system, cfg, len(labels), labels=labels, cfg_scale=w, seed=1)
            return score_samples(cfg, images, labels)["class_accuracy"]

        rec["class_accuracy"] = accuracy(cfg.sample.cfg_scale)
        rec["class_accuracy_cfg1"] = rec["class_accuracy"] if cfg.sample.cfg_scale == 1 else accuracy(1.0)
        rec.update(
            cfg_scale=cfg.sample.cfg_scale, sampler=f"{cfg.sample.sampler} {cfg.sample.steps}", n=len(labels)
        )
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if trainer.elapsed_seconds() > minutes * 60:
            raise TimeUp

    with tempfile.TemporaryDirectory() as run_dir:
        loader = make_loader(make_dataset(cfg.data), cfg.train)
        cfg_train = apply_overrides(cfg, [f"train.sample_every={eval_every}"]).train
        loss_fn = make_loss_fn(cfg, cfg.diffusion.make_schedule(), conditioner, Pixels())
        trainer = Trainer(model, loss_fn, loader, cfg_train, run_dir,
                          sample_fn=sample_fn)  # fmt: skip
        holder["trainer"] = trainer
        try:
            trainer.fit()
        except TimeUp:
            pass
    for r in records:
        r["parameters"] = count_parameters(model)
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", default="demo", choices=["demo", "digits"], help="what to train (default: demo)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every variant (a variant's own keys win)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock per variant")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--per-class", type=int, default=2, help="samples per class at each evaluation")
    args = p.parse_args()
    variants = args.variants.split(",")
    print(json.dumps({"machine": machine(diffusers="diffusers_naive" in variants), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}))  # fmt: skip
    summary = []
    for name in variants:
        recs = run_variant(args.preset, name, args.minutes, args.eval_every, args.per_class, args.overrides)
        first95 = next((r for r in recs if r["class_accuracy"] >= 0.95), None)
        best = max(recs, key=lambda r: r["class_accuracy"])
        summary.append((name, recs[0]["parameters"], best, first95))
    print("\n| variant | params | best accuracy, CFG (w=1) at step, train s | first >= 0.95 at step, train s |",
          file=sys.stderr)  # fmt: skip
    print("|---|---|---|---|", file=sys.stderr)
    for name, params, best, first in summary:
        f95 = f"{first['step']}, {first['train_seconds']} s" if first else "not reached"
        print(f"| {name} | {params / 1e6:.2f} M | {best['class_accuracy']:.3f} ({best['class_accuracy_cfg1']:.3f}) "
              f"at {best['step']}, {best['train_seconds']} s | {f95} |", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
