"""Sampling throughput: difflab's UNet and sampler loop against a diffusers pipeline-style loop.

Images per second of one whole sampling run (``--steps`` network evaluations, default 20, at ``--batch``
64) with DDIM (Song et al. 2021, eta = 0) and DPM-Solver++(2M) (Lu et al. 2022), fp32, under
``torch.inference_mode``, on untrained networks of the matched shape of ``train_throughput.py`` (its
``build``: the same widths, blocks, attention and norm groups on both sides; parameters within 0.1 %).

- ``difflab``: our UNet inside ``difflab.diffusion.samplers`` (a pure function over a denoiser);
- ``diffusers``: UNet2DModel inside the loop of a diffusers pipeline, ``scheduler.set_timesteps(n)``,
  then ``eps = unet(scale_model_input(x, t), t); x = scheduler.step(eps, t, x).prev_sample`` with
  DDIMScheduler or DPMSolverMultistepScheduler;
- ``cross``: our sampler loop around diffusers' network. Against ``diffusers`` it isolates the loop
  (same network), against ``difflab`` the network (same loop). ``--no-cross`` skips it.

Both loops use the same noise schedule (linear betas, T = 1000, epsilon prediction), the same timesteps
(trailing spacing) and the same starting noise; diffusers is configured as our samplers' own tests
configure it (``clip_sample=False``, ``final_sigmas_type="zero"``), so ``cross`` and ``diffusers`` should
return the same samples up to float32 rounding: their largest difference is reported beside the speeds.
A warm-up run of every side and sampler comes first; its samples are checked (shape, finite values). Then
the runs alternate in one process, each round running every side and sampler once, so a shared machine's
noise hits all alike; each figure is the median over ``--rounds``. Prints one JSON object.

    python benchmarks/sampling.py                                   # both cases, 5 rounds, batch 64, 20 steps
    python benchmarks/sampling.py --cases latent8 --rounds 3
    python benchmarks/sampling.py --rounds 1 --batch 2 --steps 2 --cases latent8   # smallest setting

diffusers is a benchmark baseline only; difflab itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from machine import machine
from train_throughput import CASES, build

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.samplers import get_sampler
from difflab.diffusion.schedules import make_schedule
from difflab.nn.unet import count_parameters

SCHEDULE = "linear"  # DDPM's betas 1e-4..0.02, diffusers' beta_schedule="linear" (their default range)
SPACING = "trailing"  # both libraries compute it alike (Lin et al. 2024, Table 2)
# our sampler -> the diffusers scheduler of the same algorithm, configured to match ours
SAMPLERS = {
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")),
}  # fmt: skip


def ours_loop(net: torch.nn.Module, sampler: str, steps: int):
    """``x_T -> x_0`` with difflab's sampler around ``net`` (an epsilon-predicting ``net(x, t)``)."""
    schedule = make_schedule(SCHEDULE)
    denoiser, sample_fn = Denoiser(net, schedule, "epsilon"), get_sampler(sampler)
    return lambda x_T: sample_fn(denoiser, x_T, schedule, steps, spacing=SPACING)


