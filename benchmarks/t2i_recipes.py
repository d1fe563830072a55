"""The text-to-image recipes of docs/t2i.md side by side: one autoencoder, one text encoder and one layout
planner (the demo's), each recipe's demo preset trained on them, then judged by the reader on the shipped
prompt sets and on a freshly drawn set.

    recipe        preset                   what changes
    sd            t2i_demo                 Stable Diffusion's cross-attention UNet (the baseline)
    tokencompose  t2i_tokencompose_demo    + each phrase's cross-attention supervised by its object's mask
    mmdit         t2i_mmdit_demo           SD3's joint-attention transformer in place of the UNet
    layout        t2i_layout_demo          LMD + GLIGEN: planned layout read through gated self-attention

Prints one JSON line per recipe and a Markdown table per prompt set; ``--json FILE`` also writes them
with the date and machine (what ``difflab demo`` prints the baseline from: src/difflab/models/t2i_recipes.json).

    python benchmarks/t2i_recipes.py --base DEMO_OUT --out runs/recipes --n 50
    python benchmarks/t2i_recipes.py --base DEMO_OUT --out runs/recipes --recipes sd,layout --set train.seed=1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import machine

from difflab.config import apply_overrides
from difflab.models import t2i
from difflab.models.registry import get_preset
from difflab.models.runs import has_checkpoints

PRESETS = {"sd": "t2i_demo", "tokencompose": "t2i_tokencompose_demo", "mmdit": "t2i_mmdit_demo",
           "layout": "t2i_layout_demo"}  # fmt: skip
CATEGORIES = (
    "single_object",
    "two_objects",
    "counting",
    "colors",
    "position",
    "attribute_binding",
    "overall",
)


def run_recipe(recipe: str, preset: str, base: Path, out: Path, n: int, prompt_seed: int,
               overrides: list[str]) -> dict:  # fmt: skip
    """Train (unless ``out/recipe`` holds a trained run) and evaluate one recipe: its ``preset`` on the
    parent runs found in ``base`` (a missing vae/ trains on pixels)."""
    run_dir = out / recipe
    parents = [f"text_encoder={base / 'text_encoder'}"]
    if (base / "vae").is_dir():
        parents.append(f"vae={base / 'vae'}")
    if recipe == "layout":
        parents.append(f"planner={base / 'planner'}")
    cfg = apply_overrides(get_preset(preset).build(), parents + overrides)
    if not has_checkpoints(run_dir):
        t2i.train(cfg, run_dir)
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record = {"recipe": recipe, "preset": preset, "overrides": overrides, "steps": logs[-1]["step"],
              "train_seconds": logs[-1]["seconds"]}  # fmt: skip
    for name, seed in (("shipped", None), (f"fresh_{prompt_seed}", prompt_seed)):
        start = time.perf_counter()
        report = t2i.evaluate(run_dir, n, prompt_seed=seed)
        faith = report["faithfulness"]
        record[name] = {c: round(faith["all"][c]["score"], 4) for c in CATEGORIES if c in faith["all"]}
        if "heldout_pairs" in faith:
            record[name]["heldout_pairs"] = round(faith["heldout_pairs"]["overall"]["score"], 4)
        if "painter" in report:
            record[name]["painter"] = report["painter"]
        record[name]["eval_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(record), flush=True)
    return record


def table(records: list[dict], key: str) -> str:
    rows = [
        "| recipe | train s | " + " | ".join(CATEGORIES) + " | held-out pairs |",
        "|---" * (len(CATEGORIES) + 3) + "|",
    ]
    for r in records:
        s = r[key]
        cells = " | ".join(f"{s.get(c, float('nan')):.2f}" for c in CATEGORIES)  # a small world lacks some
        heldout = s.get("heldout_pairs", float("nan"))
        rows.append(f"| {r['recipe']} | {r['train_seconds']:.0f} | {cells} | {heldout:.2f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a 'difflab demo' output: its vae/, text_encoder/, planner/")
    p.add_argument("--out", required=True, help="where the recipes' runs go (a trained run is reused)")
    p.add_argument(
        "--recipes",
        default="sd,tokencompose,mmdit,layout",
        help="recipes, or recipe=preset pairs (default: each recipe's demo preset)",
    )
    p.add_argument("--n", type=int, default=50, help="prompts per category (default 50)")
    p.add_argument(
        "--prompt-seed", type=int, default=1, help="seed of the freshly drawn prompt set (default 1)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for every recipe")
    p.add_argument(
        "--json", default=None, metavar="FILE", help="also write the records with date and machine"
    )
    args = p.parse_args()
    chosen = [r.split("=") if "=" in r else (r, PRESETS[r]) for r in args.recipes.split(",")]
    records = [run_recipe(r, preset, Path(args.base), Path(args.out), args.n, args.prompt_seed, args.overrides)
               for r, preset in chosen]  # fmt: skip
    for key in ("shipped", f"fresh_{args.prompt_seed}"):
        print(f"\n{key} prompt set, n = {args.n} per category\n\n{table(records, key)}")
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "n": args.n,
               "command": "python benchmarks/t2i_recipes.py " + " ".join(__import__("sys").argv[1:]),
               "records": records}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
