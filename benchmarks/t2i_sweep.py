"""Faithfulness of one trained text-to-image run against guidance scale and against sampler x NFE.

Every setting draws the same prompts (the first ``--n`` of each GenEval-style category of the run's world,
once each, the same noise seeds) and is judged by the reader (``difflab eval``'s score). Prints one JSON
line per setting, then two Markdown tables for docs/t2i.md:

- guidance: w in ``--cfg`` (default 1, 2, 4, 8) with the run's sampler and steps;
- samplers: ``--samplers`` as name:steps (default DDIM 50, DPM-Solver++(2M) 20 and 10) at the run's w.

    python benchmarks/t2i_sweep.py RUN --n 50
    python benchmarks/t2i_sweep.py RUN --n 25 --cfg 1,3,6 --samplers ddim:50,dpmpp_2m:20,dpmpp_2m:10,euler:20
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from machine import machine

from difflab.models import t2i, t2i_eval
from difflab.world.geneval import eval_prompts


def run_setting(model, cfg, prompts, *, sampler: str, steps: int, cfg_scale: float, seed: int) -> dict:
    start = time.perf_counter()
    images = t2i_eval.generate_batched(model, cfg, [p.text() for p in prompts], sampler=sampler, steps=steps,
                                       cfg_scale=cfg_scale, seed=seed)  # fmt: skip
    seconds = time.perf_counter() - start
    faith = t2i_eval.score(prompts, images, cfg.data.world, cfg.data.pairs())["all"]
    record = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "n": len(prompts),
              "seconds": round(seconds, 2), **{c: round(v["score"], 4) for c, v in faith.items()}}  # fmt: skip
    print(json.dumps(record), flush=True)
    return record


def table(records: list[dict], first: str) -> str:
    cats = [c for c in records[0] if c not in ("sampler", "steps", "cfg_scale", "n", "seconds")]
    lines = [f"| {first} | " + " | ".join(cats) + " | n | seconds |", "|---" * (len(cats) + 3) + "|"]
    for r in records:
        label = f"w = {r['cfg_scale']:g}" if first == "guidance" else f"{r['sampler']} {r['steps']}"
        lines.append(
            f"| {label} | " + " | ".join(f"{r[c]:.3f}" for c in cats) + f" | {r['n']} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a text-to-image run (difflab train --preset t2i_*, or demo_out/run)")
    p.add_argument("--n", type=int, default=50, help="prompts per category (default 50)")
    p.add_argument("--cfg", default="1,2,4,8", help="guidance scales to sweep (default 1,2,4,8)")
    p.add_argument("--samplers", default="ddim:50,dpmpp_2m:20,dpmpp_2m:10", help="name:steps list")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, cfg = t2i.load_model(args.run_dir)
    prompts = eval_prompts(cfg.data.world, args.n)
    header = {"run": args.run_dir, "machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    print(json.dumps(header), flush=True)
    s = cfg.sample
    guidance = [run_setting(model, cfg, prompts, sampler=s.sampler, steps=s.steps, cfg_scale=float(w), seed=args.seed)
                for w in args.cfg.split(",")]  # fmt: skip
    samplers = []
    for item in args.samplers.split(","):
        name, steps = item.split(":")
        samplers.append(run_setting(model, cfg, prompts, sampler=name, steps=int(steps), cfg_scale=s.cfg_scale,
                                    seed=args.seed))  # fmt: skip
    print(f"\nGuidance ({s.sampler} {s.steps} steps):\n" + table(guidance, "guidance"), file=sys.stderr)
    print(f"\nSamplers (w = {s.cfg_scale:g}):\n" + table(samplers, "sampler"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
