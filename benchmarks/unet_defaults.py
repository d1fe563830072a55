"""Which UNet defaults pay on this machine: attention head width, channels-last, ``torch.compile``.

For each preset's own network (its widths, attention placement and batch size), one training step
(forward, MSE loss, backward, AdamW; fp32) is timed under each variant. Every variant has the same
parameters and FLOPs (the head split only regroups the same matmuls):

- ``heads4``: the presets' split until this benchmark, 4 heads in every attention layer;
- ``head_dim32`` / ``head_dim64``: ``UNetConfig.head_dim``, width // head_dim heads per layer;
- ``channels_last``: ``heads4`` with the model and its input in channels-last memory format;
- ``compile``: ``heads4`` under ``torch.compile`` (inductor); its compile time (the first steps) is
  reported apart from the steady-state rate.

The variants alternate round by round in one process, so a shared machine's noise hits all alike;
each figure is the median over ``--rounds`` rounds of ``--steps`` steps.

    python benchmarks/unet_defaults.py                               # demo, ldm_toy, t2i_demo
    python benchmarks/unet_defaults.py --networks demo --variants heads4,head_dim32 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
from machine import machine
from train_throughput import training_step

from difflab.models.registry import get_preset
from difflab.nn.unet import UNet, count_parameters, example_inputs

# The networks as their runs train them. t2i_demo's UNet runs on vae_t2i's 16x16x4 latents (its
# preset alone describes pixels until a VAE is attached, see 'difflab info').
NETWORKS = {
    "demo": {},
    "ldm_toy": {},
    "t2i_demo": {"in_channels": 4, "out_channels": 4, "image_size": 16},
}
VARIANTS = ("heads4", "head_dim32", "head_dim64", "channels_last", "compile")


def unet_config(network: str, variant: str):
    cfg = dataclasses.replace(get_preset(network).build().unet, heads=4, head_dim=None, **NETWORKS[network])
    if variant.startswith("head_dim"):
        cfg = dataclasses.replace(cfg, head_dim=int(variant.removeprefix("head_dim")))
    return cfg


def make_step(network: str, variant: str, batch: int):
    """A closure running one training step of ``network`` under ``variant``."""
    torch.manual_seed(0)
    cfg = unet_config(network, variant)
    model = UNet(cfg)
    inputs = example_inputs(cfg, batch)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    if variant == "compile":
        model.compile(dynamic=False)  # fixed shapes: no symbolic-shape recompiles
    return training_step(model, inputs), model


def heads_of(model: torch.nn.Module) -> list[int]:
    return sorted({m.heads for m in model.modules() if type(m).__name__ == "MultiHeadAttention"})


def run_network(network: str, variants: list[str], rounds: int, steps: int, batch: int | None) -> dict:
    batch = batch or get_preset(network).build().train.batch_size
    usable = [v for v in variants if not v.startswith("head_dim") or _divides(network, v)]
    steps_fn, info, rates = {}, {}, {v: [] for v in usable}
    for variant in usable:
        step, model = make_step(network, variant, batch)
        start = time.perf_counter()
        step()  # warm-up; for compile, this is where compiling happens
        step()
        info[variant] = {"warmup_2_steps_s": round(time.perf_counter() - start, 2), "heads": heads_of(model)}
        steps_fn[variant] = step
        params = count_parameters(model)
    for _ in range(rounds):
        for variant in usable:
            start = time.perf_counter()
            for _ in range(steps):
                steps_fn[variant]()
            rates[variant].append(steps * batch / (time.perf_counter() - start))
    base = statistics.median(rates["heads4"]) if "heads4" in rates else None
    out = {"batch": batch, "parameters": params, "variants": {}}
    for variant in usable:
        rate = statistics.median(rates[variant])
        out["variants"][variant] = {
            **info[variant],
            "images_per_s": round(rate, 2),
            "per_round": [round(r, 2) for r in rates[variant]],
            "vs_heads4": round(rate / base, 3) if base else None,
        }
    return out


def _divides(network: str, variant: str) -> bool:
    try:
        unet_config(network, variant)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated presets")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: each preset's)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    for name in [*args.networks.split(","), *variants]:
        if name not in (*NETWORKS, *VARIANTS):
            p.error(f"unknown network or variant '{name}'; networks: {', '.join(NETWORKS)}; "
                    f"variants: {', '.join(VARIANTS)}")  # fmt: skip
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "rounds": args.rounds,
        "steps": args.steps,
        "networks": {
            n: run_network(n, variants, args.rounds, args.steps, args.batch) for n in args.networks.split(",")
        },
    }
    print(json.dumps(report, indent=1))
    print("\n| network | variant | heads | images/s | vs heads4 | first 2 steps (s) |", file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for network, result in report["networks"].items():
        for variant, r in result["variants"].items():
            print(f"| {network} | {variant} | {r['heads']} | {r['images_per_s']} | {r['vs_heads4']} | "
                  f"{r['warmup_2_steps_s']} |", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
