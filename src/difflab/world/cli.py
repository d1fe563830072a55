"""``difflab world preview | condition | check``: look at the toy world, draw a ControlNet's condition from it,
and measure its reader."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image

from difflab import cli_types
from difflab.errors import DifflabError
from difflab.outputs import image_file, save_image, shown
from difflab.world.check import check_reader
from difflab.world.language import describe
from difflab.world.preview import check_preview, save_preview
from difflab.world.render import CONDITION_FIELDS, condition, render
from difflab.world.scene import BACKGROUNDS, WORLD_PRESETS, scene_at, world_preset

MAX_NOISE = 10.0
"""Largest --noise of 'world check' (a standard deviation on [0, 1] pixels)."""


def register(subparsers) -> None:
    world = subparsers.add_parser(
        "world",
        help="preview the toy world and measure its reader",
        description="The procedural toy world every difflab model trains on. Presets: "
        + "; ".join(f"{k} ({v[0]})" for k, v in WORLD_PRESETS.items()),
    )
    sub = world.add_subparsers(dest="world_command", metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser, n_default: int) -> None:
        p.add_argument(
            "--preset", default="scene32", help="world preset (default: scene32); see 'difflab world -h'"
        )
        p.add_argument("--n", type=int, default=n_default, help=f"number of scenes (default: {n_default})")
        p.add_argument(
            "--seed",
            type=cli_types.seed,
            default=0,
            help="dataset seed: scene i of seed s is always the same",
        )
        p.add_argument("--background", choices=BACKGROUNDS, default=None,
                       help="override the preset's background (plain, gradient or texture)")  # fmt: skip

    preview = sub.add_parser(
        "preview", help="save a grid of scenes with their captions",
        description="Render N scenes and save them as a grid image, each with a caption under it.",
    )  # fmt: skip
    common(preview, 16)
    preview.add_argument("--out", default="world.png", help="output image (default: world.png)")
    preview.add_argument("--field", choices=("image", "depth", "edges", "mask"), default="image",
                         help="which rendered field to show (default: image)")  # fmt: skip
    preview.set_defaults(func=_preview)

    cond = sub.add_parser(
        "condition", help="save one scene's edges, depth, mask or layout as a ControlNet's condition image",
        description="Render scene --index of --seed as a condition image (a greyscale PNG at the world's side: "
        "the objects' edges, their nearness 1 - depth, their mask, their boxes, or their boxes filled with their "
        "shape's grey level; for 'layout' an RGBA PNG, the boxes in their colours with the shape levels in "
        "alpha) and print the scene's description, the prompt that goes with it: difflab generate CONTROL_RUN "
        "\"DESCRIPTION\" --control FILE.",
    )  # fmt: skip
    cond.add_argument("--preset", default="scene32", help="world preset (default: scene32)")
    cond.add_argument("--seed", type=cli_types.seed, default=0, help="dataset seed (default: 0)")
    cond.add_argument(
        "--index", type=cli_types.integer(0, 2**31 - 1), default=0, help="scene index (default: 0)"
    )
    cond.add_argument(
        "--field",
        choices=(*CONDITION_FIELDS, "image"),
        default="edges",
        help="what to draw (default: edges); 'image': the scene itself in colour, an image to edit (difflab p2p "
        "--image, difflab invert)",
    )
    cond.add_argument("--out", default="condition.png", help="output PNG (default: condition.png)")
    cond.set_defaults(func=_condition)

    check = sub.add_parser(
        "check", help="measure the reader's accuracy (pixels -> scene)",
        description="Render N scenes, optionally add Gaussian pixel noise, read them back with the reader "
        "and print exact-scene, object-count and per-attribute accuracies.",
    )  # fmt: skip
    common(check, 2000)
    check.add_argument("--noise", type=float, default=0.0,
                       help="std of additive Gaussian noise on [0, 1] pixels (default: 0)")  # fmt: skip
    check.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    check.set_defaults(func=_check)


def _config(args):
    if not 1 <= args.n <= cli_types.MAX_IMAGES:
        raise DifflabError(
            f"--n {args.n} is invalid; expected a number of scenes in [1, {cli_types.MAX_IMAGES}]"
        )
    overrides = {"background": args.background} if args.background else {}
    return world_preset(args.preset, **overrides)


def _preview(args) -> int:
    cfg = _config(args)
    check_preview(args.n)  # before the path is made, and before anything is rendered
    out = image_file(args.out, "--out", writer="figure")
    out = save_preview(cfg, args.n, args.seed, out, field=args.field, progress=sys.stderr.isatty())
    print(f"wrote {args.n} {args.preset} scenes to {shown(out, args.out)}")
    return 0


def _condition(args) -> int:
    cfg = world_preset(args.preset)
    out = image_file(args.out, "--out")
    scene = scene_at(cfg, args.seed, args.index)
    # the 8-bit grid the datasets round to: (H, W, 3) for the image, (H, W, 4) for a layout (RGBA: its
    # colours, the shape levels in alpha), (H, W) for the other conditions
    pixels = render(scene, cfg).image if args.field == "image" else condition(scene, cfg, args.field)
    pixels = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    mode = {"image": "RGB", "layout": "RGBA"}.get(args.field, "L")
    out = save_image(Image.fromarray(pixels, mode=mode), out)
    print(f"wrote the {args.field} of {args.preset} scene {args.index} (seed {args.seed}) to {shown(out, args.out)}: "
          f'"{describe(scene)}"')  # fmt: skip
    return 0


def _check(args) -> int:
    # Pixels are in [0, 1], so a standard deviation of 10 already buries every scene; nan is not > 0, so
    # it used to add no noise at all and report the clean accuracy as "noise nan".
    if not 0 <= args.noise <= MAX_NOISE:
        raise DifflabError(
            f"--noise {args.noise} is invalid; expected a standard deviation in [0, {MAX_NOISE:g}]"
        )
    cfg = _config(args)
    report = {
        "preset": args.preset,
        **check_reader(cfg, args.n, args.seed, args.noise, progress=not args.json),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    acc = report["attribute_accuracy"]
    print(
        f"{args.preset}: exact-scene accuracy {report['exact_scene_accuracy']:.4f} on n={args.n} "
        f"(noise sigma {args.noise}); count {report['object_count_accuracy']:.4f}; "
        + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()),
        file=sys.stdout,
    )
    return 0
