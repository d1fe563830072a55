"""Does latent diffusion save compute here? Time-to-quality of pixel vs latent diffusion at f = 2, 4, 8.

Quality is the world's reader's class accuracy (exactly one object, the requested shape and colour) of
``--per-class`` samples of each of the 40 classes of the one-object toy world, drawn with each preset's
sampler (DDIM 20 steps, guidance w = 2) every ``--eval-every`` steps; the clock is wall-clock training
time on this machine, evaluations excluded. For latent diffusion the total is

    autoencoder training (vae_f<f>, including its latent-scale measurement)
    + encoding the training set once into the latent cache (rendering included)
    + latent diffusion training until the accuracy first reaches ``--target``

and the pixel model (preset ``demo``, rendering on the fly) is timed the same way in the same run, so the
two are compared side by side as a ratio. Prints one JSON line per evaluation and phase, then a table.

    python benchmarks/ldm_time_to_quality.py --factors 2,4,8 --minutes 8
    python benchmarks/ldm_time_to_quality.py --factors 4 --no-pixel --vae-dir runs/ --ldm-set train.lr=2e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine
from pixel_learning import TimeUp, run_variant

from difflab.config import apply_overrides
from difflab.models import ldm, vae
from difflab.models.codecs import Latents
from difflab.models.conditioners import class_conditioner
from difflab.models.pixel_eval import score_samples
from difflab.models.recipe import make_loss_fn
from difflab.models.registry import get_preset
from difflab.models.system import DiffusionSystem
from difflab.nn.unet import UNet, count_parameters
from difflab.train.trainer import Trainer, make_loader


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def run_latent(f: int, args, root: Path) -> dict:
    """Train vae_f<f>, cache the latents, then ldm_toy until the target accuracy; the phases' seconds."""
    vae_cfg = apply_overrides(get_preset(f"vae_f{f}").build(), ["train.progress=false", *args.vae_set])
    vae_run = Path(args.vae_dir or root) / f"vae_f{f}"
    if (vae_run / "latent_stats.json").is_file():  # reuse: its own clock, training + latent stats
        last = json.loads((vae_run / "metrics.jsonl").read_text().splitlines()[-1])
        vae_seconds = last["seconds"] + vae.latent_stats(vae_run)["seconds"]
        vae_cfg = vae.load_config(vae_run)
    else:
        start = time.perf_counter()
        vae.train(vae_cfg, vae_run)
        vae_seconds = time.perf_counter() - start
    quality = vae.evaluate(vae_run, args.vae_eval_n)  # not timed: a report, not part of the recipe
    autoencoder = vae.load_model(vae_run)[0]
    emit({"phase": "vae", "f": f, "seconds": round(vae_seconds, 1), "steps": vae_cfg.train.steps,
          "parameters": count_parameters(autoencoder), "psnr_db": round(quality["psnr_db"], 2),
          "exact_scene_accuracy": quality["exact_scene_accuracy"],
          "latent_shape": quality["latent_shape"]})  # fmt: skip

    budget = ["train.steps=100000", "train.checkpoint_every=100000", "train.progress=false",
              f"train.sample_every={args.eval_every}", f"vae={vae_run}"]  # fmt: skip
    cfg = ldm.resolve(apply_overrides(get_preset("ldm_toy").build(), [*budget, *args.ldm_set]))
    start = time.perf_counter()
    data = ldm.latent_dataset(cfg, autoencoder)
    encode_seconds = time.perf_counter() - start
    emit({"phase": "encode", "f": f, "seconds": round(encode_seconds, 1), "items": len(data)})

    conditioner = class_conditioner(cfg.data, cfg.cond_drop)
    codec = Latents(autoencoder, cfg.latent_scale, cfg.posterior)
    torch.manual_seed(cfg.train.seed)
    unet = UNet(cfg.unet)
    classes = cfg.unet.num_classes
    labels = torch.arange(args.per_class * classes) % classes
    records: list[dict] = []
    holder: dict = {}

    def sample_fn(ema_unet, step, run_dir):
        trainer = holder["trainer"]
        system = DiffusionSystem(ema_unet, conditioner, codec)
        images = ldm.generate(system, cfg, len(labels), labels=labels, seed=1)
        acc = score_samples(cfg, images, labels)["class_accuracy"]
        rec = emit({"phase": "ldm", "f": f, "step": step, "train_seconds": round(trainer.elapsed_seconds(), 1),
                    "class_accuracy": acc, "n": len(labels)})  # fmt: skip
        records.append(rec)
        if acc >= args.target or trainer.elapsed_seconds() > args.minutes * 60:
            raise TimeUp

    loader = make_loader(data, cfg.train)
    trainer = Trainer(unet, make_loss_fn(cfg, cfg.diffusion.make_schedule(), conditioner, codec), loader, cfg.train,
                      root / f"ldm_f{f}", sample_fn=sample_fn)  # fmt: skip
    holder["trainer"] = trainer
    try:
        trainer.fit()
    except TimeUp:
        pass
    first = next((r for r in records if r["class_accuracy"] >= args.target), None)
    return {
        "f": f,
        "vae_seconds": vae_seconds,
        "encode_seconds": encode_seconds,
        "ldm_seconds": first["train_seconds"] if first else None,
        "ldm_step": first["step"] if first else None,
        "best": max(r["class_accuracy"] for r in records),
        "unet_parameters": count_parameters(unet),
        "vae": quality,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--factors",
        default="2,4,8",
        help="comma-separated autoencoder factors (default: 2,4,8; '' for the pixel baseline alone)",
    )
    p.add_argument("--no-pixel", action="store_true", help="skip the pixel-space baseline")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget per diffusion model")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--per-class", type=int, default=2, help="samples per class at each evaluation")
    p.add_argument("--target", type=float, default=0.95, help="class accuracy that counts as reached")
    p.add_argument("--vae-eval-n", type=int, default=300, help="held-out images for the autoencoder report")
    p.add_argument(
        "--vae-dir",
        default=None,
        help="keep the autoencoders here (vae_f<f>) and reuse those "
        "already trained there, timed by their own metrics.jsonl (default: a temporary folder)",
    )
    p.add_argument("--vae-set", action="append", default=[], metavar="KEY=VALUE", help="override in vae_f*")
    p.add_argument("--ldm-set", action="append", default=[], metavar="KEY=VALUE", help="override in ldm_toy")
    p.add_argument("--pixel-set", action="append", default=[], metavar="KEY=VALUE", help="override in demo")
    args = p.parse_args()
    emit({"machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
          "date": time.strftime("%Y-%m-%d")})  # fmt: skip
    rows = []
    if not args.no_pixel:
        pixel = run_variant("demo", "demo", args.minutes, args.eval_every, args.per_class, args.pixel_set)
        first = next((r for r in pixel if r["class_accuracy"] >= args.target), None)
        rows.append(("pixel (demo)", None, None, first and first["train_seconds"], first and first["step"],
                     max(r["class_accuracy"] for r in pixel)))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for f in (int(x) for x in args.factors.split(",") if x):
            r = run_latent(f, args, Path(tmp))
            rows.append((f"latent f={f}", r["vae_seconds"], r["encode_seconds"], r["ldm_seconds"], r["ldm_step"],
                         r["best"]))  # fmt: skip
    base = rows[0][3] if not args.no_pixel else None
    print(f"\n| model | autoencoder s | encode s | diffusion s to {args.target} (step) | total s | "
          "speed-up vs pixel | best accuracy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, vae_s, enc_s, diff_s, step, best in rows:
        total = None if diff_s is None else (vae_s or 0) + (enc_s or 0) + diff_s
        ratio = f"{base / total:.2f}x" if base and total else "-"
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        reached = "not reached" if diff_s is None else f"{diff_s:.1f} ({step})"
        print(f"| {name} | {fmt(vae_s)} | {fmt(enc_s)} | {reached} | {fmt(total)} | {ratio} | {best:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
