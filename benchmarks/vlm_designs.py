"""The controlled comparison of vision-language designs (docs/vlm.md): the same data, steps, batch and number of
visual tokens for every design, a frozen CLIP ViT and the world's pretrained LM under each, judged exactly.

    design            preset(s)                                   what changes
    llava_linear      vlm_llava + connector=linear                LLaVA 1.0's linear projection
    llava_mlp         vlm_llava                                   LLaVA-1.5's MLP (LM trained in full)
    llava_mlp_64      vlm_llava + visual_tokens=64                every patch, no pooling
    llava_lora        vlm_llava + lm_mode=lora                    LM frozen, LoRA on its attention
    llava_frozen      vlm_llava + lm_mode=frozen                  the connector alone
    llava_two_stage   vlm_llava_stage1, then vlm_llava init=it    LLaVA's two stages, the same total steps
    perceiver_ar      vlm_llava + connector=perceiver             a resampler, fully autoregressive
    flamingo          vlm_flamingo                                resampler + gated cross-attention, LM frozen
    flamingo_lora     vlm_flamingo + lm_mode=lora                 ... and LoRA on the LM
    blip2             vlm_blip2_stage1, then vlm_blip2            Q-Former pretrained, LM frozen
    instructblip      vlm_blip2_stage1, then vlm_instructblip     the Q-Former reads the question

Each design is trained for ``--steps`` steps (1,500 by default) and ``--seeds`` seeds, two at a time (one
thread each: the library's side-by-side runner), then scored on the same held-out scenes (``vlm.evaluate``:
VQA per kind, captions, POPE). Prints a JSON line per run and a Markdown table of means with standard errors
over seeds; ``--json FILE`` keeps them with the date and machine. Two-stage designs split the steps: stage 1
gets ``--stage1-share`` of them.

    python benchmarks/vlm_designs.py --clip runs/clip --lm runs/lm_world --out runs/vlm      # about 2 hours
    python benchmarks/vlm_designs.py --clip runs/clip --lm runs/lm_world --out runs/vlm \
        --designs llava_mlp,flamingo --steps 500
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from machine import machine

from difflab.config import apply_overrides
from difflab.models import vlm
from difflab.models.registry import get_preset
from difflab.models.runs import has_checkpoints
from difflab.train.side_by_side import Job, run_side_by_side

DESIGNS = {
    "llava_linear": (None, ("vlm_llava", ["connector=linear"])),
    "llava_mlp": (None, ("vlm_llava", [])),
    "llava_mlp_64": (None, ("vlm_llava", ["visual_tokens=64", "lm_model.context_length=160"])),
    "llava_lora": (None, ("vlm_llava", ["lm_mode=lora"])),
    "llava_frozen": (None, ("vlm_llava", ["lm_mode=frozen"])),
    "llava_two_stage": (("vlm_llava_stage1", []), ("vlm_llava", [])),
    "perceiver_ar": (None, ("vlm_llava", ["connector=perceiver"])),
    "flamingo": (None, ("vlm_flamingo", [])),
    "flamingo_lora": (None, ("vlm_flamingo", ["lm_mode=lora"])),
    "blip2": (("vlm_blip2_stage1", []), ("vlm_blip2", [])),
    "instructblip": (("vlm_blip2_stage1", []), ("vlm_instructblip", [])),
}
"""design -> (stage 1 (preset, overrides) or None, the final stage (preset, overrides))."""
DEFAULT = ("llava_mlp", "llava_lora", "flamingo", "flamingo_lora", "llava_linear", "perceiver_ar", "blip2",
           "llava_mlp_64", "llava_two_stage")
"""The designs the issue's four questions need (fusion and LM mode; connector; visual tokens; stages), nine of
them: three seeds at 1,500 steps take about two hours on two cores (6.5-11 minutes a run, two at a time).
llava_frozen and instructblip run on request."""
SCORES = {
    "vqa": lambda r: r["vqa"]["overall"]["accuracy"],
    "count": lambda r: r["vqa"]["kinds"]["count"]["accuracy"],
    "color": lambda r: r["vqa"]["kinds"]["color"]["accuracy"],
    "position": lambda r: r["vqa"]["kinds"]["position"]["accuracy"],
    "heldout": lambda r: r["vqa"]["heldout_pairs"]["accuracy"],
    "pope_adv": lambda r: r["pope"]["adversarial"]["accuracy"],
    "cap_shape_p": lambda r: r["captions"]["attributes"]["shape"]["precision"]["value"],
    "cap_recall": lambda r: r["captions"]["attributes"]["shape"]["recall"]["value"],
    "chair_i": lambda r: r["captions"]["hallucination"]["rate"],
}
"""The table's columns: how each is read from a vlm.evaluate report."""


