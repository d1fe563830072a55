"""``difflab edit``: edit an image by a written instruction with an InstructPix2Pix run, judge held-out edits
exactly, or sweep its two guidance scales into the paper's trade-off curve (Brooks et al. 2023, Fig. 10)."""

from __future__ import annotations

import json
import sys

import torch

from difflab import cli_types
from difflab.errors import DifflabError
from difflab.models import instruct, instruct_eval
from difflab.models import inversion as inv
from difflab.models.cli import GUIDANCE, SAMPLER, SAMPLER_HELP, STEPS
from difflab.models.conditioners import Instructions
from difflab.models.registry import family_of_run
from difflab.outputs import image_file, shown
from difflab.train.device import resolve_device
from difflab.viz import save_captioned_grid
from difflab.world.language import describe
from difflab.world.reader import read

CASES = cli_types.integer(1, 10_000)
SEEDS = cli_types.integer(1, 16)
SWEEP_IMAGE = (1.0, 1.5, 2.5)
SWEEP_TEXT = (1.0, 3.0, 7.5)
"""The s_I x s_T grid of ``--sweep`` (the paper's Fig. 10 sweeps s_I 1.0-2.2 at s_T 3-9)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="InstructPix2Pix: edit an image by a written instruction",
        description="Edit --image as INSTRUCTION says ('make the circle blue', 'move the square to the left', "
        "'remove the red circle', 'add a small green cross at the top left') with an InstructPix2Pix run "
        "(Brooks et al. 2023): it is sampled from noise beside the image's latents, with two-scale guidance "
        "(Eq. 3): --image-cfg s_I pulls towards the input, --cfg s_T towards the instruction. Writes the input "
        "and one edit per seed, each under what the world's reader reads in it. --eval N instead judges N "
        "held-out edits exactly (success: the output is the asked-for scene; preserved: no unnamed object "
        "changed), beside the naive baseline; with --sweep, over a grid of s_I x s_T (docs/editing.md).",
    )
    p.add_argument("run_dir", help="an InstructPix2Pix run (difflab train --preset instruct_demo --set base=RUN)")
    p.add_argument("instruction", nargs="?", default=None, help="what to change, right after RUN (not with --eval)")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="the image to edit ('difflab world condition --field image' draws one)")  # fmt: skip
    p.add_argument("--image-cfg", type=GUIDANCE, default=None, help="s_I, the input image's guidance (default: the "
                   "run's, 1.5)")  # fmt: skip
    p.add_argument("--cfg", type=GUIDANCE, default=None, help="s_T, the instruction's guidance (default: the run's)")
    p.add_argument("--seeds", type=SEEDS, default=4, help="how many noise seeds (default: 4)")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="the first noise seed (default: 0)")
    p.add_argument("--sampler", type=SAMPLER, default=None, help=SAMPLER_HELP)
    p.add_argument("--steps", type=STEPS, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--out", default="edit.png", help="output image (default: edit.png)")
    p.add_argument("--eval", type=CASES, default=None, metavar="N", help="judge N held-out edits instead")
    p.add_argument("--case-seed", type=cli_types.seed, default=instruct_eval.EVAL_SEED,
                   help=f"--eval: the seed of the cases (default: {instruct_eval.EVAL_SEED})")  # fmt: skip
    p.add_argument("--no-baseline", action="store_true", help="--eval: skip the naive baseline")
    p.add_argument("--p2p", action="store_true", help="--eval: also Prompt-to-Prompt on the base for the recolours "
                   "(null-text inversion of each input: slow)")  # fmt: skip
    p.add_argument("--sweep", action="store_true", help=f"--eval: every s_I in {SWEEP_IMAGE} with every s_T in "
                   f"{SWEEP_TEXT}")  # fmt: skip
    p.add_argument("--plot", default=None, metavar="FILE", help="--sweep: draw the trade-off curve here")
    p.add_argument("--examples", default=None, metavar="FILE",
                   help="--eval: also save the first 8 cases (input | edit, green where it succeeded)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="--eval: print one JSON object")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.set_defaults(func=_edit)


def _edit(args) -> int:
    family = family_of_run(args.run_dir).name
    if family != "instruct":
        raise DifflabError(f"'{args.run_dir}' is a {family} run; difflab edit takes an InstructPix2Pix run "
                           "(difflab train --preset instruct_demo --set base=RUN)")  # fmt: skip
    if args.eval is not None:
        if args.instruction is not None or args.image is not None:
            raise DifflabError("--eval draws its own images and instructions; give neither")
        return _evaluate(args)
    if args.sweep or args.plot:
        raise DifflabError("--sweep and --plot go with --eval N")
    if args.instruction is None or args.image is None:
        raise DifflabError("give an INSTRUCTION and the --image FILE it edits, e.g. difflab edit RUN 'make the circle "
                           "blue' --image in.png")  # fmt: skip
    out = image_file(args.out, writer="figure")
    model, cfg = instruct.load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))
    image = inv.read_image(args.image, cfg.data.image_size)[0]  # (3, S, S) in [-1, 1]
    request = Instructions([args.instruction] * args.seeds, image.expand(args.seeds, -1, -1, -1))
    edits = torch.cat([instruct.edit(model, cfg, request[k : k + 1], image_scale=args.image_cfg, text_scale=args.cfg,
                                     seed=args.seed + k, sampler=args.sampler, steps=args.steps)
                       for k in range(args.seeds)]).cpu()  # fmt: skip
    world = cfg.data.world_config()
    tiles = torch.cat([image[None], edits])
    captions = [f"input: {describe(read(image, world))}"] + [f"{args.instruction} -> {describe(read(e, world))}"
                                                             for e in edits]  # fmt: skip
    path = save_captioned_grid(tiles, captions, out, ncol=min(5, len(tiles)))
    print(f"wrote the input and {args.seeds} edit(s) to {shown(path, args.out)} (captions: what the reader reads)")
    return 0


def _evaluate(args) -> int:
    if args.plot and not args.sweep:
        raise DifflabError("--plot draws the --sweep's curve; add --sweep")
    plot = image_file(args.plot, "--plot", writer="figure") if args.plot else None
    examples = image_file(args.examples, "--examples", writer="figure") if args.examples else None
    model, cfg = instruct.load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))
    sampling = {"sampler": args.sampler, "steps": args.steps}
    scales = [(i, t) for i in SWEEP_IMAGE for t in SWEEP_TEXT] if args.sweep else [(args.image_cfg, args.cfg)]
    reports = []
    for k, (s_i, s_t) in enumerate(scales):
        reports.append(instruct.evaluate_editor(model, cfg, args.eval, seed=args.seed, case_seed=args.case_seed,
                                                baseline=not args.no_baseline and k == 0, p2p=args.p2p and k == 0,
                                                image_scale=s_i,
                                                text_scale=s_t, progress=sys.stderr.isatty(), **sampling))  # fmt: skip
    if examples is not None:
        world = cfg.data.world_config()
        cases = instruct_eval.edit_cases(world, min(8, args.eval), args.case_seed, cfg.data.pairs())
        edits = instruct.edit(model, cfg, instruct_eval.request(cases, world), seed=args.seed,
                              image_scale=args.image_cfg, text_scale=args.cfg, **sampling).cpu()  # fmt: skip
        instruct_eval.save_examples(cases, edits, instruct_eval.judge_all(cases, edits, world), world, examples)
    if plot is not None:
        instruct_eval.plot_tradeoff(reports, plot)
    report = {"run": str(args.run_dir)} | (reports[0] if len(reports) == 1 else {"sweep": reports})
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.eval} held-out edits on '{args.run_dir}':")
    print(f"{'method':<10} {'s_I':>4} {'s_T':>4} {'edit':<8} {'n':>4} {'success':>8} {'preserved':>9} {'PSNR bg':>8}")
    for r in reports:
        s = r["settings"]
        for method in ("instruct", "naive", "p2p", "codec"):
            for kind, row in r.get(method, {}).items():
                scales_cell = f"{s['image_scale']:>4} {s['text_scale']:>4}" if method == "instruct" else "   -    -"
                if row["n"] == 0:
                    continue
                print(f"{method:<10} {scales_cell} {kind:<8} {row['n']:>4} {row['success']:>8.2f} "
                      f"{row['preserved']:>9.2f} {row['psnr_background']:>8.1f}")  # fmt: skip
    if plot is not None:
        print(f"wrote the trade-off curve to {shown(plot, args.plot)}")
    return 0
