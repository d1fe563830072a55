"""Training throughput: difflab's UNet against diffusers' UNet2DModel at a matched configuration.

Both networks get the same widths, residual blocks per level, attention placement, group norm groups
and scale-shift time conditioning (diffusers' ``resnet_time_scale_shift="scale_shift"``), so parameter
counts agree to 0.1 %. One training step is forward, MSE loss, backward and AdamW, in fp32. Runs
alternate A/B/A/B... in one process so that a shared machine's noise hits both sides alike; each side's
figure is the median over ``--rounds``. FLOPs per step come from ``torch.utils.flop_counter`` (a
multiply-add is 2 FLOPs); efficiency is achieved FLOP/s over a square fp32 matmul's FLOP/s measured in
the same run (the best of a few 1024^3 products: what this machine's BLAS reaches).

    python benchmarks/train_throughput.py                      # both cases, 5 rounds of 10 steps
    python benchmarks/train_throughput.py --cases pixel32 --rounds 3 --steps 5
    python benchmarks/train_throughput.py --ours-head-dim 32    # same FLOPs, fewer, wider heads
    python benchmarks/train_throughput.py --ours-head-dim 32 --diffusers-head-dim 32   # both wide
    python benchmarks/train_throughput.py --compile             # both networks under torch.compile

diffusers is a benchmark baseline only; difflab itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers_baseline import DiffusersUNet
from machine import machine

from difflab.nn.unet import UNet, UNetConfig, count_parameters, training_step_flops

# name -> (image side, channels in, base width, channel multipliers, level with attention, batch)
CASES: dict[str, tuple[int, int, int, tuple[int, ...], int, int]] = {
    "pixel32": (32, 3, 32, (1, 2, 2), 1, 32),  # the 1.6M-parameter 32x32 network
    "latent8": (8, 4, 48, (1, 2, 2), 1, 64),  # an 8x8x4 latent (f = 4 on 32x32), about 4M parameters
}


def build(
    case: str, ours_head_dim: int = 8, theirs_head_dim: int = 8
) -> tuple[torch.nn.Module, torch.nn.Module, int, int, int]:
    side, cin, base, mult, attn_level, batch = CASES[case]
    widths = tuple(base * m for m in mult)
    cfg = UNetConfig(in_channels=cin, out_channels=cin, image_size=side, channels=base, channel_mult=mult,
                     num_res_blocks=2, attention_resolutions=(side // 2**attn_level,),
                     heads=max(1, widths[attn_level] // ours_head_dim))  # fmt: skip
    torch.manual_seed(0)
    theirs = DiffusersUNet(side, cin, widths, attn_level, scale_shift=True, head_dim=theirs_head_dim)
    return UNet(cfg), theirs, side, cin, batch


def training_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One fp32 training step of ``model`` on fixed ``inputs`` as a closure: forward, MSE loss to
    ``inputs["x"]``, backward, AdamW (lr 1e-4). Written once for this script and unet_defaults.py, so
    that the images/s of both count the same work."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.mse_loss(model(**inputs), inputs["x"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_step(model: torch.nn.Module, side: int, cin: int, batch: int):
    g = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(batch, cin, side, side, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
    }
    return training_step(model, inputs), inputs


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def run_case(
    case: str,
    rounds: int,
    steps: int,
    peak: float,
    ours_head_dim: int = 8,
    compile: bool = False,
    theirs_head_dim: int = 8,
) -> dict:
    ours, theirs, side, cin, batch = build(case, ours_head_dim, theirs_head_dim)
    sides = {"difflab": ours, "diffusers": theirs}
    steps_fn, flops, rates, warmup = {}, {}, {k: [] for k in sides}, {}
    for name, model in sides.items():
        steps_fn[name], example = make_step(model, side, cin, batch)
        flops[name] = training_step_flops(model, example)  # counted eagerly: compiling changes no FLOP
        if compile:
            model.compile(dynamic=False)  # in place, inductor: the first steps below compile fwd + bwd
        start = time.perf_counter()
        for _ in range(2):  # warm-up: allocator, AdamW state (and compiling)
            steps_fn[name]()
        warmup[name] = time.perf_counter() - start
    for _ in range(rounds):
        for name in sides:  # alternate A/B within every round
            start = time.perf_counter()
            for _ in range(steps):
                steps_fn[name]()
            rates[name].append(batch * steps / (time.perf_counter() - start))
    out = {
        "case": case,
        "batch_size": batch,
        "image": [cin, side, side],
        "rounds": rounds,
        "steps_per_round": steps,
        "compiled": compile,
        "head_dim": {"difflab": ours_head_dim, "diffusers": theirs_head_dim},
    }
    for name, model in sides.items():
        ips = statistics.median(rates[name])
        achieved = flops[name] * ips / batch / 1e9
        out[name] = {
            "parameters": count_parameters(model), "images_per_s": round(ips, 2),
            "images_per_s_all_rounds": [round(r, 2) for r in rates[name]],
            "gflop_per_step": round(flops[name] / 1e9, 2), "achieved_gflop_s": round(achieved, 1),
            "efficiency_vs_matmul": round(achieved / peak, 3), "warmup_2_steps_s": round(warmup[name], 2),
        }  # fmt: skip
    out["speedup_difflab_over_diffusers"] = round(
        out["difflab"]["images_per_s"] / out["diffusers"]["images_per_s"], 3
    )
    out["parameter_ratio"] = round(out["difflab"]["parameters"] / out["diffusers"]["parameters"], 4)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds (default: 5)")
    p.add_argument("--steps", type=int, default=10, help="training steps per side per round (default: 10)")
    p.add_argument(
        "--ours-head-dim",
        type=int,
        default=8,
        help="our attention head width (default 8 = diffusers' attention_head_dim: matched); the "
        "head split changes neither parameters nor FLOPs, only which kernel path runs",
    )
    p.add_argument("--diffusers-head-dim", type=int, default=8,
                   help="diffusers' attention_head_dim (default 8, its own default)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both networks (inductor); the warm-up time shows the compile cost")  # fmt: skip
    args = p.parse_args()
    for name in args.cases.split(","):
        if name not in CASES:
            p.error(f"unknown case '{name}'; choose from {', '.join(CASES)}")
    peak = matmul_gflops()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(diffusers=True),
        "matmul_fp32_gflop_s": round(peak, 1),
        "cases": [run_case(c, args.rounds, args.steps, peak, args.ours_head_dim, args.compile, args.diffusers_head_dim)
                  for c in args.cases.split(",")],
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