def diffusers_loop(net: torch.nn.Module, sampler: str, steps: int):
    """``x_T -> x_0`` with a diffusers pipeline's denoising loop around ``net``."""
    import diffusers

    cls, options = SAMPLERS[sampler]
    scheduler = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule=SCHEDULE,
                                        timestep_spacing=SPACING, prediction_type="epsilon", **options)  # fmt: skip

    def run(x_T: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(steps)  # also resets DPM-Solver's multistep history
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = net(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(eps, t, x).prev_sample
        return x

    return run


def run_case(
    case: str, samplers: list[str], rounds: int, batch: int, steps: int, cross: bool, ours_head_dim: int = 8
) -> dict:
    ours, theirs, side, cin, _ = build(case, ours_head_dim)
    ours.eval()
    theirs.eval()
    x_T = torch.randn(batch, cin, side, side, generator=torch.Generator().manual_seed(0))
    loops = {}
    for sampler in samplers:
        loops[("difflab", sampler)] = ours_loop(ours, sampler, steps)
        loops[("diffusers", sampler)] = diffusers_loop(theirs, sampler, steps)
        if cross:
            loops[("cross", sampler)] = ours_loop(theirs, sampler, steps)
    rates: dict = {key: [] for key in loops}
    outputs = {}
    with torch.inference_mode():
        for key, loop in loops.items():  # warm-up, and the samples checked below
            out = loop(x_T)
            assert out.shape == x_T.shape, (
                f"{key}: sample shape {tuple(out.shape)}, expected {tuple(x_T.shape)}"
            )
            assert bool(torch.isfinite(out).all()), f"{key}: the sample has non-finite values"
            outputs[key] = out
        for _ in range(rounds):
            for key, loop in loops.items():  # every side and sampler once per round
                start = time.perf_counter()
                loop(x_T)
                rates[key].append(batch / (time.perf_counter() - start))
    result = {
        "case": case,
        "image": [cin, side, side],
        "parameters": {"difflab": count_parameters(ours), "diffusers": count_parameters(theirs)},
    }
    result["parameter_ratio"] = round(result["parameters"]["difflab"] / result["parameters"]["diffusers"], 4)
    for sampler in samplers:
        row = {}
        for name in ("difflab", "diffusers", "cross"):
            if (name, sampler) in rates:
                r = rates[(name, sampler)]
                row[name] = {"images_per_s": round(statistics.median(r), 3),
                             "images_per_s_all_rounds": [round(v, 3) for v in r]}  # fmt: skip
        ips = {name: v["images_per_s"] for name, v in row.items()}
        row["difflab_over_diffusers"] = round(ips["difflab"] / ips["diffusers"], 3)
        if cross:
            row["loop_cross_over_diffusers"] = round(ips["cross"] / ips["diffusers"], 3)  # same network
            row["network_difflab_over_cross"] = round(ips["difflab"] / ips["cross"], 3)  # same loop
            a, b = outputs[("cross", sampler)], outputs[("diffusers", sampler)]
            row["cross_vs_diffusers_max_abs_diff"] = float((a - b).abs().max())
            row["diffusers_sample_max_abs"] = float(b.abs().max())
        result[sampler] = row
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated: " + ", ".join(SAMPLERS))
    p.add_argument("--rounds", type=int, default=5, help="rounds of every side and sampler (default: 5)")
    p.add_argument("--batch", type=int, default=64, help="images per sampling run (default: 64)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps = network evaluations (default: 20)")
    p.add_argument("--no-cross", action="store_true", help="skip our sampler around diffusers' network")
    p.add_argument(
        "--ours-head-dim",
        type=int,
        default=8,
        help="our attention head width (default 8 = diffusers': matched); as in train_throughput.py",
    )
    args = p.parse_args()
    cases, samplers = args.cases.split(","), args.samplers.split(",")
    for name in cases:
        if name not in CASES:
            p.error(f"unknown case '{name}'; choose from {', '.join(CASES)}")
    for name in samplers:
        if name not in SAMPLERS:
            p.error(f"unknown sampler '{name}'; choose from {', '.join(SAMPLERS)}")
    start = time.perf_counter()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(diffusers=True),
        "options": {
            "cases": cases,
            "samplers": samplers,
            "rounds": args.rounds,
            "batch": args.batch,
            "steps": args.steps,
            "cross": not args.no_cross,
            "schedule": SCHEDULE,
            "spacing": SPACING,
            "dtype": "float32",
            "ours_head_dim": args.ours_head_dim,
        },
        "cases": [
            run_case(c, samplers, args.rounds, args.batch, args.steps, not args.no_cross, args.ours_head_dim)
            for c in cases
        ],
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
