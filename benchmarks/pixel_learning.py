"""What learns fastest on this machine? Time-to-quality of class-conditional pixel diffusion.

Each variant trains on the single32 toy world (40 classes: shape x colour) from the ``demo`` preset with
some keys overridden; every ``--eval-every`` steps the EMA model draws 2 samples per class (DDIM, 20
steps) and the world's reader scores them (exactly one object, requested shape and colour). Training
time excludes these evaluations. Prints one JSON line per evaluation and a summary table.

The ``diffusers_naive`` variant is the issue's baseline: diffusers' UNet2DModel (channels 32/64/64,
attention at 16x16, ~1.6M parameters), epsilon prediction, uniform loss, AdamW 2e-4, batch 32, no EMA,
DDIM 30 steps. diffusers is a benchmark baseline only; difflab itself never imports it.

    python benchmarks/pixel_learning.py --variants demo,diffusers_naive --minutes 5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import torch

from difflab.config import apply_overrides
from difflab.eval.conditional import toy_class_hits
from difflab.models.pixel import build_unet, generate, make_dataset, make_loss_fn
from difflab.nn.unet import count_parameters
from difflab.presets import get_preset
from difflab.train.trainer import Trainer, make_loader
from difflab.world.scene import world_preset

VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "unfactorized": ["data.factorized_labels=false"],
    "narrow_unfactorized": ["unet.channels=16", "unet.channel_mult=1,2,4", "data.factorized_labels=false"],
    "narrow_top": ["unet.channels=16", "unet.channel_mult=1,2,4"],
    "narrow_lr2e-3": ["unet.channels=16", "unet.channel_mult=1,2,4", "train.lr=2e-3"],
    "eps_uniform": ["diffusion.prediction=epsilon", "diffusion.loss_weighting=uniform"],
    "batch64": ["train.batch_size=64"],
    "lr3e-3": ["train.lr=3e-3"],
    "diffusers_naive": ["data.factorized_labels=false",
                        "diffusion.prediction=epsilon", "diffusion.loss_weighting=uniform", "train.lr=2e-4",
                        "train.ema_decay=none", "sample.steps=30", "train.grad_clip=none"],
}  # fmt: skip


class TimeUp(Exception):
    """Raised from the sampling hook when a variant's training budget is spent."""


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel behind difflab's network signature ``net(x, t, class_labels=None)``."""

    def __init__(self, num_classes: int):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
            norm_num_groups=8,
        )  # fmt: skip

    def forward(self, x, t, class_labels=None):
        return self.net(x, t, class_labels=class_labels).sample


def run_variant(name: str, minutes: float, eval_every: int, per_class: int) -> list[dict]:
    budget = ["train.steps=100000", "train.checkpoint_every=100000", "train.progress=false"]
    cfg = apply_overrides(get_preset("demo").build(), [*VARIANTS[name], *budget])
    torch.manual_seed(cfg.train.seed)
    classes = cfg.unet.num_classes
    model = DiffusersUNet(classes) if name == "diffusers_naive" else build_unet(cfg)
    world = world_preset(cfg.data.world)
    records: list[dict] = []
    holder: dict = {}

    def sample_fn(ema_model, step, run_dir):
        trainer = holder["trainer"]
        labels = torch.arange(per_class * classes) % classes
        images = generate(ema_model, cfg, len(labels), labels=labels, seed=1)
        acc = float(toy_class_hits(images, labels, world).mean())
        rec = {"variant": name, "step": step, "train_seconds": round(trainer.elapsed_seconds(), 1),
               "class_accuracy": acc, "n": len(labels)}  # fmt: skip
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if trainer.elapsed_seconds() > minutes * 60:
            raise TimeUp

    with tempfile.TemporaryDirectory() as run_dir:
        loader = make_loader(make_dataset(cfg.data), cfg.train)
        cfg_train = apply_overrides(cfg, [f"train.sample_every={eval_every}"]).train
        trainer = Trainer(model, make_loss_fn(cfg, cfg.diffusion.make_schedule()), loader, cfg_train, run_dir,
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
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock per variant")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--per-class", type=int, default=2, help="samples per class at each evaluation")
    args = p.parse_args()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}))  # fmt: skip
    summary = []
    for name in args.variants.split(","):
        recs = run_variant(name, args.minutes, args.eval_every, args.per_class)
        first95 = next((r for r in recs if r["class_accuracy"] >= 0.95), None)
        best = max(recs, key=lambda r: r["class_accuracy"])
        summary.append((name, recs[0]["parameters"], best, first95))
    print(
        "\n| variant | params | best accuracy (step, train s) | first >= 0.95 (step, train s) |",
        file=sys.stderr,
    )
    print("|---|---|---|---|", file=sys.stderr)
    for name, params, best, first in summary:
        f95 = f"{first['step']}, {first['train_seconds']} s" if first else "not reached"
        print(f"| {name} | {params / 1e6:.2f} M | {best['class_accuracy']:.3f} ({best['step']}, "
              f"{best['train_seconds']} s) | {f95} |", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
