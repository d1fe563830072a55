"""Where a training step's time goes: ``torch.profiler`` over the matched networks of train_throughput.py.

For each side (difflab's UNet, diffusers' UNet2DModel at the same configuration), ``--warmup`` steps,
then ``--steps`` profiled ones (forward, MSE, backward, AdamW in fp32: train_throughput's
``training_step``). The profiler's self CPU time is grouped into kinds of work, as shares of the total:

- convolution (oneDNN forward and backward), matmul (mm/addmm/bmm), attention (SDPA kernels),
  normalisation (group/layer norm), activation (SiLU/GELU), each the self time of those ops;
- optimizer: the AdamW step as a whole (its foreach arithmetic, inclusive);
- other: the rest (elementwise adds and muls, copies, reductions, autograd bookkeeping).

Why: at a matched configuration both libraries call the same kernels, so these shares bound what any
rewrite of the Python around them could gain (docs/benchmarks.md, the latent case).

    python benchmarks/step_profile.py                         # latent8: 3 warm-up steps, 5 profiled
    python benchmarks/step_profile.py --case pixel32 --steps 3

diffusers is a benchmark baseline only; difflab itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from machine import machine
from torch.profiler import ProfilerActivity, profile
from train_throughput import CASES, build, make_step

# kind -> substrings of the aten op names whose self time counts as that kind
KINDS = {
    "convolution": ("convolution",),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "normalisation": ("group_norm", "layer_norm"),
    "activation": ("silu", "gelu"),
}
OPTIMIZER_EVENT = "Optimizer.step#AdamW.step"


def kind_of(name: str) -> str | None:
    for kind, needles in KINDS.items():
        if any(n in name for n in needles):
            return kind
    return None


def shares(model: torch.nn.Module, side: int, cin: int, batch: int, warmup: int, steps: int) -> dict:
    """Profile ``steps`` training steps of ``model``; self CPU time per kind as shares of the total."""
    step, _ = make_step(model, side, cin, batch)
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_kind = dict.fromkeys(KINDS, 0.0)
    for e in events:
        kind = kind_of(e.key)
        if kind is not None:
            by_kind[kind] += e.self_cpu_time_total
    by_kind["optimizer"] = sum(e.cpu_time_total for e in events if e.key == OPTIMIZER_EVENT)
    by_kind["other"] = total - sum(by_kind.values())
    return {
        "ms_per_step_profiled": round(1000 * wall / steps, 2),
        "shares": {k: round(v / total, 4) for k, v in by_kind.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="latent8", choices=list(CASES), help="matched network (default latent8)")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (default 3)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} / --warmup {args.warmup}: expected steps >= 1 and warmup >= 0")
    ours, theirs, side, cin, batch = build(args.case)
    sides = {name: shares(m, side, cin, batch, args.warmup, args.steps)
             for name, m in (("difflab", ours), ("diffusers", theirs))}  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(diffusers=True),
              "case": args.case, "batch": batch, "warmup": args.warmup, "steps": args.steps,
              "sides": sides}  # fmt: skip
    print(json.dumps(result, indent=2))
    kinds = list(sides["difflab"]["shares"])
    print("\n| side | ms per step (profiled) | " + " | ".join(kinds) + " |", file=sys.stderr)
    print("|---|---:|" + "---:|" * len(kinds), file=sys.stderr)
    for name, s in sides.items():
        cells = " | ".join(f"{100 * s['shares'][k]:.1f} %" for k in kinds)
        print(f"| {name} | {s['ms_per_step_profiled']:.1f} | {cells} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
