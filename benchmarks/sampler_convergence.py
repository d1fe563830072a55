"""How each sampler's error falls with the number of steps, measured exactly on Gaussian data.

Data N(mean, std^2) (default N(1, 0.5^2)), the DDPM linear schedule (T = 1000) and the data's exact
denoiser (``difflab.diffusion.analytic``): every sampler is then an affine map of its start and of the
noise it draws, so its output distribution is a Gaussian whose mean and std are computed exactly (no
Monte-Carlo error), starting from the true marginal at the first sampling step. The error is the
2-Wasserstein distance W2 between that Gaussian and the data, i.e. sqrt(mean_error^2 + std_error^2):
pure discretisation error. Every sampler keeps the mean exactly (x_t = alpha_t * mean is a fixed point
of each update), so W2 = |std_error|; the tables print the signed std error (output std - data std),
which shows where an error changes sign. Prints one JSON object, then one markdown table per spacing.

    python benchmarks/sampler_convergence.py                 # the table in docs/diffusion.md
    python benchmarks/sampler_convergence.py --std 0.1       # finer-scale data
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from machine import machine

from difflab.diffusion.analytic import gaussian_output_error
from difflab.diffusion.discretization import SPACINGS
from difflab.diffusion.samplers import SAMPLERS, get_sampler
from difflab.diffusion.schedules import make_schedule


def network_calls(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="linear", help="noise schedule (default: linear, T = 1000)")
    p.add_argument("--steps", default="5,10,20,50,100,200,1000", help="comma-separated step counts")
    p.add_argument("--spacings", default=",".join(SPACINGS), help="comma-separated timestep spacings")
    p.add_argument("--mean", type=float, default=1.0, help="data mean (default: 1.0)")
    p.add_argument("--std", type=float, default=0.5, help="data std (default: 0.5)")
    args = p.parse_args(argv)
    # The tensors are tiny (at most 1002 x 1): threads only add synchronisation, which on a loaded machine
    # costs milliseconds per float64 exp/sqrt.
    torch.set_num_threads(1)
    steps = [int(s) for s in args.steps.split(",")]
    spacings = args.spacings.split(",")
    schedule = make_schedule(args.schedule)
    start = time.perf_counter()
    rows = []
    for spacing in spacings:
        for name in SAMPLERS:
            for n in steps:
                err = gaussian_output_error(
                    get_sampler(name), schedule, n, mean=args.mean, std=args.std, spacing=spacing
                )
                rows.append(
                    {"sampler": name, "spacing": spacing, "steps": n, "nfe": network_calls(name, n), **err}
                )
    report = {
        "experiment": "exact output distribution on Gaussian data, W2 to the data",
        "schedule": schedule.name,
        "timesteps": schedule.timesteps,
        "data": {"mean": args.mean, "std": args.std},
        "machine": machine(),
        "seconds": round(time.perf_counter() - start, 2),
        "rows": rows,
    }
    print(json.dumps(report))
    for spacing in spacings:
        print(
            f"\n**{spacing}** spacing: output std - data std, data N({args.mean:g}, {args.std:g}^2), "
            f"{schedule.name} schedule\n"
        )
        print("| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |")
        print("|---|" + "---:|" * len(steps))
        for name in SAMPLERS:
            cells = [r["std_error"] for r in rows if r["sampler"] == name and r["spacing"] == spacing]
            suffix = " (2n-1 calls)" if name == "heun" else ""
            print(f"| {name}{suffix} | " + " | ".join(f"{c:+.1e}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
