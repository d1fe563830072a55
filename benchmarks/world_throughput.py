"""Does toy-world data keep up with training? Rendering vs the disk cache, next to a training step's appetite.

For each world preset, side by side in one run on one machine:

- ``render_scenes_per_s``: ``scene_at`` + ``render`` alone (the world's raw speed);
- ``fresh_items_per_s``: ``ToyWorldDataset`` items (render + 8-bit quantisation + tensors), one process;
- ``fresh_loader_items_per_s``: the same through a DataLoader with ``--workers`` workers (steady state:
  timed from the first batch, so worker start-up is reported separately as ``loader_first_batch_s``);
- ``cache_build_s`` / ``cache_open_s``: writing the safetensors cache once / opening it afterwards;
- ``cached_items_per_s`` and ``cached_loader_items_per_s``: the same reads served from the cache;
- ``cache_speedup``: cached / fresh items per second, one process.

``consumer``: images per second of a small class-conditional UNet training step (forward, backward,
AdamW) at 32x32 and 64x64 on ``--device`` (default: this machine's CPU threads) - what the data has
to keep up with.

    python benchmarks/world_throughput.py                 # prints JSON
    python benchmarks/world_throughput.py --device cuda   # the consumer on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

import torch
from machine import machine
from torch.utils.data import DataLoader

from difflab.data.toy import ToyWorldDataset
from difflab.nn.unet import UNet, UNetConfig
from difflab.world.render import RENDERER_VERSION, render
from difflab.world.scene import scene_at, world_preset

PRESETS = ("single32", "scene32", "scene64")


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def loader_rate(ds, batch_size: int, workers: int) -> tuple[float, float]:
    """(items/s after the first batch, seconds to the first batch)."""
    start = time.perf_counter()
    loader = iter(DataLoader(ds, batch_size=batch_size, num_workers=workers))
    next(loader)
    t0 = time.perf_counter()
    count = sum(len(b["image"]) for b in loader)
    return rate(count, time.perf_counter() - t0), round(t0 - start, 2)


def bench_preset(name: str, n: int, batch_size: int, workers: int, cache_dir: str) -> dict:
    cfg = world_preset(name)
    fields = ("image", "label") if cfg.max_objects == 1 else ("image",)
    out: dict = {"resolution": cfg.resolution, "objects": f"{cfg.min_objects}..{cfg.max_objects}", "n": n}

    t = time.perf_counter()
    for i in range(n):
        render(scene_at(cfg, 0, i), cfg)
    out["render_scenes_per_s"] = rate(n, time.perf_counter() - t)

    fresh = ToyWorldDataset(cfg, n, seed=0, fields=fields)
    t = time.perf_counter()
    for i in range(n):
        fresh[i]
    out["fresh_items_per_s"] = rate(n, time.perf_counter() - t)
    out["fresh_loader_items_per_s"], out["loader_first_batch_s"] = loader_rate(fresh, batch_size, workers)

    t = time.perf_counter()
    ToyWorldDataset(cfg, n, seed=0, fields=fields, cache_dir=cache_dir)
    out["cache_build_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    cached = ToyWorldDataset(cfg, n, seed=0, fields=fields, cache_dir=cache_dir)
    out["cache_open_s"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    for i in range(n):
        cached[i]
    out["cached_items_per_s"] = rate(n, time.perf_counter() - t)
    out["cached_loader_items_per_s"], _ = loader_rate(cached, batch_size, workers)
    out["cache_speedup"] = round(out["cached_items_per_s"] / out["fresh_items_per_s"], 1)
    out["cache_bytes_per_item"] = round(sum(os.path.getsize(p.path) for p in os.scandir(cache_dir)) / n)
    for p in os.scandir(cache_dir):
        os.remove(p.path)
    return out


def bench_consumer(resolution: int, batch_size: int, steps: int, device: str) -> dict:
    """Images/s of a small class-conditional UNet training step at ``resolution``."""
    cfg = UNetConfig(image_size=resolution, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(resolution // 4,), num_classes=40)  # fmt: skip
    torch.manual_seed(0)
    model = UNet(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    t_steps = torch.randint(0, 1000, (batch_size,), device=device)
    labels = torch.randint(0, 40, (batch_size,), device=device)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x, t_steps, class_labels=labels), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return {
        "device": device,
        "unet": f"channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention at {resolution // 4}px, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters",
        "batch_size": batch_size,
        "train_images_per_s": rate(steps * batch_size, time.perf_counter() - t),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="items per 32x32 preset (half that at 64x64)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="device of the consumer UNet step")
    args = ap.parse_args()

    result: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "renderer_version": RENDERER_VERSION,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in PRESETS:
            n = args.n if world_preset(name).resolution <= 32 else args.n // 2
            result["presets"][name] = bench_preset(name, n, args.batch_size, args.workers, cache_dir)
    result["consumer"] = {
        "32x32": bench_consumer(32, 64, steps=4, device=args.device),
        "64x64": bench_consumer(64, 32, steps=2, device=args.device),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