def _train_and_score(design: str, seed: int, parents: list[str], out: str, steps: int, share: float, n: int,
                     overrides: list[str]) -> dict:  # fmt: skip
    """One design at one seed (a module-level function: it runs in a process of its own); ``overrides`` apply to
    every stage of every design."""
    stage1, final = DESIGNS[design]
    run = Path(out) / f"{design}_s{seed}"
    common = [*parents, f"train.seed={seed}", *overrides]
    first_steps = round(steps * share) if stage1 else 0
    start = time.perf_counter()
    if stage1 is not None:
        preset, extra = stage1
        first = run.with_name(run.name + "_stage1")
        vlm.train(apply_overrides(get_preset(preset).build(), [*common, *extra, f"train.steps={first_steps}"]),
                  first, resume=has_checkpoints(first))  # a finished run trains no further  # fmt: skip
        common.append(f"init={first}")
    preset, extra = final
    vlm.train(apply_overrides(get_preset(preset).build(), [*common, *extra, f"train.steps={steps - first_steps}"]),
              run, resume=has_checkpoints(run))  # fmt: skip
    seconds = time.perf_counter() - start
    report = vlm.evaluate(run, n)
    record = {"design": design, "seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
              **{k: _read(f, report) for k, f in SCORES.items()}}  # fmt: skip
    (run / "report.json").write_text(json.dumps(report, indent=1))
    return record


def _read(f, report):
    try:
        value = f(report)
    except (KeyError, TypeError):
        return None
    return None if value is None else round(value, 4)


def table(records: list[dict]) -> str:
    """Mean ± standard error over seeds, per design."""
    rows = ["| design | seeds | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 2) + "|"]
    for design in dict.fromkeys(r["design"] for r in records):
        mine = [r for r in records if r["design"] == design]
        cells = []
        for key in SCORES:
            values = [r[key] for r in mine if r[key] is not None]
            if not values:
                cells.append("–")
                continue
            mean = sum(values) / len(values)
            se = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
                  if len(values) > 1 else float("nan"))  # fmt: skip
            cells.append(f"{mean:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}"))
        rows.append(f"| {design} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", required=True, help="a CLIP run (difflab train --preset clip_demo): the frozen ViT")
    p.add_argument("--lm", required=True, help="an lm run (difflab train --preset lm_world): the language model")
    p.add_argument("--out", required=True, help="where the runs go (a trained run is reused, a stopped one resumed)")
    p.add_argument("--designs", default=",".join(DEFAULT), help=f"comma-separated, of {', '.join(DESIGNS)} "
                   f"(default: {', '.join(DEFAULT)})")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per design (default 3)")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every design (default 1500: with "
                   "four-turn rows LLaVA counts at 0.87 there, docs/vlm.md; the presets train 3000)")
    p.add_argument("--stage1-share", type=float, default=0.2, help="two-stage designs: stage 1's share (0.2)")
    p.add_argument("--n", type=int, default=300, help="held-out cases per test (default 300)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for every design")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the records with date and machine")
    args = p.parse_args()
    designs = args.designs.split(",")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        p.error(f"unknown design(s) {unknown}; choose from {', '.join(DESIGNS)}")
    parents = [f"vision={args.clip}", f"lm={args.lm}"]
    jobs = [Job(f"{d}_s{s}", _train_and_score,
                (d, s, parents, args.out, args.steps, args.stage1_share, args.n, args.overrides),
                on_done=lambda name, sec: print(f"{name}: done in {sec:.0f} s", flush=True))
            for s in range(args.seeds) for d in designs]  # fmt: skip
    results = run_side_by_side(jobs, workers=args.jobs, threads=1)
    records = [results[j.name][0] for j in jobs]
    for r in records:
        print(json.dumps(r))
    print(f"\n{args.steps} steps, {args.overrides or 'no overrides'}, n = {args.n} held-out cases per test\n\n"
          f"{table(records)}")
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "n": args.n, "steps": args.steps,
               "overrides": args.overrides,
               "command": "python benchmarks/vlm_designs.py " + " ".join(__import__("sys").argv[1:]),
               "records": records}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

