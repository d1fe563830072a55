"""``difflab demo``: the main job, from nothing to a report in one command.

Today it draws the toy world and measures the reader that will judge every model (the pixel-diffusion
milestone turns it into: train the demo preset, sample, evaluate). It writes ``DIR/world.png`` (scenes
with captions) and ``DIR/report.json`` (the reader's accuracy per world preset, clean and noisy, with
timings), and prints where everything is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from difflab.errors import DifflabError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job: draw the toy world and measure its reader (DIR/world.png, DIR/report.json)",
        description="Render a captioned grid of the toy world, measure the reader (pixels -> scene) on "
        "every world preset with and without pixel noise, and write a JSON report.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--n", type=int, default=500, help="scenes per reader measurement (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from difflab.world.check import check_reader
    from difflab.world.preview import save_preview
    from difflab.world.scene import WORLD_PRESETS, world_preset

    if args.n < 1:
        raise DifflabError(f"--n {args.n} is invalid; expected a positive number of scenes")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    grid = save_preview(world_preset("scene64"), 16, args.seed, out / "world.png")
    print(f"[1/2] drew 16 captioned scenes -> {grid}")
    reader = {}
    for name in WORLD_PRESETS:
        for noise in (0.0, 0.05):
            r = check_reader(world_preset(name), args.n, args.seed, noise)
            keep = ("n", "exact_scene_accuracy", "attribute_accuracy", "scenes_per_second")
            reader[f"{name}/noise={noise}"] = {k: r[k] for k in keep}
            print(
                f"[2/2] reader on {name:8s} noise {noise:.2f}: exact-scene accuracy "
                f"{r['exact_scene_accuracy']:.4f} (n={args.n})"
            )
    report = {"reader": reader, "seconds": time.perf_counter() - start}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"done in {report['seconds']:.0f} s: {out / 'world.png'} (the world), {out / 'report.json'} (scores)"
    )
    return 0
